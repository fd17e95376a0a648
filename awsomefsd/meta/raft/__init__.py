"""meta/raft"""
