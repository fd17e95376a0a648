"""Where AwsomeFS answers as ext4 does although nothing in its own design asks for it.

Programs are written against ext4: they probe xattr namespaces, read a directory's size, and
expect the errno ext4 gives. Keeping these rules in one place keeps `operations.py` about the
filesystem itself and lets the mounted tests compare each rule with ext4 on a loop device.
"""

from __future__ import annotations

import errno

from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode, check_xattr_name

XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
"""The namespaces Linux has a handler for. ext4 (through the VFS's xattr_resolve_name) refuses a
name outside them with EOPNOTSUPP, and a bare prefix (`user.`) with EINVAL. FUSE hands us every
name unfiltered, so without this check `bogus.x` was stored, listed and copied by `cp -a`."""

SYSTEM_XATTRS_HANDLED = (b"system.posix_acl_access", b"system.posix_acl_default")
"""The only system.* names ext4 knows. The file layer refuses to set them (ACLs are not supported,
see xattr_ops.POSIX_ACL_XATTRS), reads them as absent and removes them as absent."""

DIR_SIZE = BLOCK_SIZE
"""st_size of a directory. We store entries in the metadata store, not in data blocks, so the
inode's size is 0; but ext4 reports at least one block (4096) and some tools take 0 for "empty"
or divide by it. We report one block whatever the entry count: counting entries on every getattr
would cost a scan of the directory, and no tool we know relies on the size growing."""


def _namespace_of(name: bytes) -> bytes | None:
    """The namespace `name` is in (one of XATTR_NAMESPACES), or None."""
    for prefix in XATTR_NAMESPACES:
        if name.startswith(prefix):
            return prefix
    return None


def check_xattr(name: bytes) -> None:
    """An extended attribute's name as ext4 accepts it: 1 to 255 bytes (ERANGE), in a namespace
    Linux knows (EOPNOTSUPP), with something after the prefix (EINVAL); system.* beyond the
    POSIX ACL names is EOPNOTSUPP, as ext4 has no handler for it. Checked on get, set and remove."""
    check_xattr_name(name)
    prefix = _namespace_of(name)
    if prefix is None:
        raise FsError(errno.EOPNOTSUPP, "extended attribute namespace not supported (user., trusted., security.)")
    if prefix == b"system.":
        if name not in SYSTEM_XATTRS_HANDLED:
            raise FsError(errno.EOPNOTSUPP, "no such system extended attribute")
    elif len(name) == len(prefix):
        raise FsError(errno.EINVAL, "extended attribute name is only a namespace")


def presented_size_blocks(inode: Inode) -> tuple[int, int]:
    """(st_size, st_blocks in 512-byte sectors) the kernel is told for `inode`: a directory is
    reported as one block, as ext4 does for a small directory (see DIR_SIZE)."""
    if inode.is_dir:
        return DIR_SIZE, DIR_SIZE // 512
    return inode.size, inode.blocks * (BLOCK_SIZE // 512)
