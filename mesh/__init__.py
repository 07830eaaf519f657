"""meshsync: keep a directory identical on every node of a Docker Swarm cluster."""

__version__ = "0.1.0"
