"""Who sent a request: what the kernel's header does not say (supplementary groups) from /proc."""

from __future__ import annotations

from awsomefsd.fs.ops_base import InGroup


def caller_in_group(uid: int, gid: int, pid: int) -> InGroup:
    """Whether the process that sent a request is in a group (its own, or a supplementary one,
    which only /proc tells), or is root. Asked only about a set-group-ID file without group
    execute, so /proc is read rarely."""

    def in_group(group: int) -> bool:
        return uid == 0 or group == gid or group in process_groups(pid)

    return in_group


def process_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of `pid` (none when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()
