"""Our own implementation of the FUSE kernel protocol on /dev/fuse (docs/fuse-transport.md)."""
