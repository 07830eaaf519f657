"""The names of a cluster and of a node: as the certificates carry them (the SPIFFE
URI, ``mesh.pki.tls``) and as the configuration takes them (``mesh.config``). Apart
from ``mesh.pki``, whose certificate machinery (``cryptography``) the configuration
does not need: the agent's start-up walk begins before it is imported (issue 16)."""

CLUSTER_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
NODE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
