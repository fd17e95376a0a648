"""The Raft runtime: what runs the pure core (`awsomefsd.meta.raft`) on a real node.

The core decides; this package does what it asks — persists to LMDB, sends over gRPC, applies,
answers proposers and readers, ships snapshots, forwards a follower's proposals to the leader.
docs/raft.md describes the pieces and the durability order they keep.
"""
