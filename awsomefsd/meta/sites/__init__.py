"""Cross-site replication in the state machine (design note 48): what a site records of its own
commands for its peer, and how it applies the peer's operations.

Both directions run inside the transaction of a command, so both are as durable and as
replicated (by the site's own Raft group) as the namespace they describe:
- **Capture** (capture.py): after a replicated command applied, while the site is linked, what it
  did goes to the outbox as operations of the replicated model (crdt/): objects by global ids,
  directory entries as nodes of the replicated tree, each stamped by the site's hybrid clock.
  A create, an attribute, an xattr or a content write records its facts (pending.py) and is
  folded in later, in a batch (`FoldCapture`); every other command folds first.
- **Apply** (apply.py): the peer's operations, in its stamp order. Moves go through the replicated
  tree, and the directory entries its placements imply are made to match (view.py), so what a
  site shows is a function of the moves it applied. Attributes, extended attributes and content
  are multi-value registers: the newest version shows, a concurrent loser is a conflict
  (conflicts.py; edit_delete.py for an edit the other site deleted the file under).
- Deleting is a move into the tree's TRASH; what both sites have moved past is dropped and
  released (forget.py). Volumes replicate as trees of their own (volumes.py, design note 52).
  An operator lists and resolves conflicts (resolve.py).

The state machine uses one class, `SiteTables` (link.py). It is made of one class per job, each
in its own module, each inheriting the jobs it calls and no other: tables.py (the rows) <
tree.py (the tree on them) < volumes.py, conflicts.py < edit_delete.py < view.py < capture.py,
apply.py, forget.py, resolve.py < link.py. The jobs call each other through `self` within one
transaction (a remote move is applied, shown, judged against deletes and its losers kept), which
is why they are classes of one object rather than modules of functions.

The replicated model itself (clock, operations, tree, registers) is crdt/'s, a lower floor:
nothing here imports the link service (repl/).
"""
