"""What the `site` commands ask of a running daemon's link (through the control socket):
its status and metrics, a comparison of both sites' trees, and an operator's resolution of a
conflict.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import trio
from prometheus_client import Metric

from awsomefsd.cluster.rpc import ControlError
from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.metrics import counter, gauge
from awsomefsd.repl.endpoint import LINK_SERVICE, MAX_DELEGATIONS_PER_BATCH, Endpoint, why_failed
from awsomefsd.rpc.bridge import unary_call

log = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 3600.0


class Control(Endpoint):
    """The answers to the `site` commands, a job of `SiteService`."""

    def status(self) -> dict[str, Any]:
        link = self.meta.site_link()
        open_conflicts, conflicts_total = self.meta.site_conflict_counts()
        pending = self.meta.site_outbox(self.state.peer_applied, 1) if link else []
        now = time.time_ns()
        return {
            "site": str(self.site),
            "listen": self.listen,
            "linked": link is not None,
            "elsewhere": self.elsewhere(),  # on a cluster: None on the member that runs the link
            "peer": None if link is None else str(uuid.UUID(link["peer"])),
            "peer_addresses": [] if link is None else link["addresses"],
            "link_up": self.state.up,
            "last_error": self.state.last_error,
            "last_exchange_ns": self.state.last_exchange_ns,
            "outbound": {"pending_operations": self.meta.site_pending(self.state.peer_applied) if link else 0,
                         "lag_s": round(max(0, now - pending[0][0].wall_ns) / 1e9, 3) if pending else 0.0,
                         "operations": self.state.pushed_ops, "bytes": self.state.pushed_bytes,
                         "bytes_unchanged": self.state.unchanged_bytes},
            "inbound": {"pending_operations": self.state.peer_pending, "lag_s": self.state.peer_lag_s,
                        "operations": self.state.received_ops, "bytes": self.state.received_bytes,
                        "refused": self.state.inbound_refused},
            "open_conflicts": open_conflicts,
            "conflicts_total": conflicts_total,
            "capture_paused": link is not None and self.meta.site_capture_paused(),
            "outbox_operations": self.meta.site_outbox_operations() if link else 0,
            "outbox_max_operations": self.outbox_max_operations,
            "seeding": self.meta.site_seeding() if link else None,  # the initial sync's walk, while left
            "kept_for": None if link is not None or (kept := self.meta.site_kept_peer()) is None
            else str(uuid.UUID(bytes=kept)),  # unlinked: linking this site again pairs up what both hold
        }

    def collect_metrics(self) -> Iterator[Metric]:
        info = self.status()
        yield counter("awsomefs_site_conflicts", "conflicts with the other site, ever", info["conflicts_total"])
        yield gauge("awsomefs_site_open_conflicts", "conflicts whose loser no later write replaced",
                    info["open_conflicts"])
        if info["elsewhere"] is not None or not info["linked"]:
            return  # the link's figures are the member's that runs it (a cluster's leader), once linked
        yield gauge("awsomefs_site_link_up", "1 when the link to the other site is up", int(info["link_up"]))
        yield gauge("awsomefs_site_capture_paused", "1 while capture is paused, the outbox over its bound "
                    "([site] outbox_max_operations)", int(info["capture_paused"]))
        yield gauge("awsomefs_site_outbox_operations", "operations the outbox holds (applied by the other site "
                    "or not, until both sites forget them)", info["outbox_operations"])
        for direction in ("outbound", "inbound"):
            yield gauge(f"awsomefs_site_{direction}_pending_operations",
                        f"operations not yet applied by the receiving site ({direction})",
                        info[direction]["pending_operations"])
            yield gauge(f"awsomefs_site_{direction}_lag_seconds",
                        f"how long the oldest operation not yet applied has waited ({direction})",
                        info[direction]["lag_s"])
            yield counter(f"awsomefs_site_{direction}_operations", f"operations replicated ({direction})",
                          info[direction]["operations"])
            yield counter(f"awsomefs_site_{direction}_bytes", f"file bytes replicated ({direction})",
                          info[direction]["bytes"])
        seeding = info["seeding"] or {"entries_seeded": 0, "directories_left": 0}
        yield gauge("awsomefs_site_seed_directories_left", "directories the initial sync's walk has still to "
                    "seed (0: done)", seeding["directories_left"])
        yield gauge("awsomefs_site_seed_entries", "entries the initial sync's walk seeded so far (0 once done)",
                    seeding["entries_seeded"])
        yield counter("awsomefs_site_outbound_unchanged_bytes",
                      "bytes of large files not sent because the other site had them (delta transfer)",
                      info["outbound"]["bytes_unchanged"])

    async def resolve(self, ident: str, keep: str) -> dict[str, Any]:
        """An operator's choice for one open conflict: what keeping it takes is written through
        the mount (repl/resolve.py), then `ResolveConflict` closes the record on both sites."""
        from awsomefsd.repl.resolve import ResolveError, write_back

        if keep not in o.KEEPS:
            raise ControlError(f"keep one of {', '.join(o.KEEPS)}, not {keep!r}")
        if self.meta.site_link() is None:
            raise ControlError("this site is not linked: what /.conflicts keeps is plain files now")
        record = next((r for r in self.meta.site_conflicts() if r["id"] == ident), None)
        if record is None:
            raise ControlError(f"no conflict {ident!r} (`awsomefsd site conflicts` lists them)")
        if not record["open"]:
            raise ControlError(f"conflict {ident} is settled already: {record.get('resolved', 'a later change saw both')}")
        if self.mount is None:
            raise ControlError("this site serves no mount to write the kept version through")
        try:
            done = await trio.to_thread.run_sync(write_back, self.mount, record, keep)
            command = c.ResolveConflict(bytes.fromhex(record["key"]), keep, time.time_ns())
            result = await self.ops.propose_holding(command, tries=MAX_DELEGATIONS_PER_BATCH)
        except (ResolveError, OSError, FsError) as exc:
            raise ControlError(f"conflict {ident}: {exc}") from None
        self.applied(command, result)
        log.info("conflict %s (%s at %s) resolved: %s", ident, record["kind"], record["path"], done)
        return {"id": ident, "kept": keep, "done": done}

    async def verify(self) -> dict[str, Any]:
        """Both trees' digests compared: this site's, and the peer's over the link."""
        from awsomefsd.repl.verify import DigestError, compare, decode_site, local_digest

        link = self.meta.site_link()
        if link is None:
            raise ControlError("this site is not linked")
        try:
            mine = decode_site(await local_digest(self.mount, self.meta.site_volumes()))
            errors = []
            for address in link["addresses"]:
                try:
                    with self._channel(link, address) as channel:
                        header, _ = wire.unframe(await unary_call(channel, f"/{LINK_SERVICE}/Digest", wire.frame({}),
                                                                  VERIFY_TIMEOUT_S))
                    break
                except (grpc.RpcError, OSError, wire.WireError) as exc:
                    errors.append(f"{address}: {why_failed(exc)}")
            else:
                raise ControlError("cannot reach the other site: " + "; ".join(errors))
            theirs = decode_site(header)
        except (DigestError, OSError) as exc:
            raise ControlError(str(exc)) from None
        found = compare(mine, theirs)
        return {"identical": not found, "differences": found, "entries": len(mine.root.records),
                "root_hash": mine.root.root_hash, "peer_root_hash": theirs.root.root_hash}
