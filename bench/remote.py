"""The data path with kube-dns "on another node": every packet on the sandbox's kube-dns link held a modelled
network delay each way (:func:`harness.kubednslink.delayed`; this kernel has no ``tc netem``), and the latency
of cached names from a pod through the ClusterIP, side by side in one run: with no local cache (kube-proxy's
DNAT to kube-dns, over the delayed link) and through the agent's cache (answered on the node).

In the plain data-path rows kube-dns is a namespace next to the node, so the two paths are equally short; here
the path without a cache pays the round trip to another node, as it does in a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench import datapath
from bench.node import Node
from harness import kubednslink
from harness import sandbox as sb

PATHS = ("no_agent", "ours")
TITLES = {
    "no_agent": "ClusterIP → kube-proxy DNAT → kube-dns on the delayed link",
    "ours": "ClusterIP → agent's CoreDNS (cached)",
}


@dataclass(frozen=True)
class RemotePlan:
    one_way_ms: float = 0.5  # the modelled delay on the kube-dns link, each way
    seconds: float = 5.0  # each dnsperf run
    # Below the data-path rows' 5000 qps: every packet of the no-cache path passes the user-space delay.
    latency_qps: int = 2000
    settle: float = 2.0  # seconds between the agent's start and its run (its own start-up work is done)


def measure(node: Node, plan: RemotePlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Both paths under the same delay, on a reset node (left reset)."""
    box = node.box
    queries, pod = str(datapath.cached_queries(box)), box.pod(0)
    out: dict[str, Any] = {}
    try:
        with kubednslink.delayed(box, plan.one_way_ms) as link:
            for path in PATHS:
                if path == "ours":
                    node.start_agent("ours")
                    time.sleep(plan.settle)
                out[path] = datapath.latency(box, pod, sb.KUBE_DNS_IP, queries, seconds=plan.seconds,
                                             qps=plan.latency_qps)  # fmt: skip
                r = out[path]
                log(f"  {path:10} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms")
        out["link"] = link  # packets delayed, and how late the worst one left
    finally:
        node.reset()
    return out


def plan_dict(plan: RemotePlan) -> dict[str, Any]:
    return asdict(plan)
