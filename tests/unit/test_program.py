"""How this program starts itself again (awsomefsd/program.py): from the executable build.py
makes, whose package modules are bytecode and so cannot tell by their own globals that they run
inside it, or from the interpreter. The executable itself runs it in tests/packaging's slow build
test (hand-over under systemd, the dev cluster)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from awsomefsd import program


def test_the_interpreter_starts_the_package_with_its_checkout_on_the_path() -> None:
    assert not program.compiled()
    assert program.own_command() == [sys.executable, "-m", "awsomefsd"]
    parent = program.own_environment()["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(parent) / "awsomefsd" / "program.py").is_file()


def test_the_executable_starts_itself_whichever_way_it_was_named(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    entry = types.ModuleType("__main__")
    entry.__compiled__ = object()  # type: ignore[attr-defined]  # what Nuitka gives its compiled entry script
    monkeypatch.setitem(sys.modules, "__main__", entry)
    monkeypatch.delenv("NUITKA_ONEFILE_BINARY", raising=False)
    assert program.compiled()
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "awsomefsd"), "dev"])
    assert program.own_command() == [str(tmp_path / "bin" / "awsomefsd")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["./awsomefsd"])
    assert program.own_command() == [str(tmp_path / "awsomefsd")]
    monkeypatch.setenv("NUITKA_ONEFILE_BINARY", "/usr/bin/awsomefsd")  # the onefile bootstrap's name for itself
    assert program.own_command() == ["/usr/bin/awsomefsd"]


def test_a_helper_that_dies_with_this_process_runs_what_this_process_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read workers: from a onefile executable, its unpacked copy (the running file), never the
    onefile again (that unpacks itself anew and puts its bootstrap between the daemon and the
    worker, whose parent check then fails: every worker exited 2 and was restarted forever)."""
    assert program.running_command() == [sys.executable, "-m", "awsomefsd"]
    entry = types.ModuleType("__main__")
    entry.__compiled__ = object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", entry)
    monkeypatch.setenv("NUITKA_ONEFILE_BINARY", "/usr/bin/awsomefsd")
    assert program.running_command() == [os.readlink("/proc/self/exe")]
    assert program.running_command() != program.own_command()
