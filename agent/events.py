"""Events posted to the supervisor. Threads (child waiter, probes, watchers, signals) only post these."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class ProbeResult:
    pid: int  # the CoreDNS child the probe was made for; results for an older child are ignored
    ok: bool
    detail: str
    latency: float  # seconds, the slowest of the round's DNS probes
    silent: bool = False  # no answer at all: bound (the kernel gate open) but not answering
    wrong_answer: bool = False  # answered, but not as CoreDNS answers the probe zone (see health.Outcome)
    busy: bool = False  # silent, but CoreDNS used the CPU meanwhile: a backlog, not a hang (health.BusyMeter)
    stalled: bool = False  # silent, and the kernel confirms a hang (health.StallWatch)
    at: float = 0.0  # time.monotonic() when the round ended (0: unknown)


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
