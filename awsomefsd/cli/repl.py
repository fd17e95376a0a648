"""`awsomefsd site ...`: what an operator asks the running daemon about its link to another site."""

from __future__ import annotations

import datetime
import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from awsomefsd.cluster.rpc import control_call
from awsomefsd.cluster.state import control_socket
from awsomefsd.config import Settings
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.errors import OperatorError

VERIFY_TIMEOUT_S = 3600.0
"""The daemon's own bound (repl/control.py VERIFY_TIMEOUT_S), said again here and not imported:
importing the daemon's site modules costs each `awsomefsd site` command 0.4 s of start-up."""
RESOLVE_TIMEOUT_S = 3600.0  # a large losing file is copied back


def site_command(settings: Settings, action: str, arguments: list[str], *, keep: str | None = None,
                 as_json: bool, forget: bool = False) -> int:
    if action == "conflicts" and arguments:
        return _resolve(settings, arguments, keep, as_json=as_json)
    if keep is not None:
        raise OperatorError("--keep goes with `site conflicts resolve ID`")
    if forget and action != "unlink":
        raise OperatorError("--forget goes with `site unlink`")
    if len(arguments) > (1 if action == "link" else 0):
        raise OperatorError(f"`site {action}` takes {'one token' if action == 'link' else 'no argument'}")
    argument = arguments[0] if arguments else None
    if action == "link":
        if argument is None:
            print(_call(settings, {"op": "site_invite"})["token"])
        else:
            reply = _call(settings, {"op": "site_join", "token": argument})
            again = "linked again (what both sites held pairs up; what changed meanwhile is sent)" \
                if reply.get("relinked") else "linked"
            print(f"awsomefsd: {again} to site {reply['peer']} at {', '.join(reply['addresses'])}; "
                  "replication has started (`awsomefsd site status`)")
            totals = (int(reply.get("initial_operations", 0)), int(reply.get("peer_initial_operations", 0)))
            if any(totals) and sys.stdout.isatty() and not as_json:
                try:
                    follow_initial_sync(lambda: _call(settings, {"op": "site_status"}), totals, sys.stdout)
                except KeyboardInterrupt:
                    print("\nawsomefsd: the initial sync goes on in the background (`awsomefsd site status`)")
                    return 130
        return 0
    if action == "unlink":
        reply = _call(settings, {"op": "site_unlink", "forget": forget})
        untold = reply.get("untold", "")
        if not reply.get("was_linked", True):  # --forget on a site unlinked already
            print("awsomefsd: dropped what was kept of the link; a new link starts over")
            return 0
        print("awsomefsd: unlinked; nothing more is sent or received; " +
              ("nothing is kept of the link (a new one starts over)" if forget else
               "the ids and tree are kept: `site link` with the same site pairs up what both hold "
               "(`site unlink --forget` drops them, and the space of files deleted meanwhile)"))
        if untold:
            print(f"awsomefsd: the other site could not be told ({untold}); it stays linked, its link down, "
                  "until `awsomefsd site unlink` runs there too")
        else:
            print("awsomefsd: the other site was told and is unlinked too")
        return 0
    if action == "status":
        info = _call(settings, {"op": "site_status"})
        print(json.dumps(info, indent=2, sort_keys=True) if as_json else render_status(info))
        return 0
    if action == "conflicts":
        records = _call(settings, {"op": "site_conflicts"})["conflicts"]
        print(json.dumps(records, indent=2, sort_keys=True) if as_json else render_conflicts(records))
        return 0
    if action == "verify":
        reply = _call(settings, {"op": "site_verify"}, timeout_s=VERIFY_TIMEOUT_S)
        if as_json:
            print(json.dumps(reply, indent=2, sort_keys=True))
        elif reply["identical"]:
            print(f"awsomefsd: both sites hold the same tree ({reply['entries']} entries, root {reply['root_hash'][:16]})")
        else:
            print(f"awsomefsd: the sites differ in {len(reply['differences'])} place(s):")
            for line in reply["differences"]:
                print(f"  {line}")
        return 0 if reply["identical"] else 1
    raise OperatorError(f"unknown site action {action}")


