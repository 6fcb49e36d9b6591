"""The agent's own cost: the time from start to the first answer of the local cache; ``agent --check`` (the
liveness probe, run every few seconds on every node); and the time to restore flushed rules, the agent's and
the real node-cache's (with its default ``-syncinterval``, as the upstream manifest runs it).

The agent's memory and CPU, idle and under load, beside its CoreDNS and node-cache, are the footprint
benchmark's (bench/footprint.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.node import SERVICE, BenchError, Node, python_in, spawn
from bench.stats import median
from harness import sandbox as sb
from harness.agentproc import REPO, AgentProcess

# node-cache re-checks its rules every -syncinterval (default 60 s; the upstream manifest keeps it), so a
# flushed rule set is back after a wait anywhere in [0, 60 s): each sample waits up to this much and more.
NODE_CACHE_SYNC_INTERVAL = 60.0


@dataclass(frozen=True)
class CostPlan:
    start_repeats: int = 3
    check_repeats: int = 20
    restore_repeats: int = 5
    node_cache_restore_repeats: int = 2  # one check interval (60 s) each


def measure(node: Node, plan: CostPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """On a reset node (left reset)."""
    out: dict[str, Any] = {}
    try:
        starts = [start_to_first_answer(node) for _ in range(plan.start_repeats)]
        out["first_answer_s"] = round(median(s["first_answer_s"] for s in starts), 3)
        out["serving_s"] = round(median(s["serving_s"] for s in starts), 3)
        log(f"  start to first answer {out['first_answer_s']}s (serving: {out['serving_s']}s)")
        agent = node.start_agent("ours")
        out["check"] = check_cost(agent, plan.check_repeats, node.box.workdir)
        log(f"  agent --check: {out['check']['wall_ms']} ms, peak {out['check']['peak_rss_mib']} MiB")
        out["restore_s"] = round(median(restore_time(node) for _ in range(plan.restore_repeats)), 3)
        log(f"  flushed rules restored in {out['restore_s']}s")
        node.reset()
        samples = node_cache_restore_times(node, plan.node_cache_restore_repeats)
        out["node_cache_restore_s"] = round(median(samples), 3)
        out["node_cache_restore_max_s"] = round(max(samples), 3)
        log(f"  node-cache: flushed rules restored in {', '.join(f'{x:.1f}' for x in samples)}s")
    finally:
        node.reset()
    return out


def start_to_first_answer(node: Node) -> dict[str, float]:
    """A pod polls the link-local address every 5 ms while the agent starts: only the local cache answers
    there. The start is taken just before the agent's process is spawned."""
    box = node.box
    poller = spawn(box, box.pod(0), python_in("bench.firstanswer", "--server", sb.LOCAL_IP, "--name", SERVICE,
                                              "--timeout", "30"), "firstanswer")  # fmt: skip
    try:
        if poller.wait_line("ready", 15) is None:
            raise BenchError("the first-answer poller did not start")
        began = time.monotonic()
        agent = node.start_agent("ours", wait=False)
        agent.wait_serving(30)
        serving = time.monotonic() - began
        lines = poller.finish(35)
    finally:
        poller.kill()
    answered = json.loads(lines[-1])["answered_at"]
    if answered is None:
        raise BenchError("the local cache never answered the poller")
    node.reset()
    return {"first_answer_s": answered - began, "serving_s": serving}


def check_cost(agent: AgentProcess, repeats: int, workdir: Path) -> dict[str, Any]:
    """``agent --check`` against the live agent's status file, as the kubelet's exec probe runs it: wall time
    (median) and peak resident memory (the largest of any run). It reads one file, so it runs here, outside
    the namespaces.

    The peak comes from GNU time, not from this process's ``wait4``: a child forked from a large process keeps
    that process's resident high-water mark across ``exec`` (Linux carries it in ``signal->maxrss``), so
    ``ru_maxrss`` would report this benchmark's own size. GNU time is small and forks the check itself."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time is None:
        raise BenchError("GNU time (/usr/bin/time, Debian package 'time') is needed for the peak memory")
    report = workdir / "check-maxrss.txt"
    argv = [gnu_time, "-o", str(report), "-f", "%M", sys.executable, "-m", "agent", "--check",
            "--status-file", str(agent.status_file)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    walls: list[float] = []
    peak_kib = 0
    for _ in range(repeats):
        began = time.monotonic()
        proc = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, check=False)
        walls.append(time.monotonic() - began)
        if proc.returncode != 0:
            raise BenchError(f"agent --check failed against a live agent: {proc.stderr.strip()}")
        peak_kib = max(peak_kib, int(report.read_text().split()[-1]))
    return {"wall_ms": round(median(walls) * 1e3, 1), "peak_rss_mib": round(peak_kib / 1024, 1),
            "runs": repeats}  # fmt: skip


def node_cache_restore_times(node: Node, samples: int) -> list[float]:
    """node-cache's rules flushed ``samples`` times, at phases spread evenly over its check interval (the
    i-th at (i + 0.5) / samples of an interval after its start, one interval apart), each timed until the
    rules are back: a flush right after a check waits for the whole next one."""
    node.start_server("node_cache")
    began, sync = time.monotonic(), NODE_CACHE_SYNC_INTERVAL
    out = []
    for i in range(samples):
        time.sleep(max(0.0, began + (i + (i + 0.5) / samples) * sync - time.monotonic()))
        out.append(restore_time(node, sync + 15))
    return out


def restore_time(node: Node, within: float = 10.0) -> float:
    """Flush the node's raw and filter tables (what a careless ``iptables -F`` does) and time until the rule
    set is back as it was, as ``iptables-save`` shows it (at most ``within`` seconds)."""
    box = node.box

    def rules() -> list[str]:
        return sorted(box.save_rules().splitlines())

    before = rules()
    box.exec(box.node, [box.iptables(), "-t", "raw", "-F"])
    box.exec(box.node, [box.iptables(), "-t", "filter", "-F"])
    flushed = time.monotonic()
    deadline = flushed + within
    while time.monotonic() < deadline:
        if rules() == before:
            took = time.monotonic() - flushed
            time.sleep(0.5)
            return took
        time.sleep(0.01)
    raise BenchError(f"flushed rules were not restored within {within:g}s")


def plan_dict(plan: CostPlan) -> dict[str, Any]:
    return {**asdict(plan), "node_cache_sync_interval_s": NODE_CACHE_SYNC_INTERVAL}
