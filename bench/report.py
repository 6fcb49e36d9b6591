"""The benchmarks page's section and the plot, from the results JSON that ``bench.run`` writes.

``python -m bench.report bench/results/results.json --doc docs/benchmarks.md`` regenerates both without
running anything: the section goes to ``README-section.md`` beside the JSON and, when the page has the
markers, between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` there. Links in the section are written
for a page in ``docs/`` (the plot as ``../bench/results/sigkill.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.datapath import TITLES as PATH_TITLES
from bench.failover import SCENARIOS
from bench.failover import TITLES as SCENARIO_TITLES
from bench.remote import TITLES as REMOTE_TITLES
from bench.stale import TITLES as STALE_TITLES
from bench.stats import ratio
from bench.twins import TITLES as TWINS_TITLES
from harness.nodecache import NODE_CACHE_VERSION

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
SECTION_FILE = "README-section.md"
PLOT_FILE = "sigkill.png"
# The plot as the section links it: relative to docs/, where the section lives (docs/benchmarks.md).
PLOT_PATH_IN_DOC = "../bench/results/sigkill.png"
TIMES = "\N{MULTIPLICATION SIGN}"


class MarkerError(ValueError):
    """The page lacks a section's markers, or has them out of order."""


def replace_between_markers(text: str, section: str, markers: tuple[str, str] = (BEGIN, END)) -> str:
    """``text`` with everything between the markers (the bench section's by default) replaced by
    ``section`` (the markers stay)."""
    first, last = markers
    begin, end = text.find(first), text.find(last)
    if begin < 0 or end < 0:
        raise MarkerError(f"no {first} … {last} markers")
    if end < begin or text.count(first) != 1 or text.count(last) != 1:
        raise MarkerError(f"the markers {first} and {last} must each appear once, in that order")
    return text[: begin + len(first)] + "\n" + section.strip("\n") + "\n" + text[end:]


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        text = f"{int(value):,}".replace(",", " ")
    else:
        text = f"{value:.{digits}f}"
    return f"{text} {unit}".rstrip() if unit else text


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.2f}{TIMES}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_section(results: Mapping[str, Any]) -> str:
    meta, med = results["meta"], results["median"]
    m = meta["machine"]
    plans = meta["plans"]
    fo_plan, dp_plan = plans["failover"], plans["datapath"]
    runs = "One run" if meta["runs"] == 1 else f"Medians of {meta['runs']} runs"
    out = [
        "## Benchmarks",
        "",
        f"`{meta['command']}` on {meta['date']}: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['coredns']}, iptables-{meta['flavour']}, Python {m['python']}. "
        f"{runs}; ratios are ours ÷ baseline from the same runs. Everything runs in "
        "the node sandbox (network namespaces for the node, a pod and kube-dns on one shared machine), so "
        "absolute figures are those of veth pairs on this machine; the comparisons are the point.",
        "",
        f"**The baseline is the real node-cache {NODE_CACHE_VERSION}**, built from the upstream "
        "kubernetes/dns tag (CoreDNS compiled in) and started as the upstream DaemonSet starts it "
        "(`-localip` with the link-local address and the kube-dns ClusterIP, its own Corefile template with "
        "`reload`, its kube-dns ConfigMap directory), in the same sandbox and the same run as the agent. "
        "Each fault hits node-cache's single process:",
        "",
        "- *SIGKILL CoreDNS* kills node-cache: its rules stay behind and the ClusterIP is a blackhole until "
        f"the kubelet restarts it. The kubelet is a model: a new node-cache starts "
        f"{fo_plan['kubelet_delay']:g} s after the old one is gone (the kubelet's PLEG relists every second "
        "and restarts a container at once the first time; CrashLoopBackOff delays later restarts from 10 s; "
        "container start-up is not modelled, which favours the baseline); node-cache's own start is real.",
        "- *SIGSTOP CoreDNS* stops node-cache; nothing notices within the run (its liveness probe, an "
        "httpGet every 10 s with failureThreshold 3, takes about 30 s).",
        "- *CoreDNS frozen*: a hang the kernel sends no stop notice for, as a deadlock: the cgroup freezer. "
        "The agent's CoreDNS is thawed once the agent has taken the node off the local path (a frozen "
        "process dies of SIGKILL only when thawed); node-cache stays frozen until the load ends, since "
        "nothing notices.",
        "- *Rolling restart*: SIGTERM (node-cache removes its interface and rules on the way out, the agent "
        "its rules while CoreDNS still answers), then a new one after the kubelet's delay.",
        "- *Upgrade on the link-local address*: the pod's queries go to the local address, which has no "
        "kube-dns behind it (IPVS mode, or a pod's own `dnsConfig`). The agent's upgrade surges: the new "
        "agent starts next to the old one and serves on the same sockets before the old one gets SIGTERM "
        "([Upgrades](upgrades.md#upgrades)). node-cache's manifest cannot surge (its ports are host ports; "
        "a second node-cache would remove the first one's rules), so its row is the rolling restart, on this "
        "address.",
        "- *Stub-domain reload*: the kube-dns ConfigMap gains a stub domain; node-cache sees it through its "
        "ConfigMap poll and its Corefile's `reload` plugin (expected "
        f"{fo_plan['stub_reload_model']['mean_s']:g} s on average, "
        f"{fo_plan['stub_reload_model']['max_s']:g} s at most), the agent at once; both are measured.",
        "",
        f"### Data path (dnsperf from a pod, cached names; latency at {dp_plan['latency_qps']} qps)",
        "",
    ]
    dp = med["datapath"]
    rows = []
    for path in ("ours", "node_cache", "no_agent", "ceiling"):
        r = dp.get(path)
        if r is None:
            continue
        rows.append([PATH_TITLES[path], fmt(round(r["qps"])), fmt(r["p50_ms"], "ms", 3),
                     fmt(r["p99_ms"], "ms", 3), fmt(r["p999_ms"], "ms", 3),
                     _conntrack(r)])  # fmt: skip
    if "ours" in dp and "node_cache" in dp:
        o, b = dp["ours"], dp["node_cache"]
        rows.append(["ratio ours ÷ node-cache"] + [fmt_ratio(ratio(o[k], b[k])) for k in
                     ("qps", "p50_ms", "p99_ms", "p999_ms", "conntrack_per_100k")])  # fmt: skip
    if "ours" in dp and "no_agent" in dp:
        o, b = dp["ours"], dp["no_agent"]
        rows.append(["ratio ours ÷ no local cache"] + [fmt_ratio(ratio(o[k], b[k])) for k in
                     ("qps", "p50_ms", "p99_ms", "p999_ms", "conntrack_per_100k")])  # fmt: skip
    out += table(["path", "QPS (max)", "p50", "p99", "p99.9", "tracked by conntrack / 100k queries"], rows)
    out += [
        "",
        "Conntrack: the queries that went through the node's conntrack table (its per-flow packet counters) "
        f"during {dp_plan['conntrack_seconds']:g} s of {dp_plan['conntrack_rate']:g} qps from a client that "
        "opens a fresh socket per query, as glibc does (dnsperf reuses one socket, which conntrack would see "
        "as one flow), and in brackets the entries they created: fewer, because a query from a source port "
        "whose entry is still live (30 s) joins it. In the sandbox kube-dns is a namespace on the same "
        "machine, not a pod on another node, so the path without a local cache is as short as the local one, "
        f"and dnsperf and CoreDNS share the machine's {m['nproc']} cores: QPS and latency are bound by the "
        "CPU, and the paths differ little; what the sandbox shows is conntrack.",
        "",
        *_remote_rows(med.get("remote"), plans.get("remote")),
        f"### Failover ({fo_plan['rate']:g} qps from a pod for {fo_plan['duration']:g} s, the fault at "
        f"{fo_plan['fault_at']:g} s)",
        "",
    ]
    fo = med["failover"]
    rows = []
    for scenario in SCENARIOS:
        r = fo.get(scenario)
        if r is None:
            continue
        o, b = r["ours"], r["node_cache"]
        rows.append([SCENARIO_TITLES[scenario], fmt(o["failed"]), fmt(o["longest_gap_s"], "s", 3),
                     fmt(b["failed"]), fmt(b["longest_gap_s"], "s", 3),
                     fmt_ratio(ratio(o["failed"], b["failed"])),
                     fmt_ratio(ratio(o["longest_gap_s"], b["longest_gap_s"]))])  # fmt: skip
    out += table(["fault", "failed (ours)", "longest gap (ours)", "failed (node-cache)",
                   "longest gap (node-cache)", "ratio failed", "ratio gap"], rows)  # fmt: skip
    out += [
        "",
        f"![Answers per 100 ms around a SIGKILL of CoreDNS, the agent against the real node-cache]"
        f"({PLOT_PATH_IN_DOC})",
        "",
        *_stale_rows(med.get("stale"), plans.get("stale")),
        *_twins_rows(med.get("twins"), plans.get("twins")),
        "### The agent's own cost (the agent process alone, not CoreDNS)",
        "",
    ]
    c = med["cost"]
    stub = fo.get("stub_domain_reload", {}).get("ours", {}).get("stub_visible_after_s")
    stub_nc = fo.get("stub_domain_reload", {}).get("node_cache", {}).get("stub_visible_after_s")
    sync = plans["cost"]["node_cache_sync_interval_s"]
    rows = [
        ["start to the first answer of the local cache", fmt(c["first_answer_s"], "s", 2), "—"],
        ["`agent --check` wall time", fmt(c["check"]["wall_ms"], "ms", 1), "—"],
        ["`agent --check` peak resident memory", fmt(c["check"]["peak_rss_mib"], "MiB", 1), "—"],
        ["flushed rules restored after", fmt(c["restore_s"], "s", 3), _node_cache_restore(c, sync)],
        ["a new stub domain answers after", fmt(stub, "s", 2), fmt(stub_nc, "s", 2)],
    ]  # fmt: skip
    out += table(["figure", "ours", "node-cache"], rows)
    out += [
        "",
        "The agent's memory and CPU, idle and under load, beside its CoreDNS and node-cache, each in a "
        "memory cgroup of its own: [the pod's footprint](#the-pods-footprint-as-the-kubelet-sees-it).",
    ]
    out += [
        "",
        "Raw figures: `bench/results/results.json`. `make bench-quick` runs every measurement once with "
        "short durations (CI keeps the harness working with it; it does not judge figures).",
    ]
    return "\n".join(out) + "\n"


