"""The soak's section of docs/benchmarks.md and console summary, from the results :mod:`bench.soak` writes.

``python -m bench.soakreport build/soak-quick/soak.json`` prints the section again without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.report import fmt, table
from bench.soakplan import TITLES

# The agent's own series worth keeping from each agent's metrics (docs/operations.md, "Metrics").
METRIC_PREFIXES = (
    "coredns_nodecache_setup_errors_total",
    "nodelocaldns_agent_coredns_restarts_total",
    "nodelocaldns_agent_reloads_total",
    "nodelocaldns_agent_corefile_renders_total",
    "nodelocaldns_agent_rules_restored_total",
)

RECOVERY_DEFINITION = (
    "**Time to recover** runs from the injection (for the agent restarts, the SIGKILL; the new agent is "
    "started 1 s later, as the kubelet would; for the lock faults, the moment the harness took the lock) "
    "until every one of these holds, checked every 0.1 s: the agent process runs and its status file says "
    "`running` and `serving`; the fault's own condition (the signalled CoreDNS is gone and a new one runs; "
    "the lock is released; a pod sees the new ConfigMap, or after an invalid one the agent logged "
    "`configuration rejected` and a pod still sees the last good one); every local address is on "
    "`nodelocaldns`; the agent's tagged rules in `iptables-save` are exactly the steady-state set (nothing "
    "missing, nothing extra, no duplicate); and a query from a second pod to the kube-dns ClusterIP is "
    "answered by the local CoreDNS through the socket gate (answered, and no conntrack entry for it). "
    "*Of which CoreDNS restart delay* is the delay the agent announced before restarting CoreDNS "
    "(its `coredns state` event, `restarting in …`): its backoff doubles with each failure and is "
    "forgiven only after a stretch of health, so faults that kill or stop CoreDNS in quick succession "
    "recover more slowly. "
    "**Queries failed** counts the load's queries sent from a fault's injection until the next injection "
    "(or the end of the load) that got no correct answer within 1 s; *after recovery* is the part sent once "
    "the fault had recovered (it should be 0)."
)


def _mib(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f}"


NONE = {"median": None, "max": None}


def _spread(s: Mapping[str, Any], unit: str = "", digits: int = 0) -> str:
    if s["median"] is None:
        return "—"
    return f"{fmt(s['median'], digits=digits)} / {fmt(s['max'], digits=digits)}{unit}"


def fault_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for kind, k in results["per_kind"].items():
        rows.append([TITLES[kind], str(k["count"]), _spread(k["failed"]), str(k["failed_after_recovery"]),
                     _spread(k["recover_s"], " s", 2), _spread(k.get("restart_delay_s", NONE), " s", 2),
                     str(k["unrecovered"])])  # fmt: skip
    header = ["fault", "count", "queries failed (median / max)", "failed after recovery",
              "time to recover (median / max)", "of which CoreDNS restart delay", "unrecovered"]  # fmt: skip
    return table(header, rows)


def _three(samples: tuple[Mapping[str, Any], ...], key: str, show: Any = str) -> str:
    return " / ".join("—" if key not in x else show(x[key]) for x in samples)


def agent_table(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for inc in results["incarnations"]:
        j = inc["judgement"]
        samples = (j["first"] or {}, j["baseline"] or {}, j["end"] or {})
        if not j["judged"]:
            verdict = f"not judged ({j['faults_judged']} faults after its warm-up)"
        elif j["leaks"]:
            verdict = "**leak**: " + "; ".join(j["leaks"])
        else:
            g, n = j["growth"], j["spread"]
            verdict = (
                f"none: RSS {g['rss_kib'] / 1024:+.1f} MiB (quiet moments within "
                f"{n['rss_kib'] / 1024:.1f} MiB), threads {g['threads']:+d}, fds {g['fds']:+d}"
            )
        rows.append([
            f"{inc['incarnation']} (pid {inc['pid']})", f"{inc['lived_s']:.0f} s", str(inc["faults"]),
            _three(samples, "rss_kib", _mib), _three(samples, "threads"), _three(samples, "fds"), inc["end"],
            verdict,
        ])  # fmt: skip
    header = ["agent process", "lived", "faults", "RSS MiB (start / baseline / end)",
              "threads (start / baseline / end)", "open fds (start / baseline / end)", "ended by",
              "leak judgement"]  # fmt: skip
    return table(header, rows)


def _counts_limit(limits: Mapping[str, Any]) -> str:
    if limits["threads"] == limits["fds"] == 0:
        return "any growth of threads or open fds from the baseline to the end:"
    return f"more than {limits['threads']} more threads or {limits['fds']} more open fds at the end:"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds % 60 == 0 else f"{seconds:g} s"


def _para(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p.strip())


def render_section(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    m, settings = meta["machine"], meta["settings"]
    plan, limits = settings["plan"], settings["limits"]
    final, rules, v = results["final"], results["rules"], results["verdict"]
    gap, hold = plan["gap"], plan["lock_hold"]
    outcome = "." if v["ok"] else ": " + "; ".join(v["reasons"]) + "."
    left_coredns = f"CoreDNS left: {final['coredns_left']}" if final["coredns_left"] else "no CoreDNS left"
    out = [
        "## Chaos soak",
        "",
        _para(
            f"`{meta['command']}` on {meta['date']}: {_duration(settings['duration'])} at",
            f"{settings['rate']:g} queries a second from a pod through the kube-dns ClusterIP,",
            f"{len(results['faults'])} faults at random intervals (seed {meta['seed']},",
            f"iptables-{meta['flavour']}); {m['nproc']} cores, {m['kernel']}, {m['coredns']}.",
            f"Verdict: **{'pass' if v['ok'] else 'FAIL'}**{outcome}",
        ),
        "",
        _para(
            "Faults are drawn from the seed (`bench/soakplan.py`): after each (re)start the agent",
            "first meets every fault that leaves it running, once each in random order (its warm-up), then",
            "faults drawn",
            f"at random; each fault comes {gap[0]:g} to {gap[1]:g} s after the previous one recovered. The",
            f"lock faults hold the sandbox's private xtables lock ({hold[0]:g} to {hold[1]:g} s,",
            "with `flock`,",
            "as kube-proxy would) while the rules are flushed, CoreDNS is killed, or a new agent starts.",
            "ConfigMap swaps are the kubelet's `..data` symlink swaps; a valid one toggles a stub domain, an",
            "invalid one is put right once the agent has rejected it. The agents run on the sandbox's",
            "private `--xtables-lock`, never the machine's. The sandbox runs iptables-legacy unless told",
            "otherwise: iptables-nft takes no xtables lock, so there the lock faults would test nothing",
            "(`--flavour nft` leaves them out).",
        ),
        "",
        RECOVERY_DEFINITION,
        "",
        *fault_table(results),
        "",
        _para(
            f"The load: {fmt(results['load']['sent'])} queries sent,",
            f"{fmt(results['load']['failed'])} failed,",
            f"{results['load']['failed_before_first_fault']} of them before the first fault.",
        ),
        "",
        _para(
            "**The agent process**, read from `/proc/PID/status` and `/proc/PID/fd` at quiet moments (just",
            "before each fault: the previous one has recovered and the pause has passed), each the median",
            "of five readings 50 ms apart. An agent process is compared only with itself, never a restarted",
            "agent with the one it replaced: *start* is its first quiet moment, *baseline* its first three",
            "quiet moments after its warm-up (every code path run once: lazy imports, caches and first",
            "reloads are not leaks), *end* its last three (the last one just before the final SIGTERM, or",
            "before the SIGKILL that ended it). Threads and open fds are compared as the fewest at the end",
            "against the most at the baseline: a reading can catch a probe's or a scrape's connection",
            "open (the agent holds none between them), while a leak raises every later reading. A leak is",
            _counts_limit(limits),
            "one more per fault shows even in the quick run. RSS is compared by medians; it moves without",
            "leaking (the",
            "allocator keeps freed arenas, the interpreter's caches fill), so its limit is a margin: growth",
            f"above {limits['rss_mib']:g} MiB or {limits['rss_fraction']:.0%} of the baseline, whichever is",
            "larger, several times the spread of the quiet moments shown below. It catches a gross leak",
            f"(about {limits['rss_mib'] * 1024 / max(1, plan['judge_after']):.0f} KiB a fault over the",
            f"{plan['judge_after']} to {plan['restart_after']} faults an agent meets after its warm-up in",
            "this run), not a slow one. A process is judged when at least",
            f"{plan['judge_after']} faults came after its warm-up.",
        ),
        "",
        *agent_table(results),
        "",
        _para(
            f"**Rules**: {fmt(rules['snapshots'])} reads of `iptables-save` in the node (every second,",
            "and at",
            f"every recovery check), **{rules['duplicates_seen']}** with a duplicate rule. After the final",
            f"SIGTERM (exit {final['exit_code']}, {final['stopped_in_s']:.2f} s):",
            f"**{len(final['rules_left'])}** rules left (both backends, both families), the interface",
            f"{'left' if final['interface_left'] else 'removed'}, {left_coredns}.",
        ),
        "",
        *observations(results),
        "",
        _para(
            f"Raw figures: `{meta['results_path']}`. `make soak-quick` runs the same for 2 minutes in CI and",
            "fails on an unrecovered fault, a duplicate rule, a leak or anything left behind.",
        ),
    ]
    return "\n".join(out) + "\n"


INVARIANTS = {
    "serving_without_rules": "the status said `serving` while some of the agent's rules were missing",
    "host_rules_without_coredns": "the host rules were in place while no CoreDNS ran (dead or stopped)",
}


def observations(results: Mapping[str, Any]) -> list[str]:
    """What the sampler saw that the verdict does not judge, and the agent's own warnings and errors."""
    inv = results["invariants"]
    out = ["**Observed, not judged** (sampled every second):"]
    for key, what in INVARIANTS.items():
        longest = sorted(inv[key]["longest_s_by_kind"].items(), key=lambda x: -x[1])
        detail = ", ".join(f"{TITLES.get(k, k)} {s:g} s" for k, s in longest)
        out.append(
            f"- {what}: {inv[key]['samples']} samples" + (f"; longest by fault: {detail}" if detail else "")
        )
    crashes = results["crashes"]
    exits = ", ".join(f"exit {c['exit_code']} after fault {c['fault']}" for c in crashes)
    out.append(f"- the agent exited by itself {len(crashes)} times" + (f": {exits}" if exits else ""))
    out.append(f"- not steady before a fault (no fault in progress): {len(results['relapses'])} times")
    notable: Counter[str] = Counter()
    for inc in results["incarnations"]:
        for event, n in inc["log"]["notable"].items():
            notable[event] += n["count"]
        notable["(lines that are not JSON events)"] += len(inc["log"]["non_json"])
    events = ", ".join(f"`{e}` {n}" for e, n in notable.most_common() if n)
    if events:
        out.append(f"- the agents' warnings and errors: {events}")
    if results["aborted"]:
        out.append(f"- the run stopped early: {results['aborted']}")
    return out


def summary(results: Mapping[str, Any]) -> str:
    """The console summary: the two tables and the verdict."""
    v = results["verdict"]
    lines = [f"soak: seed {results['meta']['seed']}", *fault_table(results), "", *agent_table(results), "",
             *observations(results), "", "verdict: " + ("pass" if v["ok"] else "FAIL")]  # fmt: skip
    lines += [f"  - {r}" for r in v["reasons"]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.soakreport")
    p.add_argument("results", type=Path, help="the soak.json written by bench.soak")
    a = p.parse_args()
    print(render_section(json.loads(a.results.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
