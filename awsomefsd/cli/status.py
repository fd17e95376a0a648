"""`awsomefsd status`: what an operator needs at a glance, as a table or as JSON.

It reads the last committed metadata (awsomefsd.meta.inspect: a reader beside the running daemon),
the superblock and the kernel's mount table; it never writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from awsomefsd import __version__
from awsomefsd.config import Settings
from awsomefsd.fuse.mount import FSTYPE
from awsomefsd.io.layout import BLOCK_SIZE


def _mounts(own: Path | None) -> list[str]:
    """This node's mounts: its mount point and the bind mounts of it (CSI volumes), which share its
    device number. Other nodes' mounts on the same machine (a test cluster in network namespaces)
    are not this node's. Without a known mount point (no daemon running and none configured) no
    mount can be told to be this node's: none is listed."""
    from awsomefsd.csi.mounts import mount_table

    if own is None:
        return []
    ours = [m for m in mount_table() if m.fs_type == FSTYPE]
    devices = {m.device for m in ours if m.mount_point == str(own)}
    return [m.mount_point for m in ours if m.device in devices]


def _own_mount(settings: Settings, running: bool) -> Path | None:
    """Where this node's daemon mounted its file system (it records that in its state directory),
    else where the settings say it would."""
    from awsomefsd.daemon.node import MOUNT_RECORD

    record = settings.node.state_dir / MOUNT_RECORD
    if running and record.exists():
        return Path(record.read_text().strip())
    return settings.mount.path.resolve() if settings.mount.path else None


def collect_status(settings: Settings, *, running: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "version": __version__,
        "node": settings.node.name,
        "state_dir": str(settings.node.state_dir),
        "daemon_running": running,
        "mounts": _mounts(_own_mount(settings, running)),
        "role": "leader (single member)",
        "healthy": True,
        "problems": [],
    }
    info["device"] = _device_status(settings.device.path, info)
    info["metadata"] = _meta_status(settings.node.state_dir / "meta", info)
    if settings.tier.enabled:
        info["tier"] = _tier_status(settings, info)
    return info


def site_status(settings: Settings, info: dict[str, Any]) -> dict[str, Any] | None:
    """The link to another site, as this running node sees it (`awsomefsd site status`); None
    when it serves no site link (no control socket)."""
    from awsomefsd.cluster.rpc import control_call
    from awsomefsd.cluster.state import control_socket

    if not control_socket(settings.node.state_dir).exists():
        return None
    try:
        reply = control_call(str(control_socket(settings.node.state_dir)), {"op": "site_status"}, timeout_s=5)
    except ConnectionError:
        reply = {"error": "no answer"}
    if "error" in reply:
        info["problems"].append(f"the site link does not answer: {reply['error']}")
        info["healthy"] = False
        return None
    if reply["linked"] and not reply["link_up"] and not reply.get("elsewhere"):
        info["problems"].append(f"the link to site {reply['peer']} is down: {reply['last_error']}")
        info["healthy"] = False
    if reply["linked"] and reply.get("inbound", {}).get("refused"):
        info["problems"].append(reply["inbound"]["refused"])
        info["healthy"] = False
    return reply


def _tier_status(settings: Settings, info: dict[str, Any]) -> dict[str, Any]:
    from awsomefsd.cli.tier import tier_summary

    tier = tier_summary(settings)
    engine = (tier.get("node") or {}).get("engine", {})
    if tier.get("store_error"):  # asked just now (tier_summary)
        info["healthy"] = False
        info["problems"].append(f"the object store does not answer: {tier['store_error']}")
    elif info["daemon_running"] and engine and not engine.get("store_ok", True):
        info["healthy"] = False
        info["problems"].append(f"the object store fails: {engine.get('last_error', '')}")
    return tier


