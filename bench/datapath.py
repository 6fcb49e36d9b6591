"""The data path, with dnsperf from a pod and cached names: through the kube-dns ClusterIP with the agent,
with the real node-cache (its rules and its compiled-in CoreDNS), with no local cache at all (kube-proxy's
DNAT to the kube-dns pod), and straight to the agent's CoreDNS on its local address from inside the node
(the ceiling: no veth, no routing between namespaces).

Per path: the highest rate dnsperf reaches (100 queries outstanding, its default), latency percentiles at a
fixed rate below saturation (so they show the path, not dnsperf's queue), and the conntrack entries a
glibc-like client sends through conntrack (a fresh socket per query, as ``getaddrinfo`` does; dnsperf reuses
one socket, which conntrack would count once): the queries conntrack handled, from its per-flow packet
counters, and the entries they left in the table (fewer: a reused source port joins a live entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.node import Node
from bench.stats import percentile
from harness import dnsperf
from harness import sandbox as sb

PATHS = ("ours", "node_cache", "no_agent", "ceiling")
TITLES = {
    "ours": "ClusterIP → agent's CoreDNS",
    "node_cache": "ClusterIP → node-cache",
    "no_agent": "ClusterIP → kube-proxy DNAT → kube-dns",
    "ceiling": "inside the node → agent's CoreDNS (ceiling)",
}


@dataclass(frozen=True)
class DatapathPlan:
    seconds: float = 5.0  # each dnsperf run
    latency_qps: int = 5000  # the fixed rate of the latency run
    conntrack_rate: float = 2000.0  # fresh-socket queries per second for the conntrack count
    conntrack_seconds: float = 5.0  # well under the 30 s UDP conntrack timeout: nothing expires meanwhile


def measure(node: Node, plan: DatapathPlan, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """All four paths on a reset node (left reset)."""
    box = node.box
    queries = cached_queries(box)
    pod = box.pod(0)
    out: dict[str, dict[str, Any]] = {}
    try:
        out["no_agent"] = _path(node, plan, str(queries), pod, sb.KUBE_DNS_IP, conntrack=True)
        log(_line("no_agent", out["no_agent"]))
        node.start_agent("ours")
        out["ours"] = _path(node, plan, str(queries), pod, sb.KUBE_DNS_IP, conntrack=True)
        log(_line("ours", out["ours"]))
        out["ceiling"] = _path(node, plan, str(queries), box.node, sb.LOCAL_IP, conntrack=False)
        log(_line("ceiling", out["ceiling"]))
        node.reset()
        node.start_server("node_cache")
        out["node_cache"] = _path(node, plan, str(queries), pod, sb.KUBE_DNS_IP, conntrack=True)
        log(_line("node_cache", out["node_cache"]))
    finally:
        node.reset()
    return {path: out[path] for path in PATHS if path in out}


def _path(node: Node, plan: DatapathPlan, queries: str, ns: str, server: str, *,
          conntrack: bool) -> dict[str, Any]:  # fmt: skip
    box = node.box
    names = [name for name, _ in dnsperf.cached_names()]
    warm(box, ns, server, queries)
    top = dnsperf.parse(
        box.exec(ns, dnsperf.argv(server, queries, seconds=plan.seconds), timeout=plan.seconds + 30)
    )
    result: dict[str, Any] = {
        "qps": round(top.qps, 1),
        "lost": top.lost,
        **latency(box, ns, server, queries, seconds=plan.seconds, qps=plan.latency_qps),
    }
    if conntrack:
        warm(box, ns, server, queries)
        node.count_conntrack()
        box.flush_conntrack()
        load = node.load(rate=plan.conntrack_rate, duration=plan.conntrack_seconds, server=server,
                         names=",".join(names), ns=ns)  # fmt: skip
        sent = int(load.result()["sent"])  # type: ignore[call-overload]
        entries, tracked = node.dns_flows()
        result["conntrack_queries_sent"] = sent
        result["conntrack_per_100k"] = round(tracked * 100_000 / sent) if sent else None
        result["conntrack_entries_per_100k"] = round(entries * 100_000 / sent) if sent else None
    return result


def cached_queries(box: sb.Sandbox) -> Path:
    """dnsperf's data file of every name the sandbox's kube-dns answers (see :func:`dnsperf.cached_names`)."""
    queries = box.workdir / "dnsperf-queries.txt"
    queries.write_text(dnsperf.data_file(dnsperf.cached_names()))
    return queries


def warm(box: sb.Sandbox, ns: str, server: str, queries: str) -> None:
    """Every name of the data file asked once, so the runs that follow are of cached names (before each
    run: a record's 30 s TTL may run out between runs)."""
    box.exec(ns, dnsperf.warm_argv(server, queries), timeout=30)


def latency(
    box: sb.Sandbox, ns: str, server: str, queries: str, *, seconds: float, qps: int
) -> dict[str, Any]:
    """Latency percentiles of the data file's names, warmed first, at a fixed rate below saturation."""
    warm(box, ns, server, queries)
    fixed_rate = dnsperf.argv(server, queries, seconds=seconds, max_qps=qps, verbose=True)
    timed = dnsperf.parse(box.exec(ns, fixed_rate, timeout=seconds + 30))
    lat = timed.latencies
    return {
        "latency_run_qps": round(timed.qps, 1),
        "p50_ms": round(percentile(lat, 50) * 1e3, 4) if lat else None,
        "p99_ms": round(percentile(lat, 99) * 1e3, 4) if lat else None,
        "p999_ms": round(percentile(lat, 99.9) * 1e3, 4) if lat else None,
    }


def _line(path: str, r: dict[str, Any]) -> str:
    per = r.get("conntrack_per_100k")
    return (f"  {path:10} {r['qps']:9.0f} qps  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
            f"p99.9 {r['p999_ms']} ms  conntrack/100k {per}")  # fmt: skip


def plan_dict(plan: DatapathPlan) -> dict[str, Any]:
    return asdict(plan)
