"""Tiering cold data extents to S3-compatible object storage (DESIGN §11, issue 16).

Built so far: the store client (store.py: GET with a range, PUT, DELETE, each answer checked,
retries with backoff), its request signing (sigv4.py) and credentials (credentials.py). The
tiering engine that moves extents, the caches and the commands come next; nothing here is used
by the daemon yet.
"""
