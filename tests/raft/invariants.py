"""Raft's safety properties, checked by the simulator as the cluster runs.

- Election safety: at most one leader per term.
- Log matching: two logs holding an entry with the same index and term hold the same command there
  and the same term just before it (by induction: identical prefixes). Checked as entries are
  persisted, against a witness of every (index, term) ever written anywhere.
- Leader completeness: a new leader holds every entry known to be committed.
- State machine safety: every node applies the same command at each index, and that command is
  the one committed there.
- Durable state moves forward: term never decreases, a vote never changes within a term, the
  persisted commit index and the applied index never decrease (across crashes too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from awsomefsd.meta.raft import Entry, HardState, RawNode, Ready, Snapshot, StateType
from awsomefsd.meta.raft.storage import LogCompacted


class _Applied(Protocol):
    @property
    def applied(self) -> int: ...


class _Terms(Protocol):
    def term(self, index: int) -> int: ...


class ObservedNode(Protocol):
    """What the checks read of a simulated node: the core's simulator (sim.py) and the driver's
    (driver_sim.py) both provide it."""

    @property
    def id(self) -> int: ...

    @property
    def kv(self) -> _Applied:
        """The durable state machine: `applied` is its applied index."""
        ...

    @property
    def storage(self) -> _Terms:
        """The durable log."""
        ...

    @property
    def raw(self) -> RawNode | None:
        """The running core, None while the node is down."""
        ...


class ObservedCluster(Protocol):
    @property
    def nodes(self) -> Mapping[int, ObservedNode]: ...


class SimFailure(AssertionError):
    """An invariant broke, a history is not linearizable, or the cluster did not recover."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SimFailure(msg)


class Invariants:
    def __init__(self) -> None:
        self.leader_of_term: dict[int, int] = {}
        self.witness: dict[tuple[int, int], tuple[bytes, int | None]] = {}
        self.committed: dict[int, int] = {}
        self.committed_hi = 0
        self.applied: dict[int, tuple[int, bytes]] = {}
        self.applied_floor: dict[int, int] = {}
        self.checks = 0

    def on_boot(self, node: ObservedNode) -> None:
        floor = self.applied_floor.get(node.id, 0)
        _check(
            node.kv.applied >= floor,
            f"node {node.id} applied index went back to {node.kv.applied} from {floor}",
        )
        self.applied_floor[node.id] = node.kv.applied

    def on_hard_state(self, node: ObservedNode, old: HardState, new: HardState) -> None:
        _check(new.term >= old.term, f"node {node.id}: term went back {old} -> {new}")
        if new.term == old.term and old.vote:
            _check(
                new.vote == old.vote,
                f"node {node.id}: changed its vote within term {new.term}: {old} -> {new}",
            )
        _check(new.commit >= old.commit, f"node {node.id}: persisted commit went back {old} -> {new}")

    def on_persist(self, node: ObservedNode, entries: list[Entry]) -> None:
        st = node.storage
        for e in entries:
            try:
                prev_term: int | None = st.term(e.index - 1)
            except LogCompacted:
                prev_term = None
            key = (e.index, e.term)
            seen = self.witness.get(key)
            if seen is None:
                self.witness[key] = (e.data, prev_term)
                continue
            _check(seen[0] == e.data, f"log matching: two different entries at index {e.index} term {e.term}")
            if seen[1] is not None and prev_term is not None:
                _check(
                    seen[1] == prev_term,
                    f"log matching: entry {e.index}/{e.term} follows term {prev_term} on node {node.id} "
                    f"but term {seen[1]} elsewhere",
                )

    def on_apply(self, node: ObservedNode, e: Entry) -> None:
        self.checks += 1
        _check(e.index == node.kv.applied + 1, f"node {node.id} applies {e.index} after {node.kv.applied}")
        seen = self.applied.get(e.index)
        if seen is None:
            self.applied[e.index] = (e.term, e.data)
        else:
            _check(
                seen == (e.term, e.data),
                f"state machine safety: node {node.id} applied a different entry at {e.index}",
            )
        t = self.committed.get(e.index)
        _check(
            t is None or t == e.term,
            f"node {node.id} applied {e.index}/{e.term} but {e.index}/{t} is committed",
        )
        self.applied_floor[node.id] = e.index

    def on_snapshot_applied(self, node: ObservedNode, snap: Snapshot) -> None:
        i = snap.meta.index
        t = self.committed.get(i)
        _check(
            t is None or t == snap.meta.term,
            f"node {node.id} installed snapshot {i}/{snap.meta.term}, {i}/{t} committed",
        )
        self.applied_floor[node.id] = i

    def after_ready(self, node: ObservedNode, rd: Ready) -> None:
        raw = node.raw
        assert raw is not None
        r = raw.raft
        log = r.log
        if r.state == StateType.LEADER:
            prev = self.leader_of_term.setdefault(r.term, node.id)
            _check(prev == node.id, f"election safety: {prev} and {node.id} both lead term {r.term}")
        c = log.committed
        _check(c <= log.last_index(), f"node {node.id} commit {c} beyond its log {log.last_index()}")
        _check(log.applied <= c, f"node {node.id} applied {log.applied} beyond commit {c}")
        first = log.first_index() - 1
        if c > self.committed_hi:
            for i in range(max(self.committed_hi + 1, first), c + 1):
                t = log.term(i)
                _check(t > 0, f"node {node.id} commits missing entry {i}")
                a = self.applied.get(i)
                _check(a is None or a[0] == t, f"node {node.id} commits {i}/{t} but {i}/{a} was applied")
                self.committed[i] = t
            self.committed_hi = c
        elif c >= first and c in self.committed:
            _check(
                log.term(c) == self.committed[c],
                f"node {node.id} commit {c}: term differs from the committed one",
            )
        if rd.soft_state is not None and rd.soft_state.state == StateType.LEADER:
            self._check_leader_completeness(node)

    def _check_leader_completeness(self, node: ObservedNode) -> None:
        assert node.raw is not None
        log = node.raw.raft.log
        _check(
            log.last_index() >= self.committed_hi,
            f"leader completeness: new leader {node.id} ends at {log.last_index()}, {self.committed_hi} committed",
        )
        for i in range(max(1, log.first_index() - 1), self.committed_hi + 1):
            t = self.committed.get(i)
            if t is not None:
                _check(
                    log.term(i) == t, f"leader completeness: leader {node.id} lacks committed entry {i}/{t}"
                )

    def after_event(self, sim: ObservedCluster) -> None:
        leaders: dict[int, int] = {}
        for n in sim.nodes.values():
            if n.raw is not None and n.raw.raft.state == StateType.LEADER:
                t = n.raw.raft.term
                _check(leaders.setdefault(t, n.id) == n.id, f"two leaders in term {t}")
