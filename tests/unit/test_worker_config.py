"""`[mount] read_workers` as the kernel transport takes it (fuse/kernel/workers.py `worker_config`):
unset, one worker where the daemon may use more than one CPU and none on one; where workers do not
apply, a number set is logged as ignored and the default says nothing (note 134)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from awsomefsd.config import load_settings
from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import workers
from awsomefsd.fuse.kernel.workers import for_mount, worker_config


def settings(tmp_path: Path, **mount: object) -> object:
    return load_settings(read_default_file=False, node={"state_dir": str(tmp_path)},
                         device={"path": str(tmp_path / "device.img")}, mount={"transport": "kernel", **mount})


def test_unset_is_one_worker_on_more_than_one_cpu_and_none_on_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    config = worker_config(settings(tmp_path))  # type: ignore[arg-type]
    assert config is not None and config.count == workers.DEFAULT_WORKERS and not config.asked
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert worker_config(settings(tmp_path)) is None  # type: ignore[arg-type]
    config = worker_config(settings(tmp_path, read_workers=2))  # type: ignore[arg-type]
    assert config is not None and config.count == 2 and config.asked
    assert worker_config(settings(tmp_path, read_workers=0)) is None  # type: ignore[arg-type]


def test_where_workers_do_not_apply_only_a_number_set_is_logged(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=workers.__name__)
    raft = load_settings(read_default_file=False, node={"state_dir": str(tmp_path)}, meta={"log": "raft"},
                         device={"path": str(tmp_path / "device.img")}, mount={"transport": "kernel"})
    assert worker_config(raft) is None
    assert not caplog.records, "the default is silent"
    raft_set = load_settings(read_default_file=False, node={"state_dir": str(tmp_path)}, meta={"log": "raft"},
                             device={"path": str(tmp_path / "device.img")},
                             mount={"transport": "kernel", "read_workers": 2})
    assert worker_config(raft_set) is None
    assert any("read_workers" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_cluster_members_mount_has_no_workers_and_says_so_only_when_asked(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A member runs with `[meta] log` unset ("local"): the setting's check cannot tell; the mount's can."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    caplog.set_level(logging.INFO, logger=workers.__name__)
    default = worker_config(settings(tmp_path))  # type: ignore[arg-type]
    assert for_mount(default, single_node=True) == default
    assert for_mount(default, single_node=False) is None and not caplog.records
    assert for_mount(worker_config(settings(tmp_path, read_workers=1)), single_node=False) is None  # type: ignore[arg-type]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_without_shared_memory_the_mount_is_served_without_workers(core: Core, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Workers are on by default: a sandbox that refuses memfd_create must not stop the mount."""
    from awsomefsd.fuse.transport import KernelTransport

    def refused(_name: str, _flags: int = 0) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    config = worker_config(settings(tmp_path, read_workers=1))  # type: ignore[arg-type]
    transport = KernelTransport(core.ops, tmp_path / "mnt", allow_other=False, entry_timeout_s=1, attr_timeout_s=1,
                                negative_timeout_s=None, observe=lambda *_: None, report_eio=lambda *_: None,
                                read_workers=config)
    assert transport.read_workers is None and transport.hot is None
    assert "read workers off" in caplog.text
