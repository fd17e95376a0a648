"""How to start this same program again: the executable build.py makes, or this interpreter with
the package. One answer for the daemon's successor (daemon/handover.py) and the dev cluster's
members (`own_command`), one for the read workers (fuse/kernel/workers.py), which die with this
process (`running_command`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def compiled() -> bool:
    """Is this process the executable build.py makes? Its entry script is always compiled by
    Nuitka, which gives a compiled module the global `__compiled__`. The package's own modules
    run as bytecode inside it (build.py, BYTECODE_PACKAGES), so their globals cannot say."""
    return hasattr(sys.modules.get("__main__"), "__compiled__")


def own_command() -> list[str]:
    """The executable itself, or this interpreter with this package importable from any working
    directory (`own_environment`)."""
    if not compiled():
        return [sys.executable, "-m", "awsomefsd"]
    # a onefile executable runs from a temporary unpacked copy; its bootstrap names the file itself
    binary = os.environ.get("NUITKA_ONEFILE_BINARY") or sys.argv[0]
    if os.sep not in binary:  # started through PATH
        binary = shutil.which(binary) or binary
    return [os.path.abspath(binary)]


def running_command() -> list[str]:
    """The program this process runs, to start a helper that dies with it (the read workers): the
    interpreter with the package, or the compiled program itself — for a onefile executable its
    unpacked copy, not the file again (which would unpack itself anew, seconds each time, and put
    its bootstrap between this process and the helper). Not for a successor that outlives this
    process: the unpacked copy is removed when it exits (`own_command`)."""
    if not compiled():
        return [sys.executable, "-m", "awsomefsd"]
    return [os.readlink("/proc/self/exe")]


def own_environment() -> dict[str, str]:
    """The environment for `own_command`: the package's parent directory on PYTHONPATH (what it
    starts runs with `/` as its working directory, so a source checkout must be named)."""
    package_parent = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else "")}
