"""The pure replicated-data model of two-site replication (design note 48): what two sites agree on
without coordinating, and the bytes they say it in.

- hlc.py: hybrid logical clocks, the stamps everything is ordered by;
- ops.py: the operations a site ships, in site-independent terms, and their checked encoding;
- tree.py: the replicated tree (Kleppmann et al.'s move operation), every directory entry's place;
- register.py: multi-value registers (attributes, xattrs, content): last writer wins, no loser lost;
- wire.py: the frames the two sites' link sends those operations in.

Why the lowest floor: nothing here does I/O, keeps a table or knows a file system; each module
imports only the standard library and its siblings. So both sides of replication take it from
below: the state machine (meta/sites/) stores the tree and the registers in its tables and
captures and applies operations inside its commands, and the link service (repl/) ships them.
Kept in repl/, the model pulled meta up to the service's floor (meta imported repl, repl imported
meta: a cycle). Its tests run it in memory, against seeded random histories.
"""
