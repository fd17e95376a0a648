"""bench/kernelfloor.py stands in for `Operations` behind the same handlers: every method the
handlers call must exist there with the same parameters, or the floor answers EIO (a keyword
argument added to `Operations` once broke its untar and SQLite runs in the benchmark), and every
attribute they read must be there (one read in the handlers' constructor once kept the floor
from starting at all)."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from awsomefsd.fs.operations import Operations
from awsomefsd.fuse.kernel.handlers import KernelHandlers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from kernelfloor import NullOperations


def test_the_floor_has_every_operation_the_handlers_call_with_the_same_parameters() -> None:
    source = inspect.getsource(KernelHandlers)
    called = sorted({name for name, _ in inspect.getmembers(Operations, callable)
                     if not name.startswith("_") and f"self.ops.{name}(" in source})
    assert called, "the handlers call nothing on Operations?"
    for name in called:
        ours = inspect.signature(getattr(Operations, name)).parameters
        floor = inspect.signature(getattr(NullOperations, name)).parameters
        assert list(floor) == list(ours), f"{name}: floor {list(floor)} != Operations {list(ours)}"


def test_the_floor_has_every_attribute_the_handlers_read() -> None:
    source = inspect.getsource(KernelHandlers)
    read = sorted(set(re.findall(r"self\.ops\.([a-z_]+)\b(?!\()", source)))
    assert "handles" in read, "the handlers read no attribute of Operations any more? (update this test)"
    floor = NullOperations()
    missing = [name for name in read if not hasattr(floor, name)]
    assert not missing, f"the floor lacks {missing}"
