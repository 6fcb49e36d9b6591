"""The pod's footprint as the kubelet sees it: the agent with its CoreDNS, and the real node-cache, each in a
memory cgroup of its own (as each container is), idle, at 1 000 qps, and with a full cache.

For each side, on a reset node:

- **working set**: the cgroup's ``memory.usage_in_bytes`` minus its ``total_inactive_file``, what the kubelet
  reports and evicts on (cgroup v1; v2 has ``memory.current`` and ``inactive_file``);
- **resident memory** of each process, anonymous and file-backed (``RssAnon``, ``RssFile`` of
  ``/proc/PID/status``);
- **CPU**: the processes' user and system time over the window, in % of one core.

The servers' binaries (CoreDNS, node-cache) are fresh copies in the run's directory, dropped from the page
cache once written, so their pages are charged to the cgroup that reads them first, as an image's files are
on a node. The Python interpreter and
its libraries are shared with this benchmark, so their pages may be charged elsewhere: for the agent, the
resident memory (which counts them) is the figure to read beside the working set. The agent runs with only
its runtime dependencies (:mod:`harness.runtimevenv`), as in the image.

The full cache: ``names_per_block`` distinct names asked in each server block that caches (cluster.local:
names the kube-dns stand-in answers; in-addr.arpa, ip6.arpa and the root: names it denies), once each, then
the window. CoreDNS's ``coredns_cache_entries`` says how many entries each side holds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.node import BenchError, Node
from bench.report import TIMES, fmt, replace_between_markers, table, write_atomically
from bench.stats import median
from harness import cluster, nodecache, runtimevenv
from harness import sandbox as sb

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
MEMORY = Path("/sys/fs/cgroup/memory")
# The node-local CoreDNS build, installed by scripts/setup.sh; the full upstream build is sb.COREDNS.
COREDNS_NODE = "/usr/local/bin/coredns-node"
# What the agent's process imports, one at a time in a fresh interpreter of the runtime environment.
IMPORTS = ("structlog", "psutil", "watchdog.observers", "prometheus_client", "requests", "kubernetes.client",
           "agent.run")  # fmt: skip


@dataclass(frozen=True)
class FootprintPlan:
    settle_seconds: float = 10.0  # after serving, before the idle window (the "10 s after start")
    idle_seconds: float = 30.0
    load_rate: float = 1000.0
    load_seconds: float = 10.0
    names_per_block: int = 10_000
    fill_rate: float = 1000.0
    full_settle_seconds: float = 5.0
    full_seconds: float = 10.0


@dataclass(frozen=True)
class Side:
    key: str
    label: str
    coredns: str | None  # the agent's CoreDNS binary; None for node-cache


def sides() -> list[Side]:
    for binary in (nodecache.NODE_CACHE_BINARY, sb.COREDNS, COREDNS_NODE):
        if not os.access(binary, os.X_OK):
            raise BenchError(
                f"no {binary} (make setup-base builds CoreDNS; node-cache: harness/nodecache.py)"
            )
    return [Side("node_cache", f"node-cache {nodecache.NODE_CACHE_VERSION}", None),
            Side("agent_full", "agent + CoreDNS (all plugins)", sb.COREDNS),
            Side("agent_node", "agent + CoreDNS (node-local build)", COREDNS_NODE)]  # fmt: skip


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def measure(node: Node, plan: FootprintPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Every side in turn on a reset node (left reset), then the import costs."""
    python = runtimevenv.ensure()
    out: dict[str, Any] = {"sides": {}}
    try:
        for side in sides():
            node.reset()
            out["sides"][side.key] = {"label": side.label, **measure_side(node, side, plan, python, log)}
    finally:
        node.reset()
        cluster.remove_cgroups(f"/{sb.PREFIX}-{node.box.run_id}")
    out["imports"] = import_costs(python)
    log("  imports: " + ", ".join(f"{k} {v['rss_mib']}" for k, v in out["imports"].items()))
    return out


