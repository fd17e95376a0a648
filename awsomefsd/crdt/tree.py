"""The replicated namespace tree: where every directory entry is, agreed by all sites without
coordination (design note 48).

This is the move operation of Kleppmann, Mulligan, Gomes and Beresford, "A highly-available move
operation for replicated trees" (IEEE TPDS, 2021), with nothing of a file system in it but names:
- A node is a directory entry (a directory, or one name of a file). It has at most one
  placement: (parent, name, the stamp of the move that put it there).
- Every change of placement is a `Move`: creating an entry is a move from nowhere, renaming one is
  a move, deleting one is a move under TRASH. Moves are applied in stamp order on every site: an
  operation that arrives with a stamp older than moves already applied undoes those, applies, and
  redoes them (`apply`). A move that would put a node under itself is skipped, then and on every
  redo where it still would. So every site that has applied the same set of moves has the same
  tree, whatever order they arrived in, and no order of arrival makes a cycle.
- Only the later moves that an older one can change are undone and redone: for a node that had
  no child since the older move's stamp (a file), its own later moves; for a directory, the
  later moves of nodes that had a child since; and where moves arrive in causal order
  (`causal`: sites have one peer each, over a FIFO link), not a new node's first placement
  (`reorders`). Why that is exact is in `_undo_later`; it is what keeps a catch-up after a
  partition linear in the creates and renames both sites made, where undoing everything was
  quadratic (issue 47).
- The log keeps, per move, the placement it replaced, which undo needs, and the moves that a move
  still to come may be concurrent with. `forget_before(stamp)` drops the entries no move still
  to come can need (its docstring says when that is; the caller knows from the peers' cursors).

Concurrency, which the conflict rules need, is not in the stamps: each move says up to which stamp
of each other site its site had applied (`seen`). Two moves of one node are concurrent when
neither site had seen the other's (`concurrent`); `apply` reports those pairs as conflicts.

Names: two sites may give two nodes the same name in one directory. The tree keeps both; the
view (`visible_names`) gives the name to the placement with the greatest stamp and a derived,
deterministic name to the others, so every site shows the same names.

No I/O: the tree lives behind `TreeState`, which the metadata layer implements on its tables and
the tests in memory (`MemoryTree`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from awsomefsd.crdt.hlc import Stamp, happened_before

NodeId = bytes
ROOT: NodeId = b"\x00" * 15 + b"\x01"
TRASH: NodeId = b"\x00" * 15 + b"\x02"
"""Deleted entries live here until every site has moved past their deletion."""
VOLUMES: NodeId = b"\x00" * 15 + b"\x03"
"""The container of volumes' root directories (/.volumes): a second root; a volume's tree hangs
from its root directory's entry here (meta/sites/volumes.py; design note 52)."""
FIXED_NODES = (ROOT, TRASH, VOLUMES)
MAX_DEPTH = 4096
"""Deeper than PATH_MAX (4096 bytes, at least two per level) allows: walking up further is a cycle."""
MAX_NAME_BYTES = 255


class TreeCorruption(AssertionError):
    """The tree state breaks an invariant the algorithm keeps (a cycle, an undo of a move not done)."""


@dataclass(frozen=True, slots=True)
class Placement:
    parent: NodeId
    name: bytes
    stamp: Stamp
    """The move that made this placement: the view breaks name ties with it."""


@dataclass(frozen=True, slots=True)
class Move:
    """Put `node` under `parent` as `name` (a node with no placement yet is created)."""

    stamp: Stamp
    node: NodeId
    parent: NodeId
    name: bytes
    seen: Mapping[bytes, Stamp] = field(default_factory=dict)
    """Per other site, the greatest of its stamps this move's site had applied when it moved."""

    def __post_init__(self) -> None:
        if self.node in FIXED_NODES:
            raise ValueError("the root, the trash and the volumes' container cannot move")
        if not 0 < len(self.name) <= MAX_NAME_BYTES or b"/" in self.name or b"\x00" in self.name:
            raise ValueError(f"not a valid entry name: {self.name!r}")

    def saw(self, other: Move) -> bool:
        """Had this move's site applied `other` when it made this move?"""
        return happened_before(other.stamp, self.stamp, self.seen)