def _node_cache_restore(c: Mapping[str, Any], sync: float) -> str:
    """node-cache's restore of flushed rules, measured: it comes with its `-syncinterval` check."""
    if c.get("node_cache_restore_s") is None:  # results of a run before it was measured
        return "—"
    longest = fmt(c["node_cache_restore_max_s"], "s", 1)
    return f"{fmt(c['node_cache_restore_s'], 's', 1)} (median; longest {longest}: its check every {sync:g} s)"


def _remote_rows(remote: Mapping[str, Any] | None, plan: Mapping[str, Any] | None) -> list[str]:
    """The latency table with a modelled remote kube-dns (nothing when the results have none)."""
    if not remote or not plan:
        return []
    rows = [[REMOTE_TITLES[path], fmt(remote[path]["p50_ms"], "ms", 3), fmt(remote[path]["p99_ms"], "ms", 3),
             fmt(remote[path]["p999_ms"], "ms", 3)] for path in ("no_agent", "ours")]  # fmt: skip
    o, b = remote["ours"], remote["no_agent"]
    rows.append(["ratio ours ÷ no local cache"] + [fmt_ratio(ratio(o[k], b[k])) for k in
                 ("p50_ms", "p99_ms", "p999_ms")])  # fmt: skip
    late = remote.get("link", {}).get("worst_late_ms")
    return [
        f"### Latency with kube-dns on another node (modelled: +{plan['one_way_ms']:g} ms each way on the "
        "kube-dns link)",
        "",
        *table(["path (cached names)", "p50", "p99", "p99.9"], rows),
        "",
        f"dnsperf from a pod at {plan['latency_qps']} qps for {plan['seconds']:g} s per path, the names "
        "warmed first, both paths in one run under the same delay on every packet between the node and "
        "kube-dns. The delay is made in user space (the kernel here has no `tc netem`): an NFQUEUE on "
        "the kube-dns link, `harness/linkdelay.py`, whose worst packet left "
        f"{fmt(late, 'ms', 2)} after its due time.",
        "",
    ]


