"""node-local-dns agent: supervises CoreDNS as a node's DNS cache and never leaves the node without DNS."""

__version__ = "0.1.0"