def parents_named(entry: LogEntry) -> tuple[NodeId, ...]:
    """The nodes `entry` names as a parent: its move's, and its `before`'s (the node it left)."""
    before = entry.before
    return (entry.move.parent,) if before is None else (entry.move.parent, before.parent)


def concurrent(a: Move, b: Move) -> bool:
    """Neither move's site knew of the other: both changed the node since they last exchanged."""
    return not a.saw(b) and not b.saw(a)


class TreeState(Protocol):
    """Where the tree's placements are kept; the metadata layer's tables, or memory in tests."""

    def placement(self, node: NodeId) -> Placement | None: ...

    def place(self, node: NodeId, placement: Placement | None) -> None: ...

    def has_children(self, node: NodeId) -> bool:
        """Is some node placed under `node` now?"""
        ...


class MemoryTree:
    """A TreeState in a dict (tests and simulations)."""

    def __init__(self) -> None:
        self.placements: dict[NodeId, Placement] = {}
        self._children: dict[NodeId, int] = {}  # per parent, how many nodes are placed under it

    def placement(self, node: NodeId) -> Placement | None:
        return self.placements.get(node)

    def place(self, node: NodeId, placement: Placement | None) -> None:
        old = self.placements.pop(node, None)
        if old is not None:
            self._children[old.parent] -= 1
            if not self._children[old.parent]:
                del self._children[old.parent]
        if placement is not None:
            self.placements[node] = placement
            self._children[placement.parent] = self._children.get(placement.parent, 0) + 1

    def has_children(self, node: NodeId) -> bool:
        return node in self._children


@dataclass(frozen=True, slots=True)
class LogEntry:
    move: Move
    before: Placement | None
    """The node's placement just before this move was done (or skipped)."""
    done: bool
    """False: skipped, the node would have become its own ancestor."""

    @property
    def reorders(self) -> bool:
        """Must this entry be undone and redone for an older move to apply, where moves arrive in
        causal order? Every entry but a new node's first placement (done, nothing before it):
        `ReplicatedTree._undo_later` says why."""
        return self.before is not None or not self.done


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two concurrent moves of one node; `winner` has the greater stamp and decides where it is."""

    node: NodeId
    winner: Move
    loser: Move


class TreeLog(Protocol):
    """The moves applied so far, in stamp order, with what undo needs; memory in tests
    (`MemoryLog`), the metadata layer's tables in the daemon."""

    def entry_at(self, stamp: Stamp) -> LogEntry | None: ...

    def entries_from(self, stamp: Stamp) -> list[LogEntry]:
        """The entries with stamps at or after `stamp`, in stamp order."""
        ...

    def reordering_from(self, stamp: Stamp) -> list[LogEntry]:
        """The entries with stamps at or after `stamp` that `reorders`, in stamp order (what
        an older move undoes; the log may keep an index of them while a batch applies)."""
        ...

    def remove(self, entries: list[LogEntry]) -> None:
        """Drop these entries (they are about to be redone)."""
        ...

    def append(self, entry: LogEntry) -> None:
        """Add an entry with a stamp greater than every entry's."""
        ...

    def insert(self, entry: LogEntry) -> None:
        """Add an entry at its stamp's place among the others (no entry has its stamp)."""
        ...

    def moves_of(self, node: NodeId) -> list[Move]:
        """The moves of `node` applied and not forgotten (what a new move may conflict with)."""
        ...

    def add_move_of(self, move: Move) -> None: ...

    def parent_since(self, node: NodeId, stamp: Stamp) -> bool:
        """Does an entry with a stamp at or after `stamp` name `node` as its move's parent or as
        its `before`'s parent? (A node that no such entry names and that has no child now had
        none since `stamp`: `ReplicatedTree._undo_later` says why that matters.) May answer True when
        it cannot tell: that costs undo and redo, never a different result."""
        ...

    def forget_through(self, stamp: Stamp) -> int:
        """Drop the entries and the per-node moves with stamps up to `stamp`; returns how many entries."""
        ...