def measure_side(node: Node, side: Side, plan: FootprintPlan, python: str,
                 log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    box = node.box
    copies = box.workdir / f"bin-{side.key}"
    copies.mkdir(exist_ok=True)
    with memory_cgroup(box, side.key) as cgroup:
        if side.coredns is None:
            binary = fresh_copy(nodecache.NODE_CACHE_BINARY, copies / "node-cache")
            server = node.start_node_cache(binary=str(binary), cgroup=cgroup)
            roles = {"node-cache": server.agent_pid()}
        else:
            binary = fresh_copy(side.coredns, copies / "coredns")
            agent = node.start_pod_like_agent(coredns=str(binary), cgroup=cgroup, python=python)
            pids = agent.coredns_pids()
            if not pids:
                raise BenchError(f"{side.label}: no CoreDNS after serving")
            roles = {"agent": agent.agent_pid(), "coredns": pids[0]}
        time.sleep(plan.settle_seconds)
        result: dict[str, Any] = {"idle": window(cgroup, roles, plan.idle_seconds)}
        log(f"  {side.label} idle: {line(result['idle'])}")
        load = node.load(rate=plan.load_rate, duration=plan.load_seconds)
        load.started()
        result["load"] = window(cgroup, roles, plan.load_seconds - 0.5)
        result["load"]["failed"] = load.result()["failed"]
        log(f"  {side.label} at {plan.load_rate:g} qps: {line(result['load'])}")
        result["fill"] = fill_cache(node, plan)
        time.sleep(plan.full_settle_seconds)
        result["full"] = window(cgroup, roles, plan.full_seconds)
        result["full"]["cache_entries"] = cache_entries(box)
        log(f"  {side.label} full cache ({result['full']['cache_entries']} entries): {line(result['full'])}")
    return result


def fresh_copy(source: str, target: Path) -> Path:
    """A copy of ``source`` whose pages are not in the page cache: the copy's own pages would be charged to
    this process's cgroup (the writer's), and the measured one would then never pay for its binary. Only the
    copy's clean pages are dropped (``POSIX_FADV_DONTNEED`` on that file), nothing else of the machine."""
    shutil.copy2(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return target


@contextmanager
def memory_cgroup(box: sb.Sandbox, name: str) -> Iterator[Path]:
    """A memory cgroup of the run's own (``nldsb-<run>/<name>``, which the leak check knows), removed with
    whatever still runs in it."""
    path = MEMORY / f"{sb.PREFIX}-{box.run_id}" / name
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        cluster.remove_cgroups(f"/{sb.PREFIX}-{box.run_id}/{name}")


def working_set(cgroup: Path) -> dict[str, float]:
    usage = int((cgroup / "memory.usage_in_bytes").read_text())
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    inactive = int(stat["total_inactive_file"])
    return {
        "working_set_mib": max(0, usage - inactive) / MIB,
        "usage_mib": usage / MIB,
        "cache_mib": int(stat["total_cache"]) / MIB,
        "rss_mib": int(stat["total_rss"]) / MIB,
    }


_STATUS_FIELD = re.compile(r"^(RssAnon|RssFile|RssShmem):\s+(\d+) kB", re.M)


def resident(pid: int) -> dict[str, float]:
    fields = {k: int(v) for k, v in _STATUS_FIELD.findall(Path(f"/proc/{pid}/status").read_text())}
    anon, file = fields["RssAnon"] / 1024, (fields["RssFile"] + fields.get("RssShmem", 0)) / 1024
    return {"rss_mib": anon + file, "anon_mib": anon, "file_mib": file}


def window(cgroup: Path, roles: dict[str, int], seconds: float) -> dict[str, Any]:
    """Over ``seconds``: the cgroup's working set (median and peak of samples every 0.5 s), each process's
    resident memory at the end, and the CPU share of all of them together."""
    procs = {role: psutil.Process(pid) for role, pid in roles.items()}

    def cpu_seconds() -> dict[str, float]:
        return {role: sum(p.cpu_times()[:2]) for role, p in procs.items()}  # user + system

    samples: list[float] = []
    before, began = cpu_seconds(), time.monotonic()
    deadline = began + seconds
    while True:
        samples.append(working_set(cgroup)["working_set_mib"])
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.5, left))
    after, wall = cpu_seconds(), time.monotonic() - began
    cpu = {role: after[role] - before[role] for role in procs}
    end = working_set(cgroup)
    return {
        "seconds": round(wall, 1),
        "working_set_mib": round(median(samples), 1),
        "peak_working_set_mib": round(max(samples), 1),
        "cgroup_rss_mib": round(end["rss_mib"], 1),
        "cgroup_cache_mib": round(end["cache_mib"], 1),
        "cpu_percent": round(sum(cpu.values()) / wall * 100, 3),
        "processes": {
            role: {
                **{k: round(v, 1) for k, v in resident(p.pid).items()},
                "cpu_percent": round(cpu[role] / wall * 100, 3),
            }
            for role, p in procs.items()
        },
    }


def block_names(plan: FootprintPlan) -> dict[str, list[str]]:
    """``names_per_block`` distinct names for each caching server block of the node-local Corefile."""
    n = plan.names_per_block
    return {
        "cluster.local": [f"n{i}.{sb.BULK_DOMAIN}" for i in range(n)],
        "in-addr.arpa": [f"{i % 256}.{i // 256 % 256}.{i // 65536}.10.in-addr.arpa" for i in range(n)],
        "ip6.arpa": [".".join(f"{i:032x}") + ".ip6.arpa" for i in range(n)],
        ".": [f"n{i}.footprint.example" for i in range(n)],
    }


