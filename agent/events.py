"""Events posted to the supervisor. Threads (child waiter, probes, watchers, signals) only post these."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ChildExited:
    pid: int
    returncode: int  # negative: killed by that signal (Popen's convention)


@dataclass(frozen=True)
class ChildStopped:
    """The kernel stopped the child (SIGSTOP, SIGTSTP, …): it cannot answer until someone resumes it."""

    pid: int
    signum: int


@dataclass(frozen=True)
class ChildOutput:
    """A line of CoreDNS output that matters to the supervisor (reload outcomes)."""

    pid: int
    line: str


class Verdict(StrEnum):
    """What one probe round says of a CoreDNS child: decided once, by the prober (agent.health.probe), and
    mapped by the supervisor to what it does, nothing else. Defined here, beside the event that carries it,
    so that the events stay the bottom layer every thread can post."""

    HEALTHY = "healthy"  # every local address answered the probe zone (and /health said 200 when asked)
    # A DNS query failed (refused, unreachable): not bound yet while starting, gone or broken after. Pod
    # queries go to kube-dns meanwhile (the kernel gate is closed without a bound socket).
    NOT_LISTENING = "not listening"
    PROBE_ERROR = "probe error"  # the probe itself raised: shown as a failing probe, never as silence
    # Answered, but not as CoreDNS answers the probe zone: most likely not the local CoreDNS at all (the
    # probe rules are gone and kube-proxy sent the probe to kube-dns). The probe's path is broken.
    WRONG_ANSWER = "wrong answer"
    SILENT = "silent"  # no DNS answer at all: bound (the kernel gate open) but not answering
    BUSY = "busy"  # silent, but CoreDNS used the CPU meanwhile: a backlog, not a hang (health.BusyMeter)
    STALLED = "stalled"  # silent, and the kernel confirms a hang (health.StallWatch)
    HEALTH_ENDPOINT_FAILED = "health endpoint failed"  # DNS answered; /health refused or said not 200
    HEALTH_ENDPOINT_SILENT = "health endpoint silent"  # DNS answered; /health did not answer in time
    HEALTH_ENDPOINT_BUSY = "health endpoint busy"  # /health silent, but CoreDNS used the CPU meanwhile

    @property
    def ok(self) -> bool:
        return self is Verdict.HEALTHY

    @property
    def endpoint(self) -> str:
        """Which probe failed, for the probe-failure metric's label: ``health`` or ``dns``."""
        return "health" if self.name.startswith("HEALTH_ENDPOINT") else "dns"

    @property
    def silent(self) -> bool:
        """No answer within the timeout (busy ones excepted): something holds the socket but does not
        answer, so pod queries are being lost."""
        return self in (Verdict.SILENT, Verdict.STALLED, Verdict.HEALTH_ENDPOINT_SILENT)

    @property
    def busy(self) -> bool:
        return self in (Verdict.BUSY, Verdict.HEALTH_ENDPOINT_BUSY)

    def but_busy(self) -> Verdict:
        """This silence, seen while CoreDNS kept the CPU busy."""
        return {
            Verdict.SILENT: Verdict.BUSY,
            Verdict.HEALTH_ENDPOINT_SILENT: Verdict.HEALTH_ENDPOINT_BUSY,
        }.get(self, self)


@dataclass(frozen=True)
class ProbeResult:
    pid: int  # the CoreDNS child the probe was made for; results for an older child are ignored
    verdict: Verdict
    detail: str
    latency: float  # seconds, the slowest of the round's DNS probes
    at: float = 0.0  # when the round ended, on the supervisor's clock (time.monotonic()); 0: unknown

    @property
    def ok(self) -> bool:
        return self.verdict.ok


@dataclass(frozen=True)
class ConfigChanged:
    source: str  # "kube-dns configmap dir", "template", "kube-dns configmap api", …


@dataclass(frozen=True)
class ApiConfigMap:
    """The kube-dns ConfigMap's data from the API watch; None when the ConfigMap does not exist."""

    data: dict[str, str] | None


@dataclass(frozen=True)
class NetworkChanged:
    what: str  # e.g. "nftables ruleset", "address removed"


@dataclass(frozen=True)
class Signal:
    signum: int


Event = (
    ChildExited
    | ChildStopped
    | ChildOutput
    | ProbeResult
    | ConfigChanged
    | ApiConfigMap
    | NetworkChanged
    | Signal
)
