"""Volumes as trees of their own (design note 52): where a volume differs from a directory.

A volume's root directory is an entry of the tree's VOLUMES container, named there by its
object id (the same on both sites) and shown as /.volumes/vol-<this site's number>; an object the
peer made joins the volume of the directory it is first shown in; a `VolumeSet` from the peer
makes the volume's record here or grows it. Volumes ship only once every member of a cluster
captures them alike (`replicates_volumes`). Snapshots are per site and never ship (/.snapshots is
outside the replicated tree).

Apart because these few rules are all the showing, capturing and applying of the tree need to
know of volumes; capturing a volume (`_capture_volume`, `delete_volume`) is in capture.py, with
every other capture.
"""

from __future__ import annotations

import errno

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.tree import VOLUMES
from awsomefsd.meta import levels
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import VOLUMES_INO, Inode, volume_dir_name
from awsomefsd.meta.sites.tree import SiteTree


class SiteVolumes(SiteTree):
    """How volumes' roots are named and shown, accounted, and received."""

    def replicates_volumes(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Do volumes ship? On a cluster, only once every member's build captures them alike (a
        replica capturing what another does not would hold other tables: the log level)."""
        cluster = self._sm.cluster
        if not cluster.initialised(txn):
            return True
        return (cluster.log_level(txn) or levels.BASE_LOG_LEVEL) >= levels.VOLUMES_LEVEL

    def shipped_volumes(self, txn: lmdb.Transaction[bytes]) -> dict[str, str]:
        """The volumes that ship, by their root's global id (hex): their directory in /.volumes."""
        found = {}
        for number, record in self._sm.volumes.all(txn):
            obj = self.object_of(txn, record["root"]) if record["kind"] == "volume" else None
            if obj is not None:
                found[obj.hex()] = volume_dir_name(number).decode()
        return found

    def _volume_root(self, txn: lmdb.Transaction[bytes], obj: bytes) -> Inode | None:
        """The root directory of a volume, if `obj` is one here (a volume's number is its root's)."""
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        return inode if inode is not None and inode.parent == VOLUMES_INO and inode.volume == inode.ino else None

    def _apply_volume(self, txn: lmdb.Transaction[bytes], op: o.VolumeSet) -> None:
        root = self._volume_root(txn, op.object)
        if root is not None:
            self._sm.volumes.grow(txn, root.volume, op.capacity, op.inode_limit)
            return
        if self._ino(txn, op.object) is not None:
            raise FsError(errno.EINVAL, f"volume {op.object.hex()} names an object that is no volume here")
        number = self._sm.next_ino(txn)
        self._set_ids(txn, VOLUMES_INO, VOLUMES)  # (as in _capture_volume: a site linked at level 10 has none)
        self._sm.volumes.receive_volume(txn, number, op.name.decode(errors="replace"), op.stamp.site.hex()[:8],
                                        op.capacity, op.inode_limit, op.stamp.wall_ns)
        self._set_ids(txn, number, op.object)

    def _tree_name(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes) -> bytes:
        """The name a local move gives `node` in the tree: the name itself, but for a volume's
        root, whose shown name (vol-<number>) differs between the sites, its object id."""
        return self._entry_object(txn, node).hex().encode() if parent_ino == VOLUMES_INO else name

    def _shown_name(self, txn: lmdb.Transaction[bytes], parent: bytes, node: bytes, name: bytes) -> bytes:
        """The name this site shows `node` under: a volume's root as vol-<this site's number>."""
        if parent != VOLUMES:
            return name
        ino = self._ino(txn, self._entry_object(txn, node))
        assert ino is not None
        return volume_dir_name(self.ns.require_inode(txn, ino).volume)

    def _join_volume(self, txn: lmdb.Transaction[bytes], child: Inode, parent: Inode) -> None:
        """An object the peer made takes the volume of the directory it is first shown in (it
        came into being with no place): its blocks and itself count there from now on."""
        if child.volume == parent.volume or parent.ino == VOLUMES_INO:
            return
        volumes = self._sm.volumes
        volumes.charge(txn, child.volume, blocks=-child.blocks, inodes=-1, enforce=False)
        volumes.charge(txn, parent.volume, blocks=child.blocks, inodes=1, enforce=False)
        child.volume = parent.volume