def fill_cache(node: Node, plan: FootprintPlan) -> dict[str, Any]:
    """Ask every block's names once, through the kube-dns ClusterIP (the node-local cache's address)."""
    out: dict[str, Any] = {}
    for block, names in block_names(plan).items():
        path = node.box.workdir / f"names-{block.strip('.') or 'root'}.txt"
        path.write_text("\n".join(names) + "\n")
        load = node.load(rate=plan.fill_rate, duration=len(names) / plan.fill_rate, names=f"@{path}")
        load.started()
        summary = load.result()
        out[block] = {
            "sent": summary["sent"],
            "errors": summary.get("errors", {}),
        }  # denials are "rcode NXDOMAIN"
    return out


_ENTRIES = re.compile(r'^coredns_cache_entries\{[^}]*type="(success|denial)"[^}]*\} (\S+)$', re.M)


def cache_entries(box: sb.Sandbox) -> int:
    """Entries in CoreDNS's caches, from its own metrics (port 9253 on both sides)."""
    text = box.exec(box.node, ["curl", "-sf", "--max-time", "5", "http://127.0.0.1:9253/metrics"])
    return int(sum(float(v) for _t, v in _ENTRIES.findall(text)))


def import_costs(python: str) -> dict[str, dict[str, float]]:
    """Resident memory of a fresh interpreter of the runtime environment after importing each module alone
    (the bare interpreter first): what each import costs the agent's process."""
    probe = ("import importlib, re, sys\n"
             "if sys.argv[1]: importlib.import_module(sys.argv[1])\n"
             "s = open('/proc/self/status').read()\n"
             "print(*(re.search(k + r':\\s+(\\d+)', s).group(1)\n"
             "        for k in ('VmRSS', 'RssAnon')))\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(runtimevenv.REPO)}
    out: dict[str, dict[str, float]] = {}
    for module in ("", *IMPORTS):
        proc = subprocess.run([python, "-c", probe, module], capture_output=True, text=True, env=env,
                              cwd="/", timeout=60, check=True)  # fmt: skip
        rss, anon = (int(x) / 1024 for x in proc.stdout.split())
        out[module or "(interpreter)"] = {"rss_mib": round(rss, 1), "anon_mib": round(anon, 1)}
    return out


def line(w: dict[str, Any]) -> str:
    procs = ", ".join(f"{role} {p['rss_mib']} MiB ({p['anon_mib']} anon) {p['cpu_percent']}%"
                      for role, p in w["processes"].items())  # fmt: skip
    return f"working set {w['working_set_mib']} MiB, {w['cpu_percent']}% CPU; {procs}"


def plan_dict(plan: FootprintPlan) -> dict[str, Any]:
    return asdict(plan)


BEGIN, END = "<!-- footprint:begin -->", "<!-- footprint:end -->"
STATES = (("idle", "idle"), ("load", "{rate:g} qps"), ("full", "full cache"))


def render_section(results: dict[str, Any]) -> str:
    meta, sides_ = results["meta"], results["sides"]
    plan = meta["plan"]
    base = sides_["node_cache"]
    out = [
        "### The pod's footprint, as the kubelet sees it",
        "",
        f"`{meta['command']}` on {meta['date']} (one run, each side on a reset node, one after the "
        "other). Each side runs in a memory cgroup of its own, as its container would: node-cache alone; "
        "the agent (Python with its runtime dependencies only, as in the image) with its CoreDNS, once "
        "with the upstream build of every plugin and once with the node-local build the image ships. "
        "*Working set* is what the kubelet reports and evicts on: the cgroup's usage minus its inactive "
        "file pages; a binary's mapped pages mostly stay on the inactive list, so the working set is "
        "mostly anonymous memory. *Resident* is each process's `RssAnon` + `RssFile`. CPU is the "
        "processes' user and system time over the window "
        f"({plan['idle_seconds']:g} s idle, {plan['settle_seconds']:g} s after serving; "
        f"{plan['load_seconds']:g} s under load from a pod on the kube-dns ClusterIP). The full cache is "
        f"{fmt(plan['names_per_block'])} distinct names asked in each caching server block (cluster.local, "
        "in-addr.arpa, ip6.arpa, the root).",
        "",
    ]
    header = ["", *(sides_[k]["label"] for k in sides_)]
    rows: list[list[str]] = []
    for key, label in STATES:
        name = label.format(rate=plan["load_rate"])
        ws = {k: v[key]["working_set_mib"] for k, v in sides_.items()}
        rows.append([f"working set, {name}",
                     *(_with_ratio(ws[k], ws["node_cache"], k) for k in sides_)])  # fmt: skip
        rows.append([f"resident (anonymous + file), {name}", *(_resident(v[key]) for v in sides_.values())])
        rows.append([f"CPU, {name}", *(_cpu(v[key]) for v in sides_.values())])
    rows.append(
        ["cache entries held (full cache)", *(fmt(v["full"]["cache_entries"]) for v in sides_.values())]
    )
    out += table(header, rows)
    imports = results["imports"]
    bare = imports["(interpreter)"]["rss_mib"]
    out += [
        "",
        "What each import costs the agent's process: the resident memory of a fresh interpreter of the "
        "runtime environment after importing that module alone (they share much of the standard library, so "
        "the costs do not add up). The agent loads `agent.run`'s set; the Kubernetes client only with "
        "`--kubedns-api`.",
        "",
    ]
    out += table(["import", "resident", "above the bare interpreter"],
                 [[f"`{m}`" if m != "(interpreter)" else "the bare interpreter", fmt(v["rss_mib"], "MiB", 1),
                   fmt(v["rss_mib"] - bare, "MiB", 1) if m != "(interpreter)" else "—"]
                  for m, v in imports.items()])  # fmt: skip
    out += ["", f"Against node-cache's idle working set of {fmt(base['idle']['working_set_mib'], 'MiB', 1)}: "
            "see [the levers and what stands in the way](#levers-of-the-pods-footprint)."]  # fmt: skip
    return "\n".join(out) + "\n"


def _with_ratio(value: float, base: float, key: str) -> str:
    text = fmt(value, "MiB", 1)
    return text if key == "node_cache" or not base else f"{text} ({value / base:.2f}{TIMES})"


def _resident(w: dict[str, Any]) -> str:
    return " + ".join(
        f"{role} {p['anon_mib']:.1f} + {p['file_mib']:.1f}" for role, p in w["processes"].items()
    )


def _cpu(w: dict[str, Any]) -> str:
    parts = [f"{role} {p['cpu_percent']:.2f}" for role, p in w["processes"].items()]
    total = f"{w['cpu_percent']:.2f} % of a core"
    return total if len(parts) == 1 else f"{total} ({', '.join(parts)})"


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.footprint")
    p.add_argument("--quick", action="store_true", help="every measurement once, briefly (CI)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--doc", type=Path, help="rewrite this page's section between the footprint markers")
    p.add_argument("--command", default=None, help="the command to name in the report")
    p.add_argument("--report", type=Path, help="only write the section again from this results JSON")
    a = p.parse_args()
    if a.report is not None:
        return write(json.loads(a.report.read_text()), a.out, a.doc)
    if os.geteuid() != 0:
        print("bench.footprint: needs root (network namespaces, cgroups)", file=sys.stderr)
        return 2
    plan = QUICK if a.quick else FootprintPlan()
    began = time.monotonic()
    try:
        with sb.sandbox("nft") as box:
            node = Node(box)
            try:
                node.reset()
                results = measure(node, plan, log)
            finally:
                node.kill_all()
    finally:
        left = sb.leftovers(sb.CREATED_RUNS) + cluster.leftovers(sb.CREATED_RUNS)
        if left:
            sb.remove_leftovers_of(sb.CREATED_RUNS)
            cluster.remove_leftovers_of(sb.CREATED_RUNS)
            print(f"bench.footprint: removed leftovers: {left}", file=sys.stderr)
    results["meta"] = {
        "command": a.command or "python -m bench.footprint " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - began, 1),
        "plan": plan_dict(plan),
    }
    log(f"== footprint in {results['meta']['seconds']}s")
    return write(results, a.out, a.doc)


def write(results: dict[str, Any], out: Path, doc: Path | None) -> int:
    """The results JSON and the section in ``out``, and the section in ``doc``'s footprint markers."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "footprint.json"
    write_atomically(path, json.dumps(results, indent=1) + "\n")
    section = render_section(results)
    write_atomically(out / "footprint-section.md", section)
    log(f"results in {path}")
    if doc is not None:
        write_atomically(doc, replace_between_markers(doc.read_text(), section, (BEGIN, END)))
        log(f"wrote the section in {doc}")
    return 0


QUICK = FootprintPlan(settle_seconds=1.0, idle_seconds=2.0, load_seconds=2.0, names_per_block=200,
                      full_settle_seconds=0.5, full_seconds=1.0)  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
