"""Which requests the /dev/fuse reader answers itself instead of starting a task for each.

A task costs more than a request that waits for nothing (docs/fuse-transport.md, "Reading"), but
a request the reader serves must never wait for something only another request can bring: the
reader reads nothing meanwhile. What is safe differs between a single node and a cluster member.
"""

from __future__ import annotations

from awsomefsd.fuse.kernel.abi import Op

INLINE_SINGLE_NODE = frozenset({
    Op.LOOKUP, Op.GETATTR, Op.READLINK, Op.OPENDIR, Op.READDIR, Op.READDIRPLUS, Op.RELEASEDIR, Op.STATFS,
    Op.GETXATTR, Op.LISTXATTR, Op.REMOVEXATTR, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.LINK,
    Op.UNLINK, Op.RMDIR, Op.RENAME, Op.RENAME2, Op.CREATE, Op.TMPFILE, Op.FORGET, Op.BATCH_FORGET, Op.RELEASE,
})
"""Requests the reader answers itself on a single node, where they wait for nothing: the metadata
log applies at once and no other node is asked. A task costs more than such a request (measured
in docs/fuse-transport.md). Reads and syncs wait for the device: they get tasks; so does a flush
of a file with buffered data, a write the buffer cannot take at once (it flushes first, or waits
for room), a SETATTR that truncates or must flush the file first (or wait for a flush holding it),
an OPEN with O_TRUNC, and a SETXATTR of the tiering attribute, which waits for the object store
(`KernelHandlers.quick`). An inline write may be applied before a write to the same file that
arrived earlier and waits in its task, as two tasks may run in either order: the kernel never has
two writes of the same page in flight (a buffered write holds the inode lock, and writeback waits
for a page's last WRITE to be answered before it sends the page again).
On a cluster member most requests get a task: a lookup may wait for a delegation, and a catch-up for
the invalidator, whose notifications may wait for a request the reader must be free to read. There
the reader serves only these sets, and the requests `KernelHandlers.member_quick` finds waiting for
nothing this time: a look, a create, an unlink or a rename in directories whose delegations the
node holds, a write or an attribute change of a file whose write lease it holds (design note 126),
an OPENDIR of such a directory and an OPEN of such a file with no invalidation pending (note 150)."""

INLINE_MEMBER = frozenset({Op.GETXATTR, Op.LISTXATTR, Op.READLINK, Op.STATFS, Op.READDIR, Op.READDIRPLUS,
                           Op.RELEASEDIR, Op.RELEASE, Op.FORGET, Op.BATCH_FORGET})
"""What a member's reader answers itself: these read the member's own copy of the metadata, or
drop a handle or a kernel reference, and wait for nothing (no delegation, no device, no other
node: a listing's catch-up was its OPENDIR's; an orphan a release or a forget leaves is queued for
the orphan task, `Coherence.release_orphan`). The kernel asks GETXATTR (security.capability)
before every write() of a FUSE file: an untar on a member sent two a file, each a task (design
notes 114 and 124; tests/unit/test_member_inline.py)."""
INLINE_MEMBER_CACHING = INLINE_MEMBER | {Op.GETATTR}
"""On a member that lets the kernel cache (not `strict`), a GETATTR answers from its own copy
too: a change made elsewhere reaches the kernel as an invalidation, not through a catch-up."""
