"""The soak's fault schedule: which fault comes next, with which parameters, after how long a pause.

Everything is drawn from one ``random.Random(seed)``, in a fixed order, so a seed names a run's sequence of
faults exactly; only the times differ between two runs of one seed (they depend on how fast the agent
recovers). Pure: no clock, no I/O, unit-tested.

The rules, and why:

- Each agent process ("incarnation": the first agent, then one per restart) first goes through a
  **warm-up round**: every fault kind that leaves it running, once each, in random order. Its resource
  baseline is taken after that round, so code paths run for the first time (lazy imports, caches, the first
  reload) are not mistaken for a leak.
- After the warm-up, kinds are drawn uniformly at random. A kind that ends the agent (SIGKILL and restart)
  becomes possible only after ``judge_after`` more faults, so every incarnation that is restarted has lived
  long enough to be judged for leaks; it becomes due (forced) after ``restart_after`` faults, so a run of any
  length restarts the agent.
- Faults never overlap: the next is injected once the previous one has recovered and a random pause
  (``gap``) has passed. The xtables-lock faults combine the lock with what makes the agent need it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

KINDS: tuple[str, ...] = (
    "sigkill_coredns",
    "sigstop_coredns",
    "flush_rules",
    "remove_address",
    "configmap_valid",
    "configmap_invalid",
    "lock_flush_rules",
    "lock_sigkill_coredns",
    "restart_agent",
    "lock_restart_agent",
)
TITLES: dict[str, str] = {
    "sigkill_coredns": "SIGKILL CoreDNS",
    "sigstop_coredns": "SIGSTOP CoreDNS",
    "flush_rules": "flush the agent's rules",
    "remove_address": "remove a local address",
    "configmap_valid": "valid ConfigMap swap",
    "configmap_invalid": "invalid ConfigMap swap",
    "lock_flush_rules": "xtables lock held, rules flushed",
    "lock_sigkill_coredns": "xtables lock held, CoreDNS SIGKILLed",
    "restart_agent": "SIGKILL agent and CoreDNS, restart",
    "lock_restart_agent": "SIGKILL agent and CoreDNS, restart under a held xtables lock",
}
# Kinds that end the agent process (a new one is started).
RESTARTS = frozenset({"restart_agent", "lock_restart_agent"})
# Kinds that hold the xtables lock; iptables-nft takes no lock, so they mean something only on legacy.
HOLD_LOCK = frozenset({"lock_flush_rules", "lock_sigkill_coredns", "lock_restart_agent"})
# Which of the agent's rules a flush removes: all of them, or those of one table.
FLUSH_SCOPES = ("all", "raw", "filter")
# A valid swap toggles the stub domain (so the change is visible in a pod's answer), spelling its server one
# of the ways the kube-dns ConfigMap allows.
STUB_SPELLINGS = ("{ip}", "{ip}:5353", "dns://{ip}:53")
# Invalid ConfigMaps the agent must reject, keeping the last good Corefile (see bench.chaos for the data).
INVALID_CONFIGMAPS = ("malformed_json", "too_many_upstreams", "host_name", "not_utf8", "cluster_domain")


def kinds_for(flavour: str) -> tuple[str, ...]:
    """The kinds a run on ``flavour`` draws from: iptables-nft ignores the xtables lock, so holding it
    would test nothing there."""
    return KINDS if flavour == "legacy" else tuple(k for k in KINDS if k not in HOLD_LOCK)


@dataclass(frozen=True)
class PlanSettings:
    seed: int
    kinds: tuple[str, ...] = KINDS
    addresses: tuple[str, ...] = ("169.254.20.10", "10.96.0.10")
    gap: tuple[float, float] = (1.0, 4.0)  # seconds of quiet between a recovery and the next fault
    lock_hold: tuple[float, float] = (2.0, 6.0)  # seconds the xtables lock is held
    judge_after: int = 4  # faults after the warm-up round before an agent may be restarted
    restart_after: int = 12  # faults after the warm-up round by which an agent is restarted

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        if not set(self.kinds) - RESTARTS:
            raise ValueError("the kinds must include at least one that leaves the agent running")
        for name, (low, high) in (("gap", self.gap), ("lock_hold", self.lock_hold)):
            if not 0 <= low <= high:
                raise ValueError(f"{name}: {low}..{high} is not a range of seconds")
        if not 0 <= self.judge_after <= self.restart_after:
            raise ValueError(f"judge_after {self.judge_after} must be between 0 and restart_after")


@dataclass(frozen=True)
class Fault:
    index: int  # 0, 1, … in the order of injection
    kind: str
    gap: float  # seconds of quiet before it
    incarnation: int  # the agent process it hits: 0 is the first, +1 after each restart
    warmup: bool  # part of that agent's warm-up round
    params: Mapping[str, str | float] = field(default_factory=dict)


def schedule(settings: PlanSettings) -> Iterator[Fault]:
    """The run's faults, endless; the caller stops drawing when its time is up."""
    rng = random.Random(settings.seed)
    in_process = [k for k in settings.kinds if k not in RESTARTS]
    restarts = [k for k in settings.kinds if k in RESTARTS]
    stub_present = False
    index = incarnation = 0
    while True:
        warmup = rng.sample(in_process, len(in_process))
        after_warmup = 0
        while True:
            if warmup:
                kind, warming = warmup.pop(0), True
            else:
                kind = _next_kind(rng, in_process, restarts, after_warmup, settings)
                warming = False
                after_warmup += 1
            params, stub_present = _params(rng, kind, stub_present, settings)
            gap = round(rng.uniform(*settings.gap), 2)
            yield Fault(index, kind, gap, incarnation, warming, params)
            index += 1
            if kind in RESTARTS:
                incarnation += 1
                break


def _next_kind(
    rng: random.Random, in_process: Sequence[str], restarts: Sequence[str], done: int, s: PlanSettings
) -> str:
    if restarts and done >= s.restart_after:
        return rng.choice(restarts)
    choices = [*in_process, *restarts] if done >= s.judge_after else list(in_process)
    return rng.choice(choices)


def _params(
    rng: random.Random, kind: str, stub_present: bool, s: PlanSettings
) -> tuple[dict[str, str | float], bool]:
    """The fault's parameters, and whether the stub domain is configured after it."""
    params: dict[str, str | float] = {}
    if kind in HOLD_LOCK:
        params["hold_s"] = round(rng.uniform(*s.lock_hold), 2)
    if kind in ("flush_rules", "lock_flush_rules"):
        params["scope"] = rng.choice(FLUSH_SCOPES)
    elif kind == "remove_address":
        params["address"] = rng.choice(s.addresses)
    elif kind == "configmap_valid":
        stub_present = not stub_present
        params["stub"] = rng.choice(STUB_SPELLINGS) if stub_present else ""
    elif kind == "configmap_invalid":
        params["invalid"] = rng.choice(INVALID_CONFIGMAPS)
    return params, stub_present
