"""The node's networking: the interface, netlink, the packet filter, the agents lock, teardown."""
