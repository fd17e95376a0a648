"""The POSIX operations on extended attributes, and the one attribute that is no stored attribute:
a file's tiering (`TIER_XATTR`), read and moved through the mount. Part of `Operations`
(fs/operations.py), over the state and helpers of fs/ops_base.py.
"""

from __future__ import annotations

import errno
import json

from awsomefsd.fs.ops_base import OperationsBase
from awsomefsd.fs.posix import check_xattr
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import is_tiered

POSIX_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
TIER_XATTR = b"trusted.awsomefs.tier"
"""A file's tiering, read and changed through the mount (the kernel lets only CAP_SYS_ADMIN use
`trusted.` names): reading it gives JSON with the file's bytes on the device and in the object
store; writing `evict` moves its data to the store now, `recall` brings it back (`awsomefsd tier
evict|recall PATH`). It is never stored, and listxattr does not show it (cp -a does not copy it)."""


class XattrOperations(OperationsBase):
    """getxattr, setxattr, listxattr and removexattr, with the tier attribute."""

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        check_xattr(name)
        if name == TIER_XATTR:
            return self._tier_state(ino)
        value = self.meta.xattr(ino, name)
        if value is None:
            self.meta.require_inode(ino)
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        check_xattr(name)
        if name in POSIX_ACL_XATTRS:
            # Stored as a plain attribute it would not change the mode, and cp -p, tar and rsync
            # set modes through it when it is accepted; refused, they fall back to chmod.
            raise FsError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")
        if name == TIER_XATTR:
            await self._tier_move(ino, value)
            return
        async with self._holding(ino) as ahead:
            await self._propose(c.SetXattr(ino, name, value, flags, self._now()), ahead)

    def _tier_state(self, ino: int) -> bytes:
        inode = self.meta.require_inode(ino)
        device = tiered = 0
        for ext in self.meta.all_extents(ino) if inode.is_reg else []:
            if is_tiered(ext.dev_block):
                tiered += ext.count * BLOCK_SIZE
            elif not ext.unwritten:
                device += ext.count * BLOCK_SIZE
        state: dict[str, object] = {"device_bytes": device, "tiered_bytes": tiered,
                                    "buffered": self.data.has_buffered(ino)}
        if ino in self._tier_failed:
            state["error"] = self._tier_failed[ino]
        return json.dumps(state).encode()

    async def _tier_move(self, ino: int, value: bytes) -> None:
        self._tier_failed.pop(ino, None)
        try:
            await self._tier_move_now(ino, value)
        except FsError as exc:
            while len(self._tier_failed) >= 1024:
                del self._tier_failed[next(iter(self._tier_failed))]
            self._tier_failed[ino] = str(exc.args[1])
            raise

    async def _tier_move_now(self, ino: int, value: bytes) -> None:
        inode = self.meta.require_inode(ino)
        if not inode.is_reg:
            raise FsError(errno.EINVAL, "only regular files have data to tier")
        if value == b"evict":
            if self.evict is None:
                raise FsError(errno.EOPNOTSUPP, "no object store is configured ([tier] endpoint)")
            await self.data.flush(ino)
            await self.evict(ino)
        elif value == b"recall":
            self.meta.check_writable(inode.volume)  # EROFS: a snapshot's data stays shared with its origin
            await self.data.flush(ino)
            await self.data.recall(ino)
        else:
            raise FsError(errno.EINVAL, f"{TIER_XATTR.decode()} takes 'evict' or 'recall'")

    async def listxattr(self, ino: int) -> list[bytes]:
        self.meta.require_inode(ino)
        return self.meta.xattr_names(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        check_xattr(name)
        async with self._holding(ino) as ahead:
            await self._propose(c.RemoveXattr(ino, name, self._now()), ahead)
