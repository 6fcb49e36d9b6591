"""The supervisor's states for CoreDNS, in one tiny module (supervisord's shape)."""

from __future__ import annotations

from enum import StrEnum


class CoreDnsState(StrEnum):
    STOPPED = "stopped"  # not started yet, or stopped for good at shutdown
    STARTING = "starting"  # launched; waiting for the first healthy probe on every local address
    RUNNING = "running"  # healthy: answering on every local address; host-traffic rules installed
    BACKOFF = "backoff"  # exited, hung or never became healthy; restarts when the backoff delay ends
    STOPPING = "stopping"  # the agent is shutting down

    @property
    def serving(self) -> bool:
        """True only while the node's DNS goes through the local cache for host traffic too."""
        return self is CoreDnsState.RUNNING
