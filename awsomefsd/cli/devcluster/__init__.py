"""A whole cluster on one machine: private network namespaces (network.py), the members on one shared
image (members.py) and `awsomefsd dev --nodes N` (session.py). The cluster tests use it too."""
