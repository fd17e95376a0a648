"""Interpreter for the scripted Raft scenarios in testdata/ (in the style of etcd's datadriven tests).

A script is a sequence of blocks: `# prose` comment lines, a command line, `----`, and the expected
output up to the next blank line. The interpreter drives real cores over an in-memory network that
delivers nothing unless told to, so every message in a scenario is visible and ordered.

Commands:
  add-nodes N [voters=1,2,3] [learners=4] [index=1] [pre-vote=true] [check-quorum=true]
            [read-only=safe|lease] [max-msg-bytes=N] [election-jitter=N]
                          new nodes; with voters= they boot from a snapshot at `index` with that
                          configuration, without it they start empty (a node about to join)
  campaign ID             start an election on ID now
  propose ID DATA         propose a command on ID
  propose-conf-change ID add|add-learner|remove NODE
  transfer-leadership ID TO
  read-index ID CTX
  tick-heartbeat ID [N]   N heartbeat intervals (default 1)
  tick-election ID        one election timeout (the randomized part is election-jitter, default 0)
  process-ready ID...     hand out one Ready per node: persist, queue messages, apply
  deliver-msgs ID... [drop=true]  deliver (or drop) the messages queued for ID
  stabilize [ID...]       process-ready and deliver-msgs until nothing moves
  partition ID...         cut the listed nodes off from the others (messages crossing are dropped)
  heal                    remove the partition
  compact ID INDEX        snapshot ID's state machine at INDEX and drop the log up to it
  restart ID              crash ID (volatile state lost, storage kept) and start it again
  raft-state              role, term and leader of every node
  raft-log ID             ID's log
  status ID               the leader's view of its followers
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field

from awsomefsd.meta.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    ReadOnlyOption,
    Ready,
    Snapshot,
    SnapshotMeta,
)
from awsomefsd.meta.raft.codec import decode_conf_change, decode_message, encode_message
from awsomefsd.meta.raft.storage import MemoryStorage

MAX_STABILIZE_ROUNDS = 1000


def fmt_entry(e: Entry) -> str:
    if e.type == EntryType.CONF_CHANGE:
        cc = decode_conf_change(e.data)
        return f"{e.term}/{e.index} EntryConfChange {cc.type.name.lower()} {cc.node_id}"
    return f'{e.term}/{e.index} EntryNormal "{e.data.decode(errors="replace")}"'


def fmt_conf(cs: ConfState) -> str:
    s = f"Voters:{list(cs.voters)}"
    if cs.learners:
        s += f" Learners:{list(cs.learners)}"
    return s


def fmt_message(m: Message) -> str:
    s = f"{m.frm}->{m.to} {m.type.name} Term:{m.term}"
    if m.type in (MessageType.APP, MessageType.VOTE, MessageType.PRE_VOTE) or m.log_term:
        s += f" Log:{m.log_term}/{m.index}"
    elif m.type in (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP):
        s += f" Tick:{m.index}"  # the leader's clock, echoed back: what its lease is measured with
    elif m.index:
        s += f" Index:{m.index}"
    if m.commit:
        s += f" Commit:{m.commit}"
    if m.reject:
        s += f" Rejected (Hint: {m.reject_hint})" if m.type == MessageType.APP_RESP else " Rejected"
    if m.context and m.type not in (MessageType.VOTE, MessageType.PRE_VOTE):
        s += f" Context:{m.context.decode(errors='replace')}"
    if m.entries:
        s += " Entries:[" + ", ".join(fmt_entry(e) for e in m.entries) + "]"
    if m.snapshot is not None:
        meta = m.snapshot.meta
        s += f" Snapshot: Index:{meta.index} Term:{meta.term} {fmt_conf(meta.conf_state)}"
    return s


@dataclass
class ScriptNode:
    id: int
    storage: MemoryStorage
    config: Config
    raw: RawNode
    applied: list[bytes] = field(default_factory=list)
    applied_index: int = 0


class Interpreter:
    def __init__(self) -> None:
        self.nodes: dict[int, ScriptNode] = {}
        self.queues: dict[int, list[Message]] = {}
        self.cut: set[int] = set()

    # --- plumbing ---------------------------------------------------------------------------------
    def _config(self, node_id: int, kw: dict[str, str], applied: int) -> Config:
        jitter = int(kw.get("election-jitter", 0))
        return Config(
            id=node_id,
            random_below=lambda n: min(jitter, n - 1),
            election_tick=10,
            heartbeat_tick=1,
            applied=applied,
            max_size_per_msg_bytes=int(kw.get("max-msg-bytes", 1 << 20)),
            check_quorum=kw.get("check-quorum", "false") == "true",
            pre_vote=kw.get("pre-vote", "false") == "true",
            read_only_option=ReadOnlyOption.LEASE_BASED
            if kw.get("read-only") == "lease"
            else ReadOnlyOption.SAFE,
        )

    def _node(self, arg: str) -> ScriptNode:
        return self.nodes[int(arg)]

    def _queue(self, m: Message) -> None:
        # Every message crosses the codec, as it would on a real transport.
        m = decode_message(encode_message(m))
        if m.to in self.nodes and not ((m.frm in self.cut) ^ (m.to in self.cut)):
            self.queues[m.to].append(m)

    def process_ready(self, n: ScriptNode, out: list[str]) -> bool:
        if not n.raw.has_ready():
            return False
        rd = n.raw.ready()
        out.append(f"> {n.id} handling Ready")
        out.extend("  " + line for line in self._fmt_ready(rd))
        if rd.snapshot is not None:
            n.storage.apply_snapshot(rd.snapshot)
        n.storage.append(rd.entries)
        if rd.hard_state is not None:
            n.storage.set_hard_state(rd.hard_state)
        for m in rd.messages:
            self._queue(m)
        if rd.snapshot is not None:
            n.applied_index = rd.snapshot.meta.index
        for e in rd.committed_entries:
            n.applied.append(e.data)
            n.applied_index = e.index
        n.raw.advance(rd)
        return True

    def _fmt_ready(self, rd: Ready) -> list[str]:
        lines = []
        if rd.soft_state is not None:
            lines.append(f"State:{rd.soft_state.state.name} Lead:{rd.soft_state.lead}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            lines.append(f"HardState Term:{hs.term} Vote:{hs.vote} Commit:{hs.commit}")
        if rd.entries:
            lines.append("Entries:")
            lines.extend("  " + fmt_entry(e) for e in rd.entries)
        if rd.snapshot is not None:
            meta = rd.snapshot.meta
            lines.append(f"Snapshot Index:{meta.index} Term:{meta.term} {fmt_conf(meta.conf_state)}")
        if rd.committed_entries:
            lines.append("CommittedEntries:")
            lines.extend("  " + fmt_entry(e) for e in rd.committed_entries)
        if rd.messages:
            lines.append("Messages:")
            lines.extend("  " + fmt_message(m) for m in rd.messages)
        if rd.read_states:
            lines.append("ReadStates:")
            lines.extend(f"  Index:{rs.index} Context:{rs.request_ctx.decode()}" for rs in rd.read_states)
        return lines

    def deliver(self, node_id: int, out: list[str], drop: bool = False) -> bool:
        msgs, self.queues[node_id] = self.queues[node_id], []
        if not msgs:
            return False
        out.append(f"> {node_id} {'dropping' if drop else 'receiving'} messages")
        for m in msgs:
            out.append("  " + fmt_message(m))
            if not drop:
                self.nodes[node_id].raw.step(m)
        return True

    # --- commands ---------------------------------------------------------------------------------
    def run(self, line: str) -> str:
        parts = shlex.split(line)
        cmd, args = parts[0], [a for a in parts[1:] if "=" not in a]
        kw = dict(a.split("=", 1) for a in parts[1:] if "=" in a)
        out: list[str] = []
        handler = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if handler is None:
            raise ValueError(f"unknown command {cmd!r}")
        try:
            handler(args, kw, out)
        except ProposalDropped as e:
            out.append(f"dropped: {e} (leader hint {e.leader_hint})")
        return "\n".join(out) if out else "ok"

    def cmd_add_nodes(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        voters = tuple(int(x) for x in kw["voters"].split(",")) if "voters" in kw else ()
        learners = tuple(int(x) for x in kw["learners"].split(",")) if kw.get("learners") else ()
        index = int(kw.get("index", 1))
        for _ in range(int(args[0])):
            node_id = len(self.nodes) + 1
            st = MemoryStorage()
            applied = 0
            if voters:
                st.apply_snapshot(Snapshot(SnapshotMeta(index, 1, ConfState(voters, learners)), b""))
                st.set_hard_state(HardState(term=1, commit=index))
                applied = index
            cfg = self._config(node_id, kw, applied)
            self.nodes[node_id] = ScriptNode(node_id, st, cfg, RawNode(cfg, st), applied_index=applied)
            self.queues[node_id] = []
        out.append(self._state())

    def cmd_campaign(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        self._node(args[0]).raw.campaign()

    def cmd_propose(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        index = self._node(args[0]).raw.propose(args[1].encode())
        out.append(f"index {index}")

    def cmd_propose_conf_change(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        kinds = {"add": ConfChangeType.ADD_NODE, "add-learner": ConfChangeType.ADD_LEARNER}
        kinds["remove"] = ConfChangeType.REMOVE_NODE
        index = self._node(args[0]).raw.propose_conf_change(ConfChange(kinds[args[1]], int(args[2])))
        out.append(f"index {index}")

    def cmd_transfer_leadership(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        self._node(args[0]).raw.transfer_leader(int(args[1]))

    def cmd_read_index(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        self._node(args[0]).raw.read_index(args[1].encode())

    def cmd_tick_heartbeat(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        n = self._node(args[0])
        for _ in range(n.config.heartbeat_tick * int(args[1] if len(args) > 1 else 1)):
            n.raw.tick()

    def cmd_tick_election(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        n = self._node(args[0])
        for _ in range(n.config.election_tick):
            n.raw.tick()

    def cmd_process_ready(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        for a in args:
            if not self.process_ready(self._node(a), out):
                out.append(f"> {a} has no Ready")

    def cmd_deliver_msgs(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        for a in args:
            self.deliver(int(a), out, drop=kw.get("drop") == "true")

    def cmd_stabilize(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        ids = [int(a) for a in args] or sorted(self.nodes)
        for _ in range(MAX_STABILIZE_ROUNDS):
            moved = False
            for i in ids:
                moved |= self.process_ready(self.nodes[i], out)
            for i in ids:
                moved |= self.deliver(i, out)
            if not moved:
                return
        raise AssertionError("stabilize did not converge")

    def cmd_partition(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        self.cut = {int(a) for a in args}

    def cmd_heal(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        self.cut = set()

    def cmd_compact(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        n, index = self._node(args[0]), int(args[1])
        assert index <= n.applied_index, "compact only what is applied"
        n.storage.create_snapshot(index, n.raw.conf_state_at(index), b"")
        n.storage.compact(index)
        out.append(self._log(n))

    def cmd_restart(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        n = self._node(args[0])
        cfg = dataclasses.replace(n.config, applied=n.applied_index)
        n.config, n.raw = cfg, RawNode(cfg, n.storage)
        self.queues[n.id] = []
        out.append(self._state())

    def cmd_raft_state(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        out.append(self._state())

    def cmd_raft_log(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        out.append(self._log(self._node(args[0])))

    def cmd_status(self, args: list[str], kw: dict[str, str], out: list[str]) -> None:
        st = self._node(args[0]).raw.status()
        for i, p in sorted(st.progress.items()):
            out.append(
                f"{i}: {p.state.name} match={p.match} next={p.next}{' learner' if p.is_learner else ''}"
            )

    def _state(self) -> str:
        lines = []
        for i, n in sorted(self.nodes.items()):
            r = n.raw.raft
            role = "Voter" if i in r.voters else "Learner" if i in r.learners else "None"
            lines.append(f"{i}: {r.state.name} ({role}) Term:{r.term} Lead:{r.lead} Commit:{r.log.committed}")
        return "\n".join(lines)

    def _log(self, n: ScriptNode) -> str:
        snap = n.storage.snapshot().meta
        lines = [f"snapshot {snap.term}/{snap.index} {fmt_conf(snap.conf_state)}"] if snap.index else []
        lines.extend(fmt_entry(e) for e in n.raw.raft.log.all_entries())
        return "\n".join(lines) if lines else "log is empty"


def parse_script(text: str) -> list[tuple[int, str, str]]:
    """Blocks of (line number, command, expected output)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        start = i + 1
        assert i + 1 < len(lines) and lines[i + 1] == "----", f"line {start}: expected ---- after command"
        i += 2
        expected = []
        while i < len(lines) and lines[i].strip():
            expected.append(lines[i])
            i += 1
        blocks.append((start, line, "\n".join(expected)))
    return blocks


def render_script(text: str, outputs: dict[int, str]) -> str:
    """The script with each block's expected output replaced (for --raft-rewrite)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            out.append(lines[i])
            i += 1
            continue
        out.extend([lines[i], "----"])
        out.extend(outputs[i + 1].splitlines())
        i += 2
        while i < len(lines) and lines[i].strip():
            i += 1
    return "\n".join(out) + "\n"