class MemoryLog:
    """A TreeLog in lists (tests and simulations)."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self._stamps: list[Stamp] = []  # the entries' stamps, for bisect
        self._by_node: dict[NodeId, list[Move]] = {}
        self._as_parent: dict[NodeId, list[Stamp]] = {}  # per node, the stamps of entries naming it parent

    def entry_at(self, stamp: Stamp) -> LogEntry | None:
        at = bisect.bisect_left(self._stamps, stamp)
        return self.entries[at] if at < len(self._stamps) and self._stamps[at] == stamp else None

    def entries_from(self, stamp: Stamp) -> list[LogEntry]:
        return self.entries[bisect.bisect_left(self._stamps, stamp):]

    def reordering_from(self, stamp: Stamp) -> list[LogEntry]:
        return [entry for entry in self.entries_from(stamp) if entry.reorders]

    def remove(self, entries: list[LogEntry]) -> None:
        for entry in entries:
            at = bisect.bisect_left(self._stamps, entry.move.stamp)
            assert at < len(self._stamps) and self._stamps[at] == entry.move.stamp, "removing an entry not in the log"
            del self.entries[at], self._stamps[at]
            for parent in parents_named(entry):
                stamps = self._as_parent[parent]
                del stamps[bisect.bisect_left(stamps, entry.move.stamp)]
                if not stamps:
                    del self._as_parent[parent]

    def append(self, entry: LogEntry) -> None:
        assert not self._stamps or entry.move.stamp > self._stamps[-1], "log entries out of stamp order"
        self.insert(entry)

    def insert(self, entry: LogEntry) -> None:
        at = bisect.bisect_left(self._stamps, entry.move.stamp)
        assert at == len(self._stamps) or self._stamps[at] != entry.move.stamp, "two entries with one stamp"
        self.entries.insert(at, entry)
        self._stamps.insert(at, entry.move.stamp)
        for parent in parents_named(entry):
            bisect.insort(self._as_parent.setdefault(parent, []), entry.move.stamp)

    def parent_since(self, node: NodeId, stamp: Stamp) -> bool:
        stamps = self._as_parent.get(node)
        return stamps is not None and stamps[-1] >= stamp

    def moves_of(self, node: NodeId) -> list[Move]:
        return list(self._by_node.get(node, ()))

    def add_move_of(self, move: Move) -> None:
        self._by_node.setdefault(move.node, []).append(move)

    def forget_through(self, stamp: Stamp) -> int:
        at = bisect.bisect_right(self._stamps, stamp)
        for node in {entry.move.node for entry in self.entries[:at]}:
            kept = [m for m in self._by_node[node] if m.stamp > stamp]
            if kept:
                self._by_node[node] = kept
            else:
                del self._by_node[node]
        for parent in {parent for entry in self.entries[:at] for parent in parents_named(entry)}:
            stamps = self._as_parent[parent]
            del stamps[:bisect.bisect_right(stamps, stamp)]
            if not stamps:
                del self._as_parent[parent]
        del self.entries[:at], self._stamps[:at]
        return at

    def __len__(self) -> int:
        return len(self.entries)


class ReplicatedTree:
    """The moves applied so far, in stamp order, over a TreeState and a TreeLog."""

    def __init__(self, state: TreeState, log: TreeLog | None = None, *, horizon: Stamp | None = None,
                 causal: bool = False) -> None:
        self.state = state
        self.log: TreeLog = log if log is not None else MemoryLog()
        self.horizon = horizon
        """Moves at or before this stamp were applied and forgotten: one arriving again is a bug.
        (Kept by the caller across restarts, with the log.)"""
        self.causal = causal
        """Does every move arrive after every move its site had applied when it made it? True
        between two sites (the peer's moves come over one link in its order, and the rest are
        this site's own); not where moves of a third site may come by another way. `apply` then
        leaves later first placements in place: a node first placed after a move arrived can
        otherwise have been named by moves that came before its placement."""

    def apply(self, move: Move) -> list[Conflict]:
        """Apply `move` at its place in stamp order; returns the conflicts it makes with moves of
        the same node already applied. Applying a move again changes nothing and reports nothing.

        The tree and the log are those of undoing every later move, doing `move`, and redoing
        them in stamp order (the algorithm); but only the later moves whose outcome `move` can
        change are undone and redone (`_undo_later` says which, and why). Cost: those moves,
        not every move made since: for a file's move, the later moves of that file."""
        if self.horizon is not None and move.stamp <= self.horizon:
            raise ValueError(f"move {move.stamp} is at or before the forgotten horizon {self.horizon}: "
                             "either it was applied already and is resent, or the log was forgotten too early")
        same = self.log.entry_at(move.stamp)
        if same is not None:
            if same.move != move:
                raise ValueError(f"two different moves with stamp {move.stamp}")
            return []
        later = self._undo_later(move)
        self.log.remove(later)
        self.log.insert(self._do(move))
        for entry in later:
            self.log.insert(self._do(entry.move))
        conflicts = [Conflict(move.node, *sorted((move, other), key=lambda m: m.stamp, reverse=True))
                     for other in self.log.moves_of(move.node) if concurrent(move, other)]
        self.log.add_move_of(move)
        return conflicts

    def _undo_later(self, move: Move) -> list[LogEntry]:
        """Undo, latest first, the entries after `move` whose outcome inserting `move` can change,
        and those whose placements its cycle check or theirs read; returns them in stamp order.

        An entry's outcome (done, and `before`) rests on its node's placement and on its cycle
        check, which reads the placements on the way up from the move's parent: the parent's,
        then those of nodes that have a child then. Call a node *childless since* s (`move`'s
        stamp) when it has no child now and no entry from s on names it a parent
        (`TreeLog.parent_since`: the parent of its move or of its `before`, a child that left).
        It then had no child at any time since s, in any order of applying: a child it had was
        there at s (and is still there, or left with an entry whose `before` names it) or was
        put there since. Such a node is on no cycle check's way, but as the parent it starts at.
        - `move`'s node x childless since s (a file: the common case): inserting `move` changes
          x's placement only, which no later check reads, so every later entry of another node
          is the same, and x's have the same `done` (their checks read nothing that changed)
          but another `before`. Undo x's later entries alone (`moves_of`), and `move`'s check
          finds x on no way up, as at s.
        - Otherwise (a directory): a later move of a node childless since s is done unless into
          itself and its `before` comes from its own moves, whatever else moved: it stays.
          Undo the later entries of every node not childless since s, x and `move`'s parent
          among them (with `causal`, those that `reorders`). Every check then reads only
          placements undone to where they were at its stamp.
        With `causal`, first placements stay, which is exact because a move names only nodes
        placed before it (its site had applied their first placements: the clock puts its
        stamp after them), and in causal order those came first here too: the tree is the tree
        at s plus newer nodes where they were first put, none above a node that existed then,
        so every check walks as it would at its stamp. `_older_than` checks that premise for
        `move` itself; where it does not hold, everything later is undone."""
        x, stamp = move.node, move.stamp
        if move.parent != x and self._childless_since(x, stamp):
            mine = sorted(m.stamp for m in self.log.moves_of(x) if m.stamp > stamp)
            later = [entry for entry in map(self.log.entry_at, mine) if entry is not None]
            assert len(later) == len(mine), "a move of the node is not in the log"
            for entry in reversed(later):
                self._undo(entry)
            return later
        candidates = self.log.reordering_from(stamp) if self.causal else self.log.entries_from(stamp)
        walked: dict[NodeId, bool] = {x: True, move.parent: True}  # may a cycle check read its placement?
        for entry in candidates:
            if entry.move.node not in walked:
                walked[entry.move.node] = not self._childless_since(entry.move.node, stamp)
        later = [entry for entry in candidates if walked[entry.move.node]]
        for entry in reversed(later):
            self._undo(entry)
        if self.causal and not self._older_than(move):
            everything = self.log.entries_from(stamp)  # what is left in place: undo it too
            undone = {entry.move.stamp for entry in later}
            for entry in reversed(everything):
                if entry.move.stamp not in undone:
                    self._undo(entry)
            later = everything
        return later

    def _childless_since(self, node: NodeId, stamp: Stamp) -> bool:
        """Has `node` had no child at any time since `stamp` (`_undo_later`)?"""
        return not self.state.has_children(node) and not self.log.parent_since(node, stamp)

    def apply_local(self, move: Move) -> None:
        """A move this site makes now: the clock put its stamp past every move applied here, and
        its site had applied all of them, so there is nothing to undo and nothing it conflicts
        with (`apply` would find the same, with more reads: this is the write path)."""
        self.log.append(self._do(move))
        self.log.add_move_of(move)

    def _older_than(self, move: Move) -> bool:
        """Are `move`'s node, and its parent with every node above it, placed before `move` (or not
        at all)? Then no first placement left in the tree changes what `move` does."""
        placed = self.state.placement(move.node)
        if placed is not None and placed.stamp > move.stamp:
            return False
        current = move.parent
        for _ in range(MAX_DEPTH):
            placed = self.state.placement(current)
            if placed is None:
                return True
            if placed.stamp > move.stamp:
                return False
            current = placed.parent
        raise TreeCorruption(f"node {move.parent.hex()} is more than {MAX_DEPTH} levels deep: a cycle")

    def forget_before(self, stamp: Stamp) -> int:
        """Drop the log entries with stamps up to `stamp`. Only safe when every move not applied
        here yet has a greater stamp (none needs them undone) and had seen all of them (none is
        concurrent with them): when each peer has acknowledged applying our moves up to `stamp`,
        and we have applied every move the peer made up to the stamp its clock had when it sent
        that acknowledgement. Returns how many were dropped."""
        dropped = self.log.forget_through(stamp)
        if self.horizon is None or stamp > self.horizon:
            self.horizon = stamp
        return dropped

    def is_ancestor(self, ancestor: NodeId, node: NodeId) -> bool:
        """Is `ancestor` on the way from `node` up to its root (node itself excluded)?"""
        current = node
        for _ in range(MAX_DEPTH):
            placed = self.state.placement(current)
            if placed is None:
                return False
            if placed.parent == ancestor:
                return True
            current = placed.parent
        raise TreeCorruption(f"node {node.hex()} is more than {MAX_DEPTH} levels deep: a cycle")

    def _do(self, move: Move) -> LogEntry:
        before = self.state.placement(move.node)
        if move.node == move.parent or self.is_ancestor(move.node, move.parent):
            return LogEntry(move, before, done=False)
        self.state.place(move.node, Placement(move.parent, move.name, move.stamp))
        return LogEntry(move, before, done=True)

    def _undo(self, entry: LogEntry) -> None:
        if entry.done:
            now = self.state.placement(entry.move.node)
            if now is None or now.stamp != entry.move.stamp:
                raise TreeCorruption(f"undo of {entry.move.stamp} finds node {entry.move.node.hex()} at {now}")
            self.state.place(entry.move.node, entry.before)


def visible_names(children: Iterable[tuple[NodeId, Placement]]) -> dict[NodeId, bytes]:
    """The names one directory shows for its children (node, placement): where several have one
    name, the placement with the greatest stamp keeps it and each other gets a name derived from
    its own stamp (`conflict_name`), so every site shows the same names for the same tree."""
    by_name: dict[bytes, list[tuple[NodeId, Placement]]] = {}
    for node, placed in children:
        by_name.setdefault(placed.name, []).append((node, placed))
    shown: dict[NodeId, bytes] = {}
    taken = set(by_name)
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda pair: pair[1].stamp, reverse=True)
        shown[group[0][0]] = name
        for node, placed in group[1:]:
            candidate = conflict_name(name, placed.stamp)
            extra = 1
            while candidate in taken:
                extra += 1
                candidate = conflict_name(name, placed.stamp, extra)
            taken.add(candidate)
            shown[node] = candidate
    return shown


def conflict_name(name: bytes, stamp: Stamp, extra: int = 1) -> bytes:
    """`name.conflict-<site>-<wall ns>[.<logical>][-<extra>]`, the base cut to stay within 255 bytes."""
    suffix = f".conflict-{stamp.site.hex()[:8]}-{stamp.wall_ns}"
    if stamp.logical:
        suffix += f".{stamp.logical}"
    if extra > 1:
        suffix += f"-{extra}"
    tail = suffix.encode()
    return name[:MAX_NAME_BYTES - len(tail)] + tail
