"""The soak's arithmetic and its verdict: the agent's rules read from ``iptables-save``, failed queries
attributed to the fault that caused them, figures per fault kind, and the leak judgement.

Pure functions over plain data (what :mod:`bench.soak` recorded), unit-tested apart from any sandbox.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import median

Rule = tuple[str, str]  # (table, the rule as iptables-save prints it)


# Rules ---------------------------------------------------------------------------------------------------
def agent_rules(save: str, tag: str) -> list[Rule]:
    """The rules in ``save`` (iptables-save output) whose text carries ``tag``, with their table."""
    table, out = "", []
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and tag in line:
            out.append((table, line.strip()))
    return out


def duplicates(rules: Iterable[Rule]) -> list[Rule]:
    """Every rule that appears more than once in its table (each listed once)."""
    return sorted(rule for rule, n in Counter(rules).items() if n > 1)


def difference(rules: Iterable[Rule], reference: Iterable[Rule]) -> tuple[list[Rule], list[Rule]]:
    """(missing, extra): the reference's rules not in ``rules``, and ``rules`` beyond the reference (both
    counted with multiplicity, so a duplicate is an extra)."""
    have, want = Counter(rules), Counter(reference)
    return sorted((want - have).elements()), sorted((have - want).elements())


# Failed queries ------------------------------------------------------------------------------------------
def failure_times(seconds: Iterable[Mapping[str, Any]], load_start: float) -> list[float]:
    """When each failed query was sent (CLOCK_MONOTONIC), from bench.loadgen's per-second lines."""
    return sorted(load_start + s["s"] + ms / 1000 for s in seconds for ms in s["fail_ms"])


@dataclass(frozen=True)
class Window:
    """A fault's share of the run: from its injection to the next fault's (or the end of the load)."""

    start: float
    recovered: float | None  # None: it never recovered
    end: float


def attribute(failures: Sequence[float], windows: Sequence[Window]) -> tuple[list[tuple[int, int]], int]:
    """Per window, (queries that failed in it, of which after it had recovered); and how many failed in no
    window (before the first fault). A query counts where it was sent."""
    per = [[0, 0] for _ in windows]
    outside = 0
    for t in failures:
        for i, w in enumerate(windows):
            if w.start <= t < w.end:
                per[i][0] += 1
                if w.recovered is not None and t >= w.recovered:
                    per[i][1] += 1
                break
        else:
            outside += 1
    return [(a, b) for a, b in per], outside


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Median and maximum, or None for both when there is nothing."""
    if not values:
        return {"median": None, "max": None}
    return {"median": median(values), "max": max(values)}


def per_kind(faults: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Count, queries failed, time to recover and the CoreDNS restart delays the agent announced, by fault
    kind (in ``kinds``' order; absent kinds too)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        mine = [f for f in faults if f["kind"] == kind]
        recovered = [f["recovered_after_s"] for f in mine if f["recovered_after_s"] is not None]
        delays = [f["restart_delay_s"] for f in mine if f.get("restart_delay_s") is not None]
        out[kind] = {
            "count": len(mine),
            "failed": spread([f["failed"] for f in mine]),
            "failed_after_recovery": sum(f["failed_after_recovery"] for f in mine),
            "recover_s": spread(recovered),
            "unrecovered": len(mine) - len(recovered),
            "restart_delay_s": spread(delays),
        }
    return out


_RESTART_DELAY = re.compile(r"restarting in ([0-9.]+)s")


def restart_delay(said: Sequence[str]) -> float | None:
    """The delay before CoreDNS's restart that the agent announced in its first state change to a backoff
    (``… restarting in 2.00s``), if it announced one: part of a fault's time to recover."""
    for line in said:
        m = _RESTART_DELAY.search(line)
        if m:
            return float(m.group(1))
    return None


# Leaks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeakLimits:
    """How much an agent process may grow from its baseline to its end before it counts as a leak.

    The baseline is its first ``window`` quiet moments after its warm-up, the end its last ``window`` (never
    overlapping). Threads and open fds are counts a steady agent returns to, give or take a probe's or a
    scrape's connection open at the moment of the reading (it holds none between them): they are compared
    as the fewest at the end against the most at the baseline, and any growth is a leak; a leak raises every
    later reading, so one descriptor per fault still shows in the quick run. Resident memory moves without
    leaking (the allocator keeps freed arenas, the interpreter's caches fill), so its medians are compared
    with a margin: ``rss_mib`` or ``rss_fraction`` of the baseline, whichever is larger. Measured when it
    was set: one agent through 35 faults in 5 minutes went from 43.0 to 44.1 MiB in a few steps, +0.6 MiB
    over the 27 faults after its warm-up; threads stayed at 14 and fds at 18 or 19 throughout."""

    threads: int = 0
    fds: int = 0
    rss_mib: float = 4.0
    rss_fraction: float = 0.10
    window: int = 3

    def rss_limit_kib(self, baseline_kib: int) -> int:
        return int(max(self.rss_mib * 1024, self.rss_fraction * baseline_kib))


FIGURES = ("rss_kib", "threads", "fds")
COUNTS = ("threads", "fds")