def _device_status(path: Path | None, info: dict[str, Any]) -> dict[str, Any]:
    from awsomefsd.io.device import BlockDevice
    from awsomefsd.io.errors import DeviceError
    from awsomefsd.io.superblock import read_superblock

    if path is None:
        info["problems"].append("no device configured")
        info["healthy"] = False
        return {}
    try:
        device = BlockDevice.open(path)
    except (OSError, DeviceError) as exc:
        info["problems"].append(f"device {path}: {exc}")
        info["healthy"] = False
        return {"path": str(path)}
    try:
        reading = read_superblock(device)
    except DeviceError as exc:
        info["problems"].append(f"device {path}: {exc}")
        info["healthy"] = False
        return {"path": str(path)}
    finally:
        device.close()
    sb = reading.superblock
    if not (reading.primary_ok and reading.copy_ok):
        info["problems"].append("a superblock copy is damaged: run fsck --repair")
        info["healthy"] = False
    return {
        "path": str(path), "cluster_id": str(sb.cluster_id), "device_id": str(sb.device_id),
        "size_bytes": sb.size_bytes, "block_size": sb.block_size, "allocation_groups": sb.layout.ag_count,
        "direct_io": device.direct, "superblock_primary_ok": reading.primary_ok,
        "superblock_copy_ok": reading.copy_ok,
    }


