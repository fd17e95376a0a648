"""Tiering cold data extents to S3-compatible object storage (DESIGN §11, issue 16).

Built so far: the store client (store.py: GET with a range, PUT, DELETE, each answer checked,
retries with backoff), its request signing (sigv4.py) and credentials (credentials.py), and the
read side: the memory and disk chunk caches (cache.py) and the reader that checks every block it
returns, fails within a timeout when the store is down, and prefetches (reader.py). The engine
that moves extents into objects, the extent records that point into them, GC and the commands
come next; the daemon does not use this package yet.
"""
