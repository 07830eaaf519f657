"""The cluster PKI: one CA per cluster, one key and certificate per node.

A PKI directory (what ``mesh pki`` writes, and what Swarm secrets carry to a node)::

    ca.crt  ca.key          the cluster CA; its URI SAN spiffe://<cluster> names the cluster
    <node>.crt  <node>.key  one pair per node; its URI SAN spiffe://<cluster>/node/<node>
                            is the node's identity

Peers are identified by that URI SAN, never by hostname: nodes reach each other by
overlay IPs and service names that change, while the identity in the certificate does
not. The URI follows the SPIFFE X509-SVID convention (spiffe.io, "X509-SVID" section 2).
"""

from mesh.pki.ca import init_ca, issue, node_sans, sign_leaf
from mesh.pki.certs import identity_from_der, identity_from_ssl
from mesh.pki.files import (
    CA_CERT,
    CA_KEY,
    CertInfo,
    ClusterCa,
    cluster_of,
    load_ca,
    load_cert,
    load_key,
    load_node,
    show,
    write_cert,
    write_key,
)
from mesh.pki.tls import NodeCredentials, NodeIdentity, client_ssl_context, server_ssl_context

# The PKI's whole API: files (mesh.pki.files), checks and identities (mesh.pki.certs),
# issuing (mesh.pki.ca), TLS contexts (mesh.pki.tls); enrolment is mesh.pki.enroll.
__all__ = [
    "CA_CERT", "CA_KEY", "CertInfo", "ClusterCa", "NodeCredentials", "NodeIdentity",
    "client_ssl_context", "cluster_of", "identity_from_der", "identity_from_ssl", "init_ca",
    "issue", "load_ca", "load_cert", "load_key", "load_node", "node_sans", "server_ssl_context",
    "show", "sign_leaf", "write_cert", "write_key",
]