def _meta_status(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    from awsomefsd.meta.inspect import read_summary

    if not (path / "data.mdb").exists():
        info["problems"].append(f"no metadata in {path}")
        info["healthy"] = False
        return {}
    summary = read_summary(path)
    return {
        "raft": _raft_status(summary.raft, info),
        "path": str(path),
        "applied_index": summary.applied_index,
        "inodes": summary.inodes,
        "free_bytes": summary.free_blocks * BLOCK_SIZE,
        "orphans": summary.orphans,
        "pending_free_records": summary.pending_free_records,
        "volumes": [{
            "id": vol.id, "kind": vol.kind, "name": vol.name, "capacity_bytes": vol.capacity_bytes,
            "used_bytes": vol.used_bytes, "used_inodes": vol.used_inodes,
        } for vol in summary.volumes],
        "map_size_bytes": summary.map_size_bytes,
    }


def _raft_status(raft: dict[str, Any] | None, info: dict[str, Any]) -> dict[str, Any] | None:
    """Term, leader, commit/applied index and match indexes when the metadata runs on Raft.

    What is durable is read from the store. Leadership and match indexes live in the daemon's
    memory; for a one-member group they follow from the durable state: the only voter leads while
    the daemon runs, and its match index is its last log index.
    """
    if raft is None:
        return None
    voters = raft["voters"]
    one_member = isinstance(voters, list) and len(voters) == 1
    raft["leader"] = voters[0] if one_member and info["daemon_running"] else None
    raft["match_index"] = {str(voters[0]): raft["last_index"]} if one_member else {}
    info["role"] = "leader (raft, one member)" if raft["leader"] else info["role"]
    return raft


def render_status(info: dict[str, Any]) -> str:
    dev = info.get("device", {})
    meta = info.get("metadata", {})
    size = dev.get("size_bytes", 0)
    free = meta.get("free_bytes", 0)
    rows = [
        ("awsomefsd", info["version"]),
        ("node", f"{info['node']} ({'running' if info['daemon_running'] else 'stopped'}, {info['role']})"),
        ("cluster", dev.get("cluster_id", "-")),
        ("device", f"{dev.get('path', '-')}  {_human(size)}  direct I/O: {dev.get('direct_io', '-')}"),
        ("space", f"{_human(free)} free of {_human(size)}" if size else "-"),
        ("metadata", f"{meta.get('inodes', '-')} inodes, applied index {meta.get('applied_index', '-')}, "
                     f"{meta.get('orphans', 0)} orphans"),
        *(_raft_rows(meta.get("raft")) if not info.get("cluster") else _cluster_rows(info["cluster"])),
        ("mounts", ", ".join(info["mounts"]) or "none"),
        ("volumes", str(len(meta.get("volumes", [])))),
        *([("object store", f"{_human(info['tier']['tiered_bytes'])} of file data in {info['tier']['objects']} "
                            f"objects ({info['tier']['store']})")] if info.get("tier") else []),
        *(_site_rows(info["site"]) if info.get("site") else []),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for vol in meta.get("volumes", []):
        lines.append(f"{'':{width}}  {vol['kind']} {vol['name']}: {_human(vol['used_bytes'])} used"
                     + (f" of {_human(vol['capacity_bytes'])}" if vol["capacity_bytes"] else ""))
    lines.append(f"{'health'.ljust(width)}  " + ("OK" if info["healthy"] else "; ".join(info["problems"])))
    lines.append(f"{'as of'.ljust(width)}  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return "\n".join(lines)


def _site_rows(site: dict[str, Any]) -> list[tuple[str, str]]:
    if not site["linked"]:
        return [("site link", f"not linked (listener {site['listen']})")]
    if site.get("elsewhere"):
        return [("site link", f"to {site['peer']}: runs on another member ({site['elsewhere']}); "
                              f"{site['open_conflicts']} open conflicts")]
    out, inn = site["outbound"], site["inbound"]
    return [("site link", f"to {site['peer']}: {'up' if site['link_up'] else 'DOWN'}; out {out['pending_operations']} "
                          f"pending, lag {out['lag_s']:.1f} s; in {inn['pending_operations']} pending, lag "
                          f"{inn['lag_s']:.1f} s; {site['open_conflicts']} open conflicts")]


def _raft_rows(raft: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not raft:
        return []
    matches = ", ".join(f"{k}:{v}" for k, v in raft["match_index"].items()) or "-"
    return [("raft", f"term {raft['term']}, leader {raft['leader'] or '-'}, commit {raft['commit_index']}, "
                     f"applied {raft['applied_index']}, last {raft['last_index']}, match {matches}")]


_LINKS = {"grpc": ", sent to over gRPC (a build without the Raft wire: upgrade it)",
          "none": ", no connection to it now"}
"""How this node sends Raft's messages to a member, when it is not the wire (design note 125)."""


def _cluster_rows(cluster: dict[str, Any]) -> list[tuple[str, str]]:
    """The running member's view: the group, then one row per node (role, lag, lease, groups)."""
    raft = cluster["raft"]
    rows = [("raft", f"term {raft['term']}, leader {raft['leader'] or 'none'}, commit {raft['commit_index']}, "
                     f"applied {raft['applied_index']}, last {raft['last_index']}")]
    for node in cluster["nodes"]:
        lag = "-" if node["lag"] is None else f"lag {node['lag']}"
        alive = "removed" if node["state"] == "removed" else ("lease EXPIRED" if node["expired"] else "lease ok")
        link = _LINKS.get(node.get("link") or "", "")
        rows.append((f"node {node['id']}", f"{node['name']} {node['address']}  {node['role']}, {lag}, {alive} "
                                           f"(epoch {node['lease_epoch']}), {node['groups']} groups{link}"))
    level = cluster.get("log_level")
    if level and level["cluster"] < level["this_build"]:
        rows.append(("log level", f"{level['cluster']} (this build: {level['this_build']}): a member runs an older "
                                  f"build or does not answer; punching holes and cloning wait for the upgrade"))
    if cluster.get("lag_error"):
        rows.append(("lag", f"unknown: {cluster['lag_error']}"))
    elif cluster.get("lag_from") and cluster["lag_from"] != "this node":
        rows.append(("lag", f"as the leader ({cluster['lag_from']}) sees it"))
    ahead = cluster.get("ahead")
    if ahead:
        held = "" if ahead["delegations"] is None else f", {ahead['delegations']} directory delegations held"
        if ahead.get("sent") or ahead.get("served"):  # design note 145
            held += f"; creates made by other holders {ahead['sent']}, made here for others {ahead['served']}"
        rows.append(("ahead", f"{ahead['pending']} changes waiting for the log, {ahead['acknowledged']} acknowledged "
                              f"ahead since start, {ahead['lost']} lost{held}"))
    lease = cluster.get("lease")
    if lease:
        rows.append(("this node", f"lease {'valid' if lease['fence_open'] else 'EXPIRED: writes fenced'}, "
                                  f"{lease['remaining_s']:.1f}s left, epoch {lease['epoch']}"))
    return rows


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(n)
