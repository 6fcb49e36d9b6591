"""CoreDNS twins (``--coredns-instances 2``) on the link-local address, where no kube-dns stands behind the
cache (IPVS mode, a pod with a custom dnsConfig): a CoreDNS lost under load with one instance, with twins,
and with the real node-cache; and what twins cost (memory, and the queries sent on to kube-dns, since each
twin has its own cache).

The faults are :mod:`bench.failover`'s own: SIGKILL of a CoreDNS (node-cache: the whole process, restarted
by the kubelet), and a CoreDNS frozen by the cgroup freezer, a hang with no stop notice (node-cache: nothing
notices). With twins the first CoreDNS is the one hit.

The cache's cost: ``names`` distinct names (a wildcard zone in the sandbox's kube-dns), each asked ``asks``
times round-robin at ``rate`` from a pod on the link-local address; kube-dns's own request counter says how
many reached it. Every query comes from a fresh source port, so the kernel hands each to either twin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from bench import failover
from bench.node import Node
from harness import sandbox as sb

VARIANTS: dict[str, tuple[str, ...]] = {"one": (), "twins": ("--coredns-instances", "2")}
COLUMNS = ("one", "twins", "node_cache")
FAULTS = ("sigkill_coredns", "frozen_coredns")
TITLES = {
    "sigkill_coredns": "SIGKILL of a CoreDNS",
    "frozen_coredns": "a CoreDNS frozen (a hang with no stop notice)",
}


@dataclass(frozen=True)
class TwinsPlan:
    rate: float = 1000.0  # queries per second from the pod, to the link-local address
    duration: float = 10.0  # seconds of load per fault run
    fault_at: float = 3.0  # seconds into the load
    names: int = 1000  # distinct names for the cache's cost
    asks: int = 5  # times each name is asked (round-robin: each asked again names / rate seconds later)


def measure(node: Node, plan: TwinsPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Every fault for each column, then the cache's cost for each variant, on a reset node (left reset)."""
    fo_plan = failover.FailoverPlan(rate=plan.rate, duration=plan.duration, fault_at=plan.fault_at)
    faults: dict[str, dict[str, Any]] = {}
    for fault in FAULTS:
        faults[fault] = {}
        for column in COLUMNS:
            kind, flags = ("node_cache", ()) if column == "node_cache" else ("ours", VARIANTS[column])
            r = failover.run_scenario(node, kind, fault, fo_plan, server=sb.LOCAL_IP, extra=flags)
            faults[fault][column] = {k: v for k, v in r.items() if k != "answers_per_100ms"}
            log(f"  {fault:16} {column:10} failed {r['failed']:5}  longest gap {r['longest_gap_s']:.3f}s")
    cache: dict[str, Any] = {}
    for variant, flags in VARIANTS.items():
        try:
            cache[variant] = _cache_cost(node, plan, flags)
        finally:
            node.reset()
        c = cache[variant]
        log(f"  cache {variant:6}: {c['upstream']} of {c['sent']} sent on to kube-dns, "
            f"CoreDNS {c['coredns_rss_mib']} MiB")  # fmt: skip
    return {"faults": faults, "cache": cache}


def _cache_cost(node: Node, plan: TwinsPlan, flags: tuple[str, ...]) -> dict[str, Any]:
    box = node.box
    agent = node.start_agent("ours", extra=flags)
    names = [f"n{i}.{sb.BULK_DOMAIN}" for i in range(plan.names)]
    before = box.kube_dns_queries()
    load = node.load(rate=plan.rate, duration=plan.names * plan.asks / plan.rate, server=sb.LOCAL_IP,
                     names=",".join(names))  # fmt: skip
    result = load.result()
    time.sleep(0.5)  # the last forwarded queries reach kube-dns's counter
    upstream = box.kube_dns_queries() - before
    rss = sum(psutil.Process(pid).memory_info().rss for pid in agent.coredns_pids())
    return {
        "sent": result["sent"],
        "failed": result["failed"],
        "upstream": upstream,
        "hit_rate": round(1 - upstream / max(1, int(result["sent"])), 3),
        "coredns_rss_mib": round(rss / (1 << 20), 1),
        "coredns_processes": len(agent.coredns_pids()),
    }


def plan_dict(plan: TwinsPlan) -> dict[str, Any]:
    return asdict(plan)