def _stale_rows(stale: Mapping[str, Any] | None, plan: Mapping[str, Any] | None) -> list[str]:
    """The outage table: stale answers with and without ``--serve-stale`` (nothing when absent)."""
    if not stale or not plan:
        return []
    rows = [[STALE_TITLES[v], fmt(stale[v]["answered"]), fmt(stale[v]["failed"]),
             fmt(stale[v]["longest_gap_s"], "s", 3)] for v in ("on", "off") if v in stale]  # fmt: skip
    return [
        f"### kube-dns unreachable for {plan['outage']:g} s ({plan['rate']:g} qps from a pod, "
        f"{plan['names']} names cached earlier and expired since)",
        "",
        *table(["the cache", "answered", "failed", "longest gap"], rows),
        "",
        "Every DNS packet to kube-dns dropped (a blackhole) for the whole load; each name was asked once "
        "through the ClusterIP, then the run waited until the cache's entries had expired.",
        "",
    ]


def _twins_rows(twins: Mapping[str, Any] | None, plan: Mapping[str, Any] | None) -> list[str]:
    """The twins table: a CoreDNS lost on the link-local address, and what twins cost (nothing when
    absent)."""
    if not twins or not plan:
        return []
    faults, cache = twins["faults"], twins["cache"]

    def lost(r: Mapping[str, Any]) -> str:
        return f"{fmt(r['failed'])} ({fmt(r['longest_gap_s'], 's', 3)})"

    def upstream(c: Mapping[str, Any]) -> str:
        return f"{fmt(c['upstream'])} ({fmt(c['hit_rate'] * 100, '%', 1)} answered from the cache)"

    variants = ("one", "twins")
    rows = [[TWINS_TITLES[f], *(lost(faults[f][c]) for c in (*variants, "node_cache"))] for f in faults]
    rows += [
        [f"sent on to kube-dns, {plan['names']} names asked {plan['asks']} times each",
         *(upstream(cache[v]) for v in variants), "—"],
        ["CoreDNS resident memory after that",
         *(fmt(cache[v]["coredns_rss_mib"], "MiB", 1) for v in variants), "—"],
    ]  # fmt: skip
    header = ["", "one CoreDNS (default): failed (gap)", "`--coredns-instances 2`: failed (gap)",
              "node-cache: failed (gap)"]  # fmt: skip
    return [
        f"### CoreDNS twins on the link-local address ({plan['rate']:g} qps from a pod for "
        f"{plan['duration']:g} s, the fault at {plan['fault_at']:g} s)",
        "",
        *table(header, rows),
        "",
        "The load goes to the link-local address, where no kube-dns stands behind the cache (IPVS mode, a "
        "custom dnsConfig). With twins the fault hits one of the two CoreDNS processes; the kernel hands its "
        "share of the sockets' traffic to the other at once when it dies, and the agent kills a hung one. "
        "Each twin has its own cache: a name is sent on to kube-dns once per twin that is asked for it.",
        "",
    ]


