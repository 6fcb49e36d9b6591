"""The supervisor: the loop that owns all state and side effects, one CoreDNS slot per instance."""
