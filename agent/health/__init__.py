"""Health of a CoreDNS child: probes and hang detection."""