def follow_initial_sync(status: Callable[[], dict[str, Any]], totals: tuple[int, int], out: TextIO,
                        interval_s: float = 0.5) -> None:
    """Show the initial sync's progress on one terminal line until neither side has anything
    left to send: `totals` is (what this site sends, what the other sends), as linking counted."""
    sent_total, received_total = totals
    started, started_ns = time.monotonic(), time.time_ns()
    while True:
        info = status()
        if info.get("elsewhere"):  # a cluster member that does not run the link knows no figures
            out.write(f"the initial sync runs on the member that runs the link ({info['elsewhere']}): "
                      "`awsomefsd site status` there shows its progress\n")
            return
        outbound, inbound = info["outbound"], info["inbound"]
        sent = max(0, sent_total - outbound["pending_operations"]) if sent_total else 0
        received = min(received_total, inbound["operations"])
        link = "" if info["link_up"] else f", link down: {info['last_error']}"
        seeding = info.get("seeding")
        walk = "" if not seeding else f"; {seeding['directories_left']} directories left to walk here"
        out.write(f"\r\033[Kinitial sync: sent {sent}/{sent_total} operations{walk}, {_size(outbound['bytes'])}; "
                  f"received {received}/{received_total}, {_size(inbound['bytes'])}; "
                  f"{time.monotonic() - started:.0f} s{link}")
        out.flush()
        # What the peer has left is what it said in its last answer: wait for one given since we
        # started following (a restarted daemon counts what it received anew).
        heard = received >= received_total or (info["last_exchange_ns"] or 0) > started_ns
        if info["link_up"] and outbound["pending_operations"] == 0 and inbound["pending_operations"] == 0 and heard \
                and not seeding:
            out.write("\nawsomefsd: the initial sync is done\n")
            return
        time.sleep(interval_s)


def _resolve(settings: Settings, arguments: list[str], keep: str | None, *, as_json: bool) -> int:
    if len(arguments) != 2 or arguments[0] != "resolve":
        raise OperatorError("usage: awsomefsd site conflicts resolve ID --keep winner|loser|both")
    if keep is None:
        raise OperatorError("say which version stays: --keep winner, --keep loser or --keep both")
    reply = _call(settings, {"op": "site_resolve", "id": arguments[1], "keep": keep}, timeout_s=RESOLVE_TIMEOUT_S)
    print(json.dumps(reply, indent=2, sort_keys=True) if as_json else f"awsomefsd: conflict {reply['id']}: "
          f"{reply['done']}; closed here, and on the other site when it applies this")
    return 0


