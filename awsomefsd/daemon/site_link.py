"""The link to another site, as a node runs it (awsomefsd/repl/ is the link itself): its service,
its `site` commands' control socket (a single node's own; a cluster member's beside the member's),
its metrics, and the kernel invalidations of what the other site changes."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from awsomefsd.config import Settings
    from awsomefsd.daemon.node import Core, MemberSite
    from awsomefsd.fuse.invalidate import Invalidator


async def start_site(nursery: trio.Nursery, core: Core, settings: Settings, member: MemberSite | None,
                     invalidator: Invalidator) -> None:
    """The link to another site ([site] listen) and the `site` commands' handlers: on a single
    node on a control socket of their own, on a cluster member beside the member's. What the
    other site changes is told to the kernel through `invalidator`."""
    from awsomefsd.cluster.rpc import CONTROL_LIMITS, ControlService
    from awsomefsd.cluster.state import control_socket
    from awsomefsd.config.addresses import join_host_port, split_host_port
    from awsomefsd.daemon.node import NodeError
    from awsomefsd.fuse.invalidate import changed_targets, targets
    from awsomefsd.repl.service import SiteService
    from awsomefsd.rpc.bridge import serve_grpc

    def advertise() -> list[str]:
        if settings.site.advertise or member is None:
            return list(settings.site.advertise)
        port = split_host_port(settings.site.listen)[1]
        return [join_host_port(host, port) for host in member.member_hosts()]

    core.meta.hear_site_side_effects(lambda changed: invalidator.submit(changed_targets(changed)))
    try:
        site = SiteService(core.meta, core.data, core.ops, site=core.superblock.cluster_id,
                           state_dir=settings.node.state_dir, listen=settings.site.listen,
                           advertise=advertise, batch_operations=settings.site.batch_operations,
                           batch_bytes=settings.site.batch_bytes, mount=settings.mount.path,
                           pushes_in_flight=settings.site.pushes_in_flight,
                           applied=lambda command, result: invalidator.submit(targets(command, result)),
                           elsewhere=(lambda: None) if member is None else member.elsewhere,
                           credentials=None if member is None else member.credentials,
                           outbox_max_operations=settings.site.outbox_max_operations)
        core.data.compactor.moved = site.blocks_moved
        await nursery.start(site.run)
    except (ValueError, OSError) as exc:
        raise NodeError(f"the site link listener on {settings.site.listen}: {exc}") from None
    core.metrics.add_collector(site.collect_metrics)
    if member is not None:
        member.control.update(site.control_handlers())
        return
    await nursery.start(functools.partial(serve_grpc, [ControlService(site.control_handlers()).binding()],
                                          f"unix://{control_socket(settings.node.state_dir)}", limits=CONTROL_LIMITS))
