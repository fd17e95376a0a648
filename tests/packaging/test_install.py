"""The first commands of the README, as a user runs them: `scripts/dev.sh` and
`scripts/install.sh` as root print nothing but their result (no build-backend warnings before the
mount), and from another user refuse in one line that says how to run them. The package's
metadata builds without setuptools deprecation warnings (`project.license` is an SPDX string)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_package_metadata_builds_without_warnings(tmp_path: Path) -> None:
    build = ("import sys, setuptools.build_meta as backend; "
             "print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))")
    # Once scripts/install-build.sh put Nuitka into .venv (the packaging tests run it), its
    # setuptools hook imports `wheel.bdist_wheel`, which warns that setuptools has its own now:
    # the environment's tools, not this project's metadata. Only that one warning is let through.
    not_ours = "ignore:The 'wheel' package is no longer the canonical location:FutureWarning"
    done = subprocess.run([sys.executable, "-W", not_ours, "-c", build, str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "deprecated" not in done.stderr, done.stderr
    metadata = (tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


@pytest.mark.parametrize("script", ["dev.sh", "install.sh"])
def test_scripts_tell_a_user_how_to_run_them(script: str) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run as another user")
    done = subprocess.run([*NOBODY, str(REPO / "scripts" / script)], capture_output=True, text=True,
                          cwd="/", timeout=60, check=False)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1 and done.stdout == "", (done.stdout, done.stderr)
    assert lines[0].startswith(f"{script}: run as root"), lines
    expected = "sudo " if shutil.which("sudo") else "become root (su -)"
    assert expected in lines[0], lines


@pytest.mark.slow  # reinstalls .venv's package (about 20 s with everything in place)
def test_install_is_quiet_on_success() -> None:
    if os.geteuid() != 0:
        pytest.skip("scripts/install.sh runs as root")
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), "test"], capture_output=True, text=True,
                          cwd="/", timeout=1800, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "" and done.stdout.splitlines() == ["install.sh: ready (.venv/bin/awsomefsd)"], \
        done.stdout + done.stderr
