"""``make bench`` and ``make bench-quick``: the data path, the fault matrix and the agent's cost, side by side
with the real node-cache, in node sandboxes; results as JSON, the benchmarks page's section and the
SIGKILL plot.

    sudo .venv/bin/python -m bench.run [--quick] [--runs N] [--out DIR] [--doc docs/benchmarks.md]

Each repetition gets a fresh sandbox; every scenario inside it starts from a checked reset (no agent, no
rules, no interface, empty conntrack table). Every load is bounded in rate, count and time; the sandboxes
are removed on the way out, also on failure and on SIGTERM, and a final check looks for anything left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cost, datapath, failover, remote, report, stale, twins
from bench.node import Node
from bench.stats import median, median_of_runs
from harness import sandbox as sb

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    name: str
    runs: int
    datapath: datapath.DatapathPlan
    failover: failover.FailoverPlan
    cost: cost.CostPlan
    remote: remote.RemotePlan
    stale: stale.StalePlan
    twins: twins.TwinsPlan


# About 5.5 minutes a repetition on the 2-core machine: 3 repetitions take about 17 minutes.
FULL = Mode(
    "full",
    3,
    datapath.DatapathPlan(),
    failover.FailoverPlan(),
    cost.CostPlan(),
    remote.RemotePlan(),
    stale.StalePlan(),
    twins.TwinsPlan(),
)
QUICK = Mode(
    "quick",
    1,
    datapath.DatapathPlan(seconds=0.5, latency_qps=2000, conntrack_rate=1000.0, conntrack_seconds=0.5),
    failover.FailoverPlan(duration=1.5, fault_at=0.5),
    cost.CostPlan(
        start_repeats=1,
        check_repeats=3,
        restore_repeats=1,
        node_cache_restore_repeats=1,
    ),
    remote.RemotePlan(seconds=0.5, latency_qps=1000, settle=0.5),
    stale.StalePlan(outage=2.0),
    twins.TwinsPlan(duration=1.5, fault_at=0.5, names=200, asks=3),
)


_STARTED = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", flush=True)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))  # fmt: skip
    coredns = subprocess.run([sb.COREDNS, "-version"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "coredns": (coredns.stdout.splitlines() or ["unknown"])[0],
        "python": platform.python_version(),
    }


def repetition(mode: Mode, flavour: sb.Flavour, index: int) -> dict[str, Any]:
    log(f"== run {index + 1}/{mode.runs}")
    with sb.sandbox(flavour) as box:
        node = Node(box)
        try:
            node.reset()
            log("data path")
            dp = datapath.measure(node, mode.datapath, log)
            log(f"data path, kube-dns {mode.remote.one_way_ms:g} ms away each way")
            rk = remote.measure(node, mode.remote, log)
            log("failover")
            fo = failover.run_matrix(node, mode.failover, log)
            log("kube-dns unreachable, names expired")
            st = stale.measure(node, mode.stale, log)
            log("CoreDNS twins, link-local address")
            tw = twins.measure(node, mode.twins, log)
            log("agent cost")
            co = cost.measure(node, mode.cost, log)
        finally:
            node.kill_all()
    return {"datapath": dp, "remote": rk, "failover": fo, "stale": st, "twins": tw, "cost": co}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across runs (the timelines and error breakdowns stay in the raw runs)."""

    def trimmed(run: dict[str, Any]) -> dict[str, Any]:
        fo = {s: {k: {f: v for f, v in r.items() if f not in ("answers_per_100ms", "errors")}
                  for k, r in kinds.items()} for s, kinds in run["failover"].items()}  # fmt: skip
        return {**run, "failover": fo}

    return median_of_runs([trimmed(r) for r in runs])


def sigkill_timeline(runs: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """The SIGKILL scenario of the run whose baseline lost the median number of queries (ours from the same
    run), for the plot."""
    failed = [r["failover"]["sigkill_coredns"]["node_cache"]["failed"] for r in runs]
    pick = min(range(len(runs)), key=lambda i: (abs(failed[i] - median(failed)), i))
    scenario = runs[pick]["failover"]["sigkill_coredns"]
    keep = ("answers_per_100ms", "fault_at_s", "restarted_at_s", "failed", "longest_gap_s")
    kinds = {kind: {k: v for k, v in scenario[kind].items() if k in keep} for kind in scenario}
    return {"run": pick, "rate": rate, **kinds}


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.run")
    p.add_argument("--quick", action="store_true", help="every measurement once, shortly (about 75 s)")
    p.add_argument("--runs", type=int, help="repetitions (default: 3 full, 1 quick)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--doc", type=Path, help="rewrite this page's section between the bench markers")
    p.add_argument("--flavour", choices=["nft", "legacy"], default="nft")
    p.add_argument("--command", default=None, help="the command to name in the report")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables, conntrack)", file=sys.stderr)
        return 2
    mode = QUICK if a.quick else FULL
    runs = max(1, min(a.runs or mode.runs, 10))
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        for i in range(runs):
            results.append(repetition(mode, a.flavour, i))
    finally:
        left = sb.leftovers(sb.CREATED_RUNS)
        if left:
            sb.remove_leftovers_of(sb.CREATED_RUNS)
            print(f"bench: removed leftovers: {left}", file=sys.stderr)
    meta: dict[str, Any] = {
        "command": a.command or "python -m bench.run " + " ".join(sys.argv[1:]),
        "mode": mode.name,
        "runs": runs,
        "flavour": a.flavour,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - began, 1),
        "machine": machine(),
        "plans": {
            "datapath": datapath.plan_dict(mode.datapath),
            "failover": failover.plan_dict(mode.failover),
            "cost": cost.plan_dict(mode.cost),
            "remote": remote.plan_dict(mode.remote),
            "stale": stale.plan_dict(mode.stale),
            "twins": twins.plan_dict(mode.twins),
        },
    }
    out = {
        "meta": meta,
        "median": summarize(results),
        "sigkill_timeline": sigkill_timeline(results, mode.failover.rate),
        "runs": results,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    report.write_atomically(path, json.dumps(out, indent=1) + "\n")
    log(f"== {runs} run(s) in {meta['seconds']}s; results in {path}")
    log(report.write_report(path, a.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
