"""The cursors between two sites (awsomefsd/repl/link.py): cases, then two sites moving entries of
their replicated trees while their links drop messages, break, and the sites restart (losing all
they did not persist), with the undo logs forgotten only as far as the protocol's horizon says;
planted bugs that the simulation must catch."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from awsomefsd.crdt.hlc import EPOCH, HybridClock, Stamp
from awsomefsd.crdt.tree import ROOT, TRASH, MemoryTree, Move, ReplicatedTree, TreeCorruption
from awsomefsd.repl import link as lk
from awsomefsd.repl.link import Ack, Gap, Horizon, Inbound, Outbox, Shipped
from tests.repl.test_tree import CausalityModel, node, random_move
from tests.support import seeds

A, B = bytes(15) + b"\x0a", bytes(15) + b"\x0b"


def stamp(wall: int, site: bytes = A) -> Stamp:
    return Stamp(wall, 0, site)


def test_entries_chain_and_a_resend_is_dropped_and_a_gap_refused() -> None:
    out: Outbox[str] = Outbox()
    for wall in (1, 2, 3):
        out.append(stamp(wall), f"op{wall}")
    assert [e.prev for e in out.entries] == [EPOCH, stamp(1), stamp(2)]
    inbound = Inbound()
    assert [e.op for e in inbound.accept(out.after(EPOCH, limit=2))] == ["op1", "op2"]
    assert [e.op for e in inbound.accept(out.after(EPOCH))] == ["op3"]  # the first two are resent
    assert inbound.accept(out.after(EPOCH)) == []
    skipping = Inbound(applied=stamp(1))
    with pytest.raises(Gap):
        skipping.accept([out.entries[2]])
    assert skipping.applied == stamp(1)  # nothing accepted


def test_the_outbox_trims_what_was_acknowledged_and_refuses_a_peer_that_went_back() -> None:
    out: Outbox[str] = Outbox()
    for wall in (1, 2, 3):
        out.append(stamp(wall), "x")
    assert out.trim(stamp(2)) == 2 and out.head == stamp(3) and out.trimmed_to == stamp(2)
    assert [e.stamp for e in out.after(stamp(2))] == [stamp(3)]
    assert [e.stamp for e in out.after(stamp(1))] == [stamp(3)]  # a lagging cursor skips what was trimmed
    assert out.resume(lk.Hello(stamp(2))) == stamp(2)
    with pytest.raises(ValueError, match="restored from a backup"):
        out.resume(lk.Hello(stamp(1)))
    with pytest.raises(ValueError, match="stamp order"):
        out.append(stamp(3), "again")
    assert out.append(stamp(4), "next").prev == stamp(3)


def test_an_acknowledgement_is_stable_once_the_peers_operations_before_it_are_here() -> None:
    horizon = Horizon()
    horizon.on_ack(Ack(applied=stamp(5), head=stamp(7, B)))
    assert horizon.advance(applied_from_peer=stamp(6, B)) == EPOCH  # B's op 7 not here yet
    assert horizon.advance(applied_from_peer=stamp(7, B)) == stamp(5)
    horizon.on_ack(Ack(applied=stamp(3), head=stamp(9, B)))  # an older one, overtaken
    assert horizon.acked == stamp(5) and not horizon.pending


# -- two sites over links that fail --------------------------------------------------------------

@dataclass
class Site:
    """What a site persists (tree, outbox, inbound cursor, horizon, clock) and what it loses on a
    restart (`send_cursor`: how far it sent on the current connection)."""

    id: bytes
    clock: HybridClock
    tree: ReplicatedTree = field(default_factory=lambda: ReplicatedTree(MemoryTree()))
    outbox: Outbox[Move] = field(default_factory=Outbox)
    inbound: Inbound = field(default_factory=Inbound)
    horizon: Horizon = field(default_factory=Horizon)
    send_cursor: Stamp | None = None
    knows: set[Stamp] = field(default_factory=set)
    conflicts: set[tuple[Stamp, Stamp]] = field(default_factory=set)
    applied_times: Counter[Stamp] = field(default_factory=Counter)
    forgotten: int = 0


@dataclass
class TwoSites:
    seed: int
    rng: random.Random = field(init=False)
    sites: dict[bytes, Site] = field(init=False)
    wires: dict[bytes, list[object]] = field(init=False)
    """Messages in flight to each site, in order; a broken connection loses them."""
    model: CausalityModel = field(default_factory=CausalityModel)
    next_node: int = 100
    wall_ns: int = 1_000_000

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        skew = {A: 0, B: 4}
        self.sites = {s: Site(s, HybridClock(s, physical_ns=lambda s=s: self.wall_ns + skew[s])) for s in (A, B)}
        self.wires = {A: [], B: []}

    def peer(self, site: Site) -> Site:
        return self.sites[B if site.id == A else A]

    def local_move(self, site: Site) -> None:
        n, parent, name = random_move(self.rng, site.tree, self.next_node)
        if n == node(self.next_node):
            self.next_node += 1
        move = Move(site.clock.now(), n, parent, name, seen={self.peer(site).id: site.inbound.applied})
        self.model.record(move, site.knows)
        self._apply(site, move)
        site.outbox.append(move.stamp, move)

    def connect(self, receiver: Site) -> None:
        """A new connection into `receiver`; what was in flight is gone. The sender resumes from
        the receiver's Hello, or (its Hello lost, or not waited for) from the last acknowledgement
        it had, which may lag: then it resends what was applied, and the receiver must drop it."""
        self.wires[receiver.id].clear()
        sender = self.peer(receiver)
        hello = lk.Hello(receiver.inbound.applied)
        sender.send_cursor = sender.outbox.resume(hello) if self.rng.random() < 0.5 else sender.horizon.acked

    def send(self, sender: Site) -> None:
        if sender.send_cursor is None:
            return  # no connection
        batch = sender.outbox.after(sender.send_cursor, limit=self.rng.randint(1, 5))
        if batch:
            self.wires[self.peer(sender).id].append(batch)
            sender.send_cursor = batch[-1].stamp

    def receive(self, receiver: Site) -> None:
        wire = self.wires[receiver.id]
        if not wire:
            return
        message = wire.pop(0)
        peer = self.peer(receiver)
        if isinstance(message, Ack):
            receiver.horizon.on_ack(message)
            return
        assert isinstance(message, list)
        try:
            fresh = receiver.inbound.accept(message)
        except Gap:
            self.connect(receiver)
            return
        for entry in fresh:
            receiver.clock.observe(entry.stamp)
            self._apply(receiver, entry.op)
            receiver.applied_times[entry.stamp] += 1
        self.wires[peer.id].append(receiver.inbound.ack(receiver.outbox.head))

    def forget(self, site: Site) -> None:
        stable = site.horizon.advance(site.inbound.applied, site.outbox.head if self.rng.random() < 0.5 else None)
        if stable > EPOCH:
            site.forgotten += site.tree.forget_before(stable)
            site.outbox.trim(site.horizon.acked)

    def restart(self, site: Site) -> None:
        site.send_cursor = None
        self.wires[site.id].clear()
        self.wires[self.peer(site).id].clear()
        site.clock = HybridClock(site.id, last=site.clock.last(), physical_ns=site.clock.physical_ns)

    def _apply(self, site: Site, move: Move) -> None:
        for conflict in site.tree.apply(move):
            site.conflicts.add((conflict.winner.stamp, conflict.loser.stamp))
        site.knows.add(move.stamp)

    def run(self, steps: int) -> None:
        a, b = self.sites[A], self.sites[B]
        self.connect(a)
        self.connect(b)
        for _ in range(steps):
            self.wall_ns += self.rng.choice((0, 1, 3))
            site = self.rng.choice((a, b))
            roll = self.rng.random()
            if roll < 0.35:
                self.local_move(site)
            elif roll < 0.55:
                self.send(site)
            elif roll < 0.85:
                self.receive(site)
            elif roll < 0.92:
                self.forget(site)
            elif roll < 0.96:
                self.connect(site)  # the connection into it broke and came back
            elif roll < 0.98:
                self.wires[site.id].clear()
                self.peer(site).send_cursor = None  # down until the next connect
            else:
                self.restart(site)
                self.connect(site)
                self.connect(self.peer(site))
        self.heal()

    def heal(self) -> None:
        a, b = self.sites[A], self.sites[B]
        self.connect(a)
        self.connect(b)
        for _ in range(10_000):
            for site in (a, b):
                self.send(site)
                while self.wires[site.id]:
                    self.receive(site)
                self.forget(site)
            if (not self.wires[A] and not self.wires[B] and a.inbound.applied == b.outbox.head
                    and b.inbound.applied == a.outbox.head):
                break
        for site in (a, b):
            while self.wires[site.id]:
                self.receive(site)
            self.forget(site)

    def violations(self) -> list[str]:
        problems = []
        a, b = self.sites[A], self.sites[B]
        assert isinstance(a.tree.state, MemoryTree) and isinstance(b.tree.state, MemoryTree)
        if a.tree.state.placements != b.tree.state.placements:
            problems.append("the trees differ")
        for n in a.tree.state.placements:
            if not (a.tree.is_ancestor(ROOT, n) or a.tree.is_ancestor(TRASH, n)):
                problems.append(f"node {n.hex()} is cut off")
        for site in (a, b):
            theirs = {s for s in self.model.moves if s.site != site.id}
            if set(site.applied_times) != theirs:
                problems.append(f"site {site.id.hex()[-1]} skipped {len(theirs - set(site.applied_times))} moves")
            twice = [s for s, times in site.applied_times.items() if times > 1]
            if twice:
                problems.append(f"site {site.id.hex()[-1]} applied {len(twice)} moves twice")
        expected = self.model.concurrent_pairs()
        for site in (a, b):
            if site.conflicts != expected:
                problems.append(f"site {site.id.hex()[-1]} conflicts: {len(expected - site.conflicts)} missed, "
                                f"{len(site.conflicts - expected)} not real")
        return problems


def run_seed(seed: int, steps: int = 600) -> tuple[list[str], TwoSites]:
    sim = TwoSites(seed)
    try:
        sim.run(steps)
    except (TreeCorruption, ValueError) as exc:
        return [f"{type(exc).__name__}: {exc}"], sim
    return sim.violations(), sim


@pytest.mark.parametrize("seed", seeds.params("link", 30))
def test_two_sites_converge_through_failing_links_applying_each_move_once(seed: int) -> None:
    problems, sim = run_seed(seed)
    assert problems == [], f"seed {seed}: {problems}"
    a, b = sim.sites[A], sim.sites[B]
    assert a.forgotten > 0 and b.forgotten > 0, "the horizon never moved: forgetting was not exercised"
    assert len(a.tree.log) < len(sim.model.moves)  # type: ignore[arg-type] // 2, "the undo log kept most of the run"
    assert a.conflicts, "no concurrent moves: the run checks little"


def failing_seeds(count: int = 15) -> list[str]:
    return [f"seed {seed}: {problems}" for seed in range(count) if (problems := run_seed(seed)[0])]


def test_planted_bug_stable_at_once_forgets_what_a_late_move_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    def stable_at_once(self: Horizon, applied_from_peer: Stamp, own_head: Stamp | None = None) -> Stamp:
        self.stable = max(self.stable, self.acked)
        return self.stable
    monkeypatch.setattr(Horizon, "advance", stable_at_once)
    assert any("forgotten horizon" in f or "conflicts" in f for f in failing_seeds())


def test_planted_bug_resends_not_dropped_apply_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept_everything(self: Inbound, batch: list[Shipped[Move]]) -> list[Shipped[Move]]:
        if batch:
            self.applied = max(self.applied, batch[-1].stamp)
        return list(batch)
    monkeypatch.setattr(Inbound, "accept", accept_everything)
    assert any("twice" in f for f in failing_seeds())  # or, past the horizon, refused by the tree


def test_planted_bug_cursor_not_persisted_over_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    real_restart = TwoSites.restart

    def restart_forgetting_cursor(self: TwoSites, site: Site) -> None:
        real_restart(self, site)
        site.inbound = lk.Inbound()  # as if the cursor were kept in memory only
    monkeypatch.setattr(TwoSites, "restart", restart_forgetting_cursor)
    assert any("state went back" in f for f in failing_seeds())
