"""fs: the filesystem layer between the FUSE binding and {the metadata client, io} (docs/architecture.md)."""
