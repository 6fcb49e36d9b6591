"""The supervisor's clocks, in one frozen record."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """The supervisor's clocks, in seconds. Defaults are chosen for DNS: fail over in well under a second,
    detect a hang within 3 s, never wait unboundedly."""

    # Restart delay after the n-th consecutive failure: min(backoff_max, backoff_base * 2**(n-1)).
    backoff_base: float = 0.25
    backoff_max: float = 10.0
    # Running healthily this long forgives earlier failures (the backoff starts over).
    backoff_reset_after: float = 30.0
    # A CoreDNS that does not answer on every local address this long after launch is restarted.
    start_timeout: float = 15.0
    # Consecutive failed probe rounds that make a running CoreDNS "hung" (with 0.5 s rounds: within 3 s).
    hang_after_failures: int = 3
    # How long a SIGUSR1 reload may take before it counts as failed.
    reload_timeout: float = 5.0
    # After a failed reload, try the new configuration again after this long.
    reload_retry: float = 30.0
    # Shutdown: CoreDNS gets this long after SIGTERM before SIGKILL; the whole shutdown is bounded by
    # shutdown_budget (the DaemonSet's grace period is longer).
    stop_grace: float = 3.0
    shutdown_budget: float = 10.0
    # Between removing the rules and stopping CoreDNS: queries already on their way to it are answered.
    drain: float = 0.2
    # Handing the node to another agent: how long to wait for its CoreDNS to bind before ours stops.
    handover_wait: float = 5.0
    # How often the status file, the watchdog and the memory gauges are refreshed: far inside the liveness
    # check's 10 s and systemd's 30 s watchdog, and cheap enough for the idle budget.
    heartbeat: float = 2.0
    # The inputs are rendered again this often even without a change notification (a resolv.conf edit, a
    # missed event); an unchanged render costs about a millisecond and changes nothing.
    rerender: float = 30.0

    def backoff(self, failures: int) -> float:
        """The restart delay after ``failures`` consecutive failures (none yet: the base delay)."""
        return min(self.backoff_max, self.backoff_base * 2.0 ** max(0, failures - 1))
