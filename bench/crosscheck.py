"""Optional, by hand: the SIGKILL scenario once with the REAL node-cache, to check that the reproduction
(:mod:`bench.failover`, the agent with node-cache's switches) loses what node-cache loses.

    sudo .venv/bin/python -m bench.crosscheck --binary /path/to/node-cache

This project cannot build node-cache (the Go module proxy refuses ``k8s.io/dns``), so ``make bench`` never
runs this; where someone has a binary, this writes ``bench/results/crosscheck.json`` and the README section
quotes it. node-cache runs only inside the sandbox's node namespace (:mod:`harness.nodecache`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.failover import FailoverPlan, run_scenario
from bench.node import SERVICE, Node
from bench.report import write_atomically
from harness import nodecache
from harness import sandbox as sb

REPO = Path(__file__).resolve().parents[1]


def real_sigkill(binary: str, plan: FailoverPlan) -> dict[str, Any]:
    """node-cache serving; the load; SIGKILL at ``fault_at``; a new node-cache ``kubelet_delay`` later."""
    with sb.sandbox("nft") as box:
        node = Node(box)
        with nodecache.running(box, binary=binary) as first:
            node.warm(box.pod(0), sb.KUBE_DNS_IP, [SERVICE])
            load = node.load(rate=plan.rate, duration=plan.duration)
            start = load.started()
            time.sleep(max(0.0, start + plan.fault_at - time.monotonic()))
            fault = time.monotonic()
            first.kill()
            time.sleep(plan.kubelet_delay)
            restarted = time.monotonic()
            second = nodecache.start(box, binary=binary, wait=False)
            try:
                result = load.result()
                second.wait_ready()
            finally:
                second.kill()
    return {
        "sent": result["sent"],
        "failed": result["failed"],
        "longest_gap_s": result["longest_gap"],
        "fault_at_s": round(fault - start, 3),
        "restarted_at_s": round(restarted - start, 3),
        "errors": result["errors"],
        "answers_per_100ms": result["answers_per_100ms"],
    }


def modelled_sigkill(plan: FailoverPlan) -> dict[str, Any]:
    with sb.sandbox("nft") as box:
        node = Node(box)
        try:
            node.reset()
            return run_scenario(node, "node_cache", "sigkill_coredns", plan)
        finally:
            node.kill_all()


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.crosscheck")
    p.add_argument("--binary", default=nodecache.NODE_CACHE_BINARY)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crosscheck.json")
    a = p.parse_args()
    reason = nodecache.unavailable(a.binary)
    if reason:
        print(f"bench.crosscheck: {reason}", file=sys.stderr)
        return 2
    plan = FailoverPlan()
    try:
        real = real_sigkill(a.binary, plan)
        model = modelled_sigkill(plan)
    finally:
        left = sb.leftovers(sb.CREATED_RUNS)
        if left:
            sb.remove_leftovers_of(sb.CREATED_RUNS)
            print(f"bench.crosscheck: removed leftovers: {left}", file=sys.stderr)
    out = {
        "version": nodecache.NODE_CACHE_VERSION,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kubelet_delay": plan.kubelet_delay,
        "rate": plan.rate,
        "duration": plan.duration,
        "real": real,
        "model": model,
    }
    write_atomically(a.out, json.dumps(out, indent=1) + "\n")
    for name, r in (("real node-cache", real), ("reproduction", model)):
        print(f"{name:16} failed {r['failed']:5}  longest gap {r['longest_gap_s']:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
