"""Reading and writing the namespace tables: inodes, directory entries, readdir cookies, xattrs.

These are the primitive table operations shared by the state machine (which writes) and the
metadata reader used by FUSE (which only reads); they enforce no POSIX rules beyond name validity.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import lmdb

from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import (
    INODE_MODE,
    MAX_NAME_BYTES,
    U64,
    U64_PAIR,
    Inode,
    check_name,
    cookie_key,
    dentry_key,
    dentry_value,
    read_dentry_value,
    u64,
    xattr_key,
)


class Namespace:
    def __init__(self, store: object) -> None:
        db = store.db  # type: ignore[attr-defined]
        self.inodes = db["inodes"]
        self.dentries = db["dentries"]
        self.cookies = db["cookies"]
        self.xattr_db = db["xattrs"]
        self.symlinks = db["symlinks"]

    # -- inodes ---------------------------------------------------------------------------------
    def get_inode(self, txn: lmdb.Transaction[bytes], ino: int) -> Inode | None:
        data = txn.get(u64(ino), db=self.inodes)
        return None if data is None else Inode.unpack(ino, data)

    def require_inode(self, txn: lmdb.Transaction[bytes], ino: int) -> Inode:
        data = txn.get(u64(ino), db=self.inodes)
        if data is None:
            raise FsError(errno.ENOENT)
        return Inode.unpack(ino, data)

    def put_inode(self, txn: lmdb.Transaction[bytes], inode: Inode) -> None:
        txn.put(u64(inode.ino), inode.pack(), db=self.inodes)

    def delete_inode(self, txn: lmdb.Transaction[bytes], ino: int) -> None:
        txn.delete(u64(ino), db=self.inodes)

    def dir_for_entry(self, txn: lmdb.Transaction[bytes], parent_ino: int, name: bytes) -> Inode:
        """The parent directory of a new or existing entry, after checking the name is valid."""
        if len(name) > MAX_NAME_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        parent = self.require_inode(txn, parent_ino)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        if parent.nlink == 0:
            raise FsError(errno.ENOENT, "directory was removed")
        check_name(name)
        return parent

    # -- directory entries ----------------------------------------------------------------------
    def lookup(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes) -> int | None:
        data = txn.get(dentry_key(parent, name), db=self.dentries)
        return None if data is None else read_dentry_value(data)[0]

    def lookup_entry(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes) -> tuple[int, int] | None:
        """(child, cookie) of an entry."""
        data = txn.get(dentry_key(parent, name), db=self.dentries)
        return None if data is None else read_dentry_value(data)

    def add_entry(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, child: int, cookie: int) -> None:
        txn.put(dentry_key(parent, name), dentry_value(child, cookie), db=self.dentries)
        txn.put(cookie_key(parent, cookie), name, db=self.cookies)

    def remove_entry(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes) -> int:
        key = dentry_key(parent, name)
        data = txn.get(key, db=self.dentries)
        assert data is not None, (parent, name)
        child, cookie = read_dentry_value(data)
        txn.delete(key, db=self.dentries)
        txn.delete(cookie_key(parent, cookie), db=self.cookies)
        return child

    def replace_entry(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, child: int) -> None:
        """Point an existing entry at another inode, keeping its readdir position."""
        key = dentry_key(parent, name)
        data = txn.get(key, db=self.dentries)
        assert data is not None, "replace_entry: callers looked the entry up in this transaction"
        _, cookie = read_dentry_value(data)
        txn.put(key, dentry_value(child, cookie), db=self.dentries)

    def has_entries(self, txn: lmdb.Transaction[bytes], parent: int) -> bool:
        return has_records(txn, self.dentries, parent)

    def entries(self, txn: lmdb.Transaction[bytes], parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(cookie, name, child) in cookie order, strictly after `after_cookie`: stable offsets for
        readdir, unaffected by entries added or removed elsewhere in the directory."""
        cursor = txn.cursor(self.cookies)
        if not cursor.set_range(cookie_key(parent, after_cookie + 1)):
            return
        for key, name in cursor:
            p, cookie = U64_PAIR.unpack(key)
            if p != parent:
                return
            child = self.lookup(txn, parent, name)
            assert child is not None, (parent, name)
            yield cookie, bytes(name), child

    def entry_records(self, txn: lmdb.Transaction[bytes], parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int, bytes]]:
        """(cookie, name, child, packed inode) in cookie order, strictly after `after_cookie`: the
        walk both listings share (`listing`, `entries_with_inodes`)."""
        cursor = txn.cursor(self.cookies)
        if not cursor.set_range(cookie_key(parent, after_cookie + 1)):
            return
        # Cursors, not txn.get: consecutive entries' records mostly sit on the page the cursor is
        # on, which LMDB checks before searching from the root (a third less per lookup).
        dentries, inodes = txn.cursor(self.dentries), txn.cursor(self.inodes)
        prefix = U64.pack(parent)
        number_at = U64.unpack_from
        for key, name in cursor:
            if key[:8] != prefix:
                return
            found = dentries.set_key(prefix + name)
            assert found, (parent, name)
            child_key = dentries.value()[:8]
            if inodes.set_key(child_key):
                yield number_at(key, 8)[0], name, number_at(child_key)[0], inodes.value()

    def listing(self, txn: lmdb.Transaction[bytes], parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int, int]]:
        """(cookie, name, child, mode): what a plain readdir needs. It decodes no inode record and
        builds no object per entry (with both, a listing cost twice as much)."""
        mode_of = INODE_MODE.unpack_from
        for cookie, name, child, data in self.entry_records(txn, parent, after_cookie):
            yield cookie, name, child, mode_of(data)[0]

    def entries_with_inodes(self, txn: lmdb.Transaction[bytes], parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, Inode]]:
        """(cookie, name, inode): what a readdirplus needs."""
        unpack = Inode.unpack
        for cookie, name, child, data in self.entry_records(txn, parent, after_cookie):
            yield cookie, name, unpack(child, data)

    def names(self, txn: lmdb.Transaction[bytes], parent: int, start: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(name, child) in name order, from the first name at or after `start` (for fsck and tree
        walks; a walk in slices resumes where it stopped: meta/sites/seeding.py)."""
        cursor = txn.cursor(self.dentries)
        prefix = u64(parent)
        if not cursor.set_range(prefix + start):
            return
        for key, value in cursor:
            if key[:8] != prefix:
                return
            yield bytes(key[8:]), read_dentry_value(value)[0]

    # -- xattrs and symlinks --------------------------------------------------------------------
    def xattrs(self, txn: lmdb.Transaction[bytes], ino: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; the name is key[8:]."""
        for key, value in self._xattr_records(txn, ino):
            if len(key) > 8:  # the empty name is the usage record, not an attribute
                yield key, value

    def _xattr_records(self, txn: lmdb.Transaction[bytes], ino: int) -> Iterator[tuple[bytes, bytes]]:
        cursor = txn.cursor(self.xattr_db)
        prefix = u64(ino)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if key[:8] != prefix:
                return
            yield bytes(key), bytes(value)

    def xattr_usage(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[int, int]:
        """(bytes of keys and values, bytes of the name list listxattr returns) of the inode's
        xattrs: kept in a record of their own so that a set costs the same with 10 or 10,000
        attributes; counted once where the record is missing (a clone, an older filesystem)."""
        raw = txn.get(xattr_key(ino, b""), db=self.xattr_db)
        if raw is not None:
            return XATTR_USAGE.unpack(raw)  # type: ignore[return-value]
        total = names = 0
        for key, value in self.xattrs(txn, ino):
            total += len(key) + len(value)
            names += len(key) - 8 + 1
        return total, names

    def put_xattr_usage(self, txn: lmdb.Transaction[bytes], ino: int, total: int, names: int) -> None:
        txn.put(xattr_key(ino, b""), XATTR_USAGE.pack(total, names), db=self.xattr_db)

    def delete_xattrs(self, txn: lmdb.Transaction[bytes], ino: int) -> None:
        for key, _ in list(self._xattr_records(txn, ino)):
            txn.delete(key, db=self.xattr_db)

    def get_xattr(self, txn: lmdb.Transaction[bytes], ino: int, name: bytes) -> bytes | None:
        return txn.get(xattr_key(ino, name), db=self.xattr_db)

    def symlink_target(self, txn: lmdb.Transaction[bytes], ino: int) -> bytes:
        target = txn.get(u64(ino), db=self.symlinks)
        if target is None:
            raise FsError(errno.EINVAL)
        return bytes(target)


XATTR_USAGE = struct.Struct(">QQ")


def has_records(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int) -> bool:
    """Does a table keyed by inode number first (entries, xattrs, block map) hold any record of
    `ino`? One cursor seek: cheaper than opening a scan that finds nothing, as deleting an
    empty file with no attributes does."""
    cursor = txn.cursor(db)
    prefix = u64(ino)
    return cursor.set_range(prefix) and cursor.key()[:8] == prefix

__all__ = ["U64", "Namespace", "check_name", "has_records"]