def _conntrack(r: Mapping[str, Any]) -> str:
    tracked, entries = r.get("conntrack_per_100k"), r.get("conntrack_entries_per_100k")
    if tracked is None:
        return "—"
    return fmt(tracked) if not entries or entries == tracked else f"{fmt(tracked)} ({fmt(entries)} entries)"


def write_plot(timeline: Mapping[str, Any], path: Path) -> None:
    """Answers per 100 ms over time in the SIGKILL scenario, ours against the real node-cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    styles = {"ours": ("agent (socket-gated rules)", "#1f77b4"),
              "node_cache": (f"node-cache {NODE_CACHE_VERSION} (rules left behind)", "#d62728")}  # fmt: skip
    top = 0
    span = 0.0
    for kind, (label, colour) in styles.items():
        bins = timeline[kind]["answers_per_100ms"][:-1]  # the last bin holds answers after the load's end
        xs = [i * 0.1 for i in range(len(bins) + 1)]
        ax.stairs(bins, xs, label=label, color=colour, linewidth=2, baseline=None)
        top, span = max(top, *bins), max(span, xs[-1])
    fault = timeline["ours"]["fault_at_s"]
    ax.axvline(fault, color="black", linestyle="--", linewidth=1)
    ax.annotate("SIGKILL", (fault, top * 1.02), ha="right", va="bottom", fontsize=9, xytext=(-3, 0),
                textcoords="offset points")  # fmt: skip
    restarted = timeline["node_cache"].get("restarted_at_s")
    if restarted is not None:
        ax.axvline(restarted, color="#d62728", linestyle=":", linewidth=1)
        ax.annotate("kubelet\nrestarts it", (restarted, top * 0.5), ha="right", va="center", fontsize=9,
                    xytext=(-4, 0), textcoords="offset points", color="#d62728")  # fmt: skip
    rate = timeline.get("rate")
    ax.set_title(f"SIGKILL of CoreDNS under {rate:g} queries/s from a pod: answers per 100 ms", fontsize=11)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("answered queries per 100 ms")
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.set_xlim(0, span)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_report(results_path: Path, doc: Path | None) -> str:
    """Section and plot beside the results; the page ``doc`` updated when it has the markers. Returns a
    note."""
    results = json.loads(results_path.read_text())
    out_dir = results_path.parent
    section = render_section(results)
    write_atomically(out_dir / SECTION_FILE, section)
    write_plot(results["sigkill_timeline"], out_dir / PLOT_FILE)
    wrote = f"wrote {out_dir / SECTION_FILE} and {out_dir / PLOT_FILE}"
    if doc is None:
        return wrote
    try:
        write_atomically(doc, replace_between_markers(doc.read_text(), section))
    except MarkerError as exc:
        return f"{wrote}; {doc} not updated: it has {exc}"
    return f"{wrote}, and the section in {doc}"


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.report")
    p.add_argument("results", type=Path, help="the results JSON written by bench.run")
    p.add_argument("--doc", type=Path, help="rewrite this page's section between the bench markers")
    a = p.parse_args()
    print(write_report(a.results, a.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