def _call(settings: Settings, request: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    socket = control_socket(settings.node.state_dir)
    if not socket.exists():
        raise OperatorError(f"no daemon with a site listener runs on {settings.node.state_dir} "
                            "(start it with [site] listen set, or give --state)")
    try:
        reply = control_call(str(socket), request, timeout_s=timeout_s)
    except ConnectionError as exc:  # ControlTimeout too: each says what happened in one line
        raise OperatorError(str(exc)) from None
    if "error" in reply:
        raise OperatorError(str(reply["error"]))
    return reply


def render_status(info: dict[str, Any]) -> str:
    if not info["linked"]:
        kept = (f"\n  kept from the link with site {info['kept_for']}: linking it again pairs up what both "
                "sites hold (`awsomefsd site unlink --forget` drops it)") if info.get("kept_for") else ""
        return f"site {info['site']}: not linked (listener {info['listen']}; `awsomefsd site link` prints a token)" + kept
    out, inn = info["outbound"], info["inbound"]
    last = info["last_exchange_ns"]
    when = datetime.datetime.fromtimestamp(last / 1e9).isoformat(timespec="seconds") if last else "never"
    if info.get("elsewhere"):
        return "\n".join([
            f"site {info['site']} linked to {info['peer']} at {', '.join(info['peer_addresses'])}",
            f"  link: runs on another member ({info['elsewhere']}); ask there for its figures",
            f"  conflicts: {info['open_conflicts']} open, {info['conflicts_total']} in all (`awsomefsd site conflicts`)",
        ])
    lines = [
        f"site {info['site']} linked to {info['peer']} at {', '.join(info['peer_addresses'])}",
        f"  link: {'up' if info['link_up'] else 'DOWN'}" + (f" ({info['last_error']})" if info["last_error"] else ""),
        f"  last exchange: {when}",
        f"  to the peer:   {out['pending_operations']} operations pending, lag {out['lag_s']:.1f} s; "
        f"sent {out['operations']} operations, {_size(out['bytes'])}"
        + (f" ({_size(out['bytes_unchanged'])} of large files the peer had: not sent)"
           if out.get("bytes_unchanged") else ""),
        f"  from the peer: {inn['pending_operations']} operations pending, lag {inn['lag_s']:.1f} s; "
        f"received {inn['operations']} operations, {_size(inn['bytes'])}"
        + (f"\n  from the peer: REFUSED, {inn['refused']}" if inn.get("refused") else ""),
        f"  conflicts: {info['open_conflicts']} open, {info['conflicts_total']} in all (`awsomefsd site conflicts`)",
    ]
    if info.get("seeding"):
        lines.append(f"  initial sync: {info['seeding']['entries_seeded']} entries seeded, "
                     f"{info['seeding']['directories_left']} directories left to walk")
    if info.get("capture_paused"):
        lines.append(f"  capture paused: outbox over the bound ({info['outbox_operations']} operations, bound "
                     f"{info['outbox_max_operations']}); what changes here is sent once the peer applied the "
                     "outbox, one operation per change")
    return "\n".join(lines)


def render_conflicts(records: list[dict[str, Any]]) -> str:
    """One block per conflict: its id (for `resolve`), where it is, both versions, what stays."""
    if not records:
        return "no conflicts"
    lines = []
    for record in records:
        loser, winner = Stamp.unpack(bytes.fromhex(record["loser"])), Stamp.unpack(bytes.fromhex(record["winner"]))
        if record["open"]:
            state = "open"
        else:
            state = f"resolved, kept the {record['kept']}" if "kept" in record else "settled"
        where = record.get("path") or f"object {record['object'][:16]} (no name now)"
        lines.append(f"{record['id']}  {record['kind']:<10} {state:<8} {where}")
        lines.append(f"    won:  site {_site(winner)} at {_time(winner)}{_version(record, 'winner')}")
        lines.append(f"    lost: site {_site(loser)} at {_time(loser)}{_version(record, 'loser')}")
        if record.get("kept_as"):
            lines.append(f"    the loser is kept as /{bytes.fromhex(record['kept_as']).decode(errors='replace')}")
        if record["kind"] == "edit-delete" and record["open"]:
            lines.append(f"    (the winner is a delete; keeping the loser restores it at {record.get('restore_to') or '/'})")
        if record["kind"] == "move" and record["open"]:
            lines.append(f"    (the losing move {'deleted it' if record.get('loser_deletes') else 'put it at ' + str(record.get('loser_path'))})")
    return "\n".join(lines)


def _version(record: dict[str, Any], which: str) -> str:
    if f"{which}_size" in record:
        return f", {record[f'{which}_size']} bytes, hash {record[f'{which}_hash'][:16]}"
    if f"{which}_value" in record:
        return f", value {record[f'{which}_value']}"
    return ""


def _site(stamp: Stamp) -> str:
    return str(uuid.UUID(bytes=stamp.site))[:8]


def _time(stamp: Stamp) -> str:
    return datetime.datetime.fromtimestamp(stamp.wall_ns / 1e9).isoformat(timespec="milliseconds")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
