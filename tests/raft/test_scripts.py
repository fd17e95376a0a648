"""Scripted Raft scenarios: each file in testdata/ tells one story and pins every message of it."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from .interp import Interpreter, parse_script, render_script

TESTDATA = Path(__file__).parent / "testdata"
SCRIPTS = sorted(TESTDATA.glob("*.txt"))


def test_scripts_exist() -> None:
    assert len(SCRIPTS) >= 9


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script(path: Path, request: pytest.FixtureRequest) -> None:
    text = path.read_text()
    blocks = parse_script(text)
    assert blocks, f"{path.name} has no commands"
    interp = Interpreter()
    outputs = {}
    failures: list[str] = []
    for line_no, command, expected in blocks:
        got = interp.run(command)
        outputs[line_no] = got
        if got != expected and not failures:
            diff = "\n".join(
                difflib.unified_diff(expected.splitlines(), got.splitlines(), "expected", "got", lineterm="")
            )
            failures.append(f"{path.name}:{line_no}: {command}\n{diff}")
    if request.config.getoption("--raft-rewrite"):
        path.write_text(render_script(text, outputs))
        return
    assert not failures, failures[0]
