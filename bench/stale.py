"""kube-dns unreachable (every DNS packet to it dropped, :func:`harness.kubednslink.unreachable`) while a pod
asks, at a constant rate, for names the cache answered earlier and that have expired since: answered (stale)
and failed queries with the agent's default ``--serve-stale`` and with it off (``--serve-stale 0``, as
node-cache's Corefile has no ``serve_stale``).

The names are the sandbox's short-lived Services (a 1 s TTL, kept for CoreDNS's 5 s minimum): each is asked
once through the ClusterIP, then the run waits until every entry has expired, then cuts kube-dns off and
starts the load.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.node import Node
from harness import kubednslink
from harness import sandbox as sb

VARIANTS: dict[str, tuple[str, ...]] = {"on": (), "off": ("--serve-stale=0",)}
TITLES = {"on": "`--serve-stale` (default: 1h, verify)", "off": "`--serve-stale 0` (node-cache's Corefile)"}
NAMES = tuple(sb.SERVICES.short_lived)
# CoreDNS's cache keeps an entry at least 5 s (its minimum TTL); the wait starts after the last name is asked.
EXPIRED_AFTER = 6.5


@dataclass(frozen=True)
class StalePlan:
    rate: float = 1000.0  # queries per second from the pod, round-robin over the names
    outage: float = 10.0  # seconds kube-dns is unreachable; the load runs for exactly that long


def measure(node: Node, plan: StalePlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Both variants on a reset node (left reset)."""
    out: dict[str, Any] = {}
    for variant, flags in VARIANTS.items():
        try:
            out[variant] = _outage(node, plan, flags)
        finally:
            node.reset()
        r = out[variant]
        log(f"  serve-stale {variant:3}: {r['answered']} answered, {r['failed']} failed of {r['sent']}")
    return out


def _outage(node: Node, plan: StalePlan, flags: tuple[str, ...]) -> dict[str, Any]:
    box = node.box
    node.start_agent("ours", extra=flags)
    node.warm(box.pod(0), sb.KUBE_DNS_IP, list(NAMES))
    time.sleep(EXPIRED_AFTER)
    with kubednslink.unreachable(box):
        load = node.load(rate=plan.rate, duration=plan.outage, names=",".join(NAMES))
        result = load.result()
    return {
        "sent": result["sent"],
        "answered": result["answered"],
        "failed": result["failed"],
        "longest_gap_s": result["longest_gap"],
        "errors": result["errors"],
    }


def plan_dict(plan: StalePlan) -> dict[str, Any]:
    return {**asdict(plan), "names": len(NAMES)}