def _summary(samples: Sequence[Mapping[str, Any]], counts: Callable[[Iterable[int]], int]) -> dict[str, Any]:
    """One end of the comparison: the median RSS (the lower one of an even count: a figure that was
    observed) and ``counts`` (min or max) of the threads and fds."""
    rss = sorted(s["rss_kib"] for s in samples)[(len(samples) - 1) // 2]
    return {
        "t": samples[-1]["t"],
        "faults": samples[-1]["faults"],
        "rss_kib": rss,
        **{k: counts(s[k] for s in samples) for k in COUNTS},
    }


def judge_incarnation(
    samples: Sequence[Mapping[str, Any]], limits: LeakLimits, min_faults: int
) -> dict[str, Any]:
    """One agent process, judged when at least ``min_faults`` faults came between its first sample after
    its warm-up and its last (see :class:`LeakLimits`). Returns the figures and the leaks found."""
    warmed = [s for s in samples if s["warmed"]]
    out: dict[str, Any] = {
        "first": _figures(samples[0]) if samples else None,
        "baseline": None,
        "end": _figures(samples[-1]) if samples else None,
        "faults_judged": 0,
        "judged": False,
        "leaks": [],
    }
    if not warmed:
        return out
    window = max(1, min(limits.window, len(warmed) // 2))
    base, end = _summary(warmed[:window], max), _summary(warmed[-window:], min)
    out["baseline"], out["end"] = base, end
    out["faults_judged"] = warmed[-1]["faults"] - warmed[0]["faults"]
    if out["faults_judged"] < min_faults or len(warmed) < 2:
        return out
    out["judged"] = True
    growth = {k: end[k] - base[k] for k in FIGURES}
    out["growth"] = growth
    # The noise the limits stand against: how far the quiet moments after the warm-up spread.
    out["spread"] = {k: max(w[k] for w in warmed) - min(w[k] for w in warmed) for k in FIGURES}
    if growth["threads"] > limits.threads:
        out["leaks"].append(f"threads {base['threads']} -> {end['threads']}")
    if growth["fds"] > limits.fds:
        out["leaks"].append(f"open fds {base['fds']} -> {end['fds']}")
    limit = limits.rss_limit_kib(base["rss_kib"])
    if growth["rss_kib"] > limit:
        grown = f"RSS {base['rss_kib'] / 1024:.1f} -> {end['rss_kib'] / 1024:.1f} MiB"
        out["leaks"].append(f"{grown} (limit +{limit / 1024:.1f} MiB)")
    return out


def _figures(sample: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if sample is None:
        return None
    return {k: sample[k] for k in ("t", "faults", *FIGURES)}


# Invariants and the agent's log ------------------------------------------------------------------------
def stretches(marks: list[dict[str, Any]], faults: list[dict[str, Any]], every: float) -> dict[str, Any]:
    """Samples where an invariant did not hold, as the longest unbroken stretch (seconds) per fault kind."""
    kinds = {f["index"]: f["kind"] for f in faults}
    longest: dict[str, float] = {}
    run: list[dict[str, Any]] = []
    for m in [*marks, None]:
        if run and (m is None or m["seq"] != run[-1]["seq"] + 1 or m["fault"] != run[-1]["fault"]):
            kind = kinds.get(run[0]["fault"], "before any fault")
            seconds = round(run[-1]["t"] - run[0]["t"] + every, 1)
            longest[kind] = max(longest.get(kind, 0.0), seconds)
            run = []
        if m is not None:
            run.append(m)
    return {"samples": len(marks), "longest_s_by_kind": longest, "first": marks[:5]}


def summarize_log(events: list[dict[str, Any]], other: list[str]) -> dict[str, Any]:
    """The agent's warnings and errors by event (count, and the first one in full), and lines that are not
    JSON events (a traceback)."""
    levels = Counter(str(e.get("level", "?")) for e in events)
    notable: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("level") in ("warning", "error", "critical"):
            entry = notable.setdefault(str(e.get("event")), {"level": e.get("level"), "count": 0, "first": e})
            entry["count"] += 1
    return {"events": len(events), "levels": dict(levels), "notable": notable, "non_json": other[:50]}


# The verdict ---------------------------------------------------------------------------------------------
def verdict(result: Mapping[str, Any]) -> list[str]:
    """Why the run fails (empty: it passes): an unrecovered fault, a duplicate rule ever seen, anything of
    the agent's left after its final SIGTERM, an unclean exit, an exit by itself, a leak, or no agent
    judged for leaks."""
    reasons = []
    unrecovered = [f for f in result["faults"] if f["recovered_after_s"] is None]
    for f in unrecovered:
        reasons.append(
            f"fault {f['index']} ({f['kind']}) did not recover: still waiting for {f['waiting_for']}"
        )
    if result["rules"]["duplicates_seen"]:
        reasons.append(f"{result['rules']['duplicates_seen']} snapshots of the rules held a duplicate")
    final = result["final"]
    if final["rules_left"]:
        reasons.append(f"{len(final['rules_left'])} rules left after the final SIGTERM")
    if final["interface_left"]:
        reasons.append("the nodelocaldns interface was left after the final SIGTERM")
    if final["coredns_left"]:
        reasons.append(f"CoreDNS still running after the final SIGTERM: pids {final['coredns_left']}")
    if final["exit_code"] != 0:
        reasons.append(f"the agent exited {final['exit_code']} on SIGTERM")
    for crash in result["crashes"]:
        reasons.append(f"the agent exited {crash['exit_code']} by itself (after fault {crash['fault']})")
    if result["aborted"]:
        reasons.append(f"the run stopped early: {result['aborted']}")
    judged = [i for i in result["incarnations"] if i["judgement"]["judged"]]
    for inc in judged:
        for leak in inc["judgement"]["leaks"]:
            reasons.append(f"agent {inc['incarnation']} (pid {inc['pid']}): leak: {leak}")
    if not judged:
        reasons.append("no agent process lived long enough to be judged for leaks")
    return reasons
