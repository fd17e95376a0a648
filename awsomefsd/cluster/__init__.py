"""Cluster formation and security: the cluster CA (`ca`), join tokens and proofs (`token`), mutual
TLS credentials and the revocation guard (`tls`), the bootstrap join service (`join_service`) and
member discovery (`discovery`). docs/cluster-security.md describes the protocol."""
