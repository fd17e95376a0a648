"""The cluster's metadata log levels: which commands, and which rules for applying them, every
member's build must know before any member may propose or apply them that way.

Apart from meta/commands.py (which maps each command to the level it needs: `COMMAND_LEVELS`)
because the rules a level changes are spread over the state machine and its site tables, and
every module that checks one (`SiteTables.at_level`, `ClusterStateMachine`) reads it from here.
"""

from __future__ import annotations

BASE_LOG_LEVEL = 3  # a cluster that never recorded one: builds before the gate (tags 1-32, format 3)
LOG_LEVEL = 26
"""The newest commands this build decodes. 26: a follower asks the leader for a read point on the
Raft wire (READ_POINT_WIRE_LEVEL). 25: a member's look or create for a directory's holder
travels on the Raft wire (HOLDER_WIRE_LEVEL). 24: MknodFor (a create a directory's holder runs for the
member that asked it to, whose write lease on the file needs a current liveness lease). 23: UnlinkAlone (a member's unlink of a file only it can
reach deletes it at once, without an orphan mark every member releases). 22: a leader answers
reads from its lease, which rests on every member's promise not to vote for another while it hears from the leader (LEASE_READS_LEVEL). 21: five rules of the initial sync's walk mended for names
it had not reached yet (UNSEEDED_NAMES_LEVEL). 20: SeedSite (an initial sync in slices: SEED_LEVEL), and a
linked site stamps a WriteData's content with its writes' time, not its commit's (CONTENT_TIME_LEVEL). 19: a
WriteData that keeps the times but names one (the kernel's write-back under the writeback cache) is captured by a linked site as the content change
it is (WRITEBACK_CONTENT_LEVEL). 18: PauseCapture, ResumeCapture (a bounded outbox:
meta/sites/bound.py). 17: UnlinkClosed (a closed file's unlink and purge in one command). 16: an
unlink keeps a site's tables for a relink, and no site id outlives its inode (meta/sites/,
RELINK_LEVEL). 15: FoldCapture (a linked site's creates, attributes and content captured later, in
batches: meta/sites/, FOLD_LEVEL). 14: the other site's edits judged, and deleted
directories released, alike whatever each site forgot (meta/sites/, SITE_PATHS_LEVEL). 13: MakeTmpfile, LinkTmpfile (open's O_TMPFILE). 12: mkdir has no subdirectory limit (meta/cluster_sm.py,
UNLIMITED_SUBDIRS_LEVEL). 11: volumes replicate to the other site (a member
captures CreateVolume, ResizeVolume and DeleteVolume, and applies the other site's `VolumeSet`
operations; meta/sites/, VOLUMES_LEVEL). 10: cross-site replication on a cluster (an ApplyRemote
is refused while another member holds a delegation or write lease of what it changes, so
LinkSite, which starts replication, waits until every member applies ApplyRemote that way),
UpdateSiteLink. 9: ApplyRemoteSharing. 8: ResolveConflict. 7: the cross-site replication commands. 6: the tiering commands (and block addresses in objects,
meta/tiered.py). 5: Preallocate (and unwritten extents, which a WriteData
may then write in place). 4: PunchHole, CloneRange, SetLogLevel.

A member on an older build stops applying the log at the first command it cannot decode, so in a
rolling upgrade no member may propose a newer command before every member runs a build that
decodes it. The cluster records the level all its members reach (`SetLogLevel`, raised by the
leader once every member says it can: cluster/duties.py) and a proposer checks it
(`MetaClient.may_propose`). A single node has no one to wait for. A member on a build below the
recorded level (a downgrade) does not start, and one that meets a command it cannot decode stops
with `LogAheadOfBuild`."""
VOLUMES_LEVEL = 11
"""From this level on, a linked cluster ships its volumes (what every replica captures changes)."""
SITE_PATHS_LEVEL = 14
"""From this level on, forgetting keeps the moves on a path into TRASH that an edit may still be judged against
and releases a deleted directory only once nothing below it moved in later, a local delete of a directory judges
the files below it, and a group named like a derived name re-derives the names of the group it came from
(meta/sites/; no command of its own: what every replica keeps and shows changes, so all must do alike)."""
FOLD_LEVEL = 15
"""From this level on, a linked site records what a create, an attribute change, an extended
attribute or a content write did and folds it into the replicated state later (FoldCapture),
instead of capturing it in the command: every replica must record alike."""
RELINK_LEVEL = 16
"""From this level on, `UnlinkSite` keeps the site tables for a relink to the same site (a second one, or a link
to another site, drops them), a purged inode's site id goes with it, and a new object whose id an older one still
holds gets a fresh one (meta/sites/relink.py; no command of its own: every replica must keep alike)."""
SEED_LEVEL = 20  # a first link walks in slices, seeding on demand what a rename moves (meta/sites/seeding.py)
CONTENT_TIME_LEVEL = 20  # a site stamps WriteData content with its writes' time (meta/sites/capture.py content_time)
UNSEEDED_NAMES_LEVEL = 21
"""From this level on, five rules for the names the initial sync's walk had not reached yet
(meta/sites/seeding.py; found by its random test): a local move that gives a name to a file with an
open edit-against-delete record judges the record again (capture.py `_local_moves`), as the peer
does when it applies that move, so the walk's seed of such a name closes the record on both sites;
a file whose tree entries were all deleted and released while it lived on under such a name is
released when that name goes (forget.py `keeps`), where nothing released it before; a file sent
again is kept until the move naming it arrives (`revived:`); an entry waiting for a name skips a
derived name the tree holds (view.py); and a directory the walk skipped while deleted is walked once
it comes back (seeding.py `_walk_again`). No command of its own: every replica must judge and keep
alike (design note 109)."""
WRITEBACK_CONTENT_LEVEL = 19
"""From this level on, a linked site captures every WriteData that changes content
(`WriteData.changes_content`), not only those that `touch`: the kernel's write-back keeps the times
and was taken for a compaction, so its bytes never reached the other site (no command of its own:
what every replica captures changes, so all must capture alike)."""
LEASE_READS_LEVEL = 22
"""From this level on, a Raft leader answers read barriers from its lease (docs/raft.md, design note
123): a member on an older build keeps the promise the lease rests on only while it knows a leader.
No command of its own: what a leader may answer alone changes."""
HOLDER_WIRE_LEVEL = 25
"""From this level on, a member asks a directory's holder to look or create on the Raft wire
(meta/replication/wire_calls.py, design note 147), not over gRPC: a build before it closes a wire
connection that carries a frame of a kind it does not know. No command of its own."""
READ_POINT_WIRE_LEVEL = 26
"""From this level on, a follower asks the leader for a read point on the Raft wire (KIND_READ_POINT,
meta/replication/wire_calls.py, design note 153) before it falls back to Raft's ReadIndex: a build
before it closes a wire connection that carries a frame of a kind it does not know. No command of
its own."""
UNLIMITED_SUBDIRS_LEVEL = 12
"""From this cluster log level on, mkdir has no subdirectory limit, as ext4 with `dir_nlink`
(its default). It changes what an applied Mknod does, so a member on an older build, which
refuses the 64,999th, must not apply the same log: the level waits for every member's build."""
