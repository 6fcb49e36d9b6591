"""``make soak`` and ``make soak-quick``: the real agent in the node sandbox, 1000 queries a second from a
pod, and random faults at random intervals for a fixed time; then a verdict.

    sudo .venv/bin/python -m bench.soak [--quick] [--duration S] [--seed N] [--out DIR]
        [--doc docs/benchmarks.md]

What happens (the soak section of docs/benchmarks.md gives the definitions the report uses):

1. A sandbox (iptables-legacy by default: only there does the xtables lock mean anything), the agent
   started with the sandbox's private ``--xtables-lock``, its steady-state rules recorded.
2. A bounded load from the first pod (``bench.loadgen --per-second``) for the whole run.
3. Faults drawn by :mod:`bench.soakplan` from the seed; each is injected once the previous one has recovered
   and a random pause has passed, and timed until everything is back (:meth:`bench.chaos.Chaos.unmet`).
   A background sampler reads the rules, the status and the CoreDNS processes every second (duplicates,
   "serving" without the rules, host rules while CoreDNS is dead or stopped) and the agent's /proc figures.
4. The final SIGTERM; then nothing of the agent may be left.

The run exits 1 when :func:`bench.soakstats.verdict` finds a reason (an unrecovered fault, a duplicate rule,
a leak, anything left behind), after writing its results. The sandbox is removed on the way out, also on
failure and on SIGTERM, and a final check looks for anything left.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report, soakreport
from bench.chaos import (
    HOST_RULE_COMMENT,
    KUBELET_RESTART_DELAY,
    Chaos,
    Eyes,
    Injected,
    XtablesLock,
    proc_sample,
    read_log,
    scrape,
    settled_sample,
)
from bench.loadgen import SECOND_PREFIX
from bench.node import RULE_TAG, BenchError, Node
from bench.run import machine
from bench.soakplan import RESTARTS, Fault, PlanSettings, kinds_for, schedule
from bench.soakstats import (
    LeakLimits,
    Window,
    agent_rules,
    attribute,
    difference,
    duplicates,
    failure_times,
    judge_incarnation,
    per_kind,
    restart_delay,
    stretches,
    summarize_log,
    verdict,
)
from harness import sandbox as sb
from harness.agentproc import SERVICE, AgentProcess
from harness.configmapdir import publish

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "soak.json"
SECTION_FILE = "soak-section.md"
MARKERS = ("<!-- soak:begin -->", "<!-- soak:end -->")
# bench.loadgen's per-query timeout: a query sent at t has an outcome by t + 1 s.
QUERY_TIMEOUT = 1.0
LOAD_TAIL = 5.0  # seconds the load runs past the last moment a fault may start


@dataclass(frozen=True)
class SoakSettings:
    duration: float  # seconds of load and faults
    plan: PlanSettings
    rate: float = 1000.0  # queries per second from the pod
    recover_timeout: float = 30.0  # seconds a fault may take to recover (plus its lock hold)
    late_timeout: float = 60.0  # after that, how much longer to wait before giving up on the run
    poll_every: float = 0.1  # seconds between two recovery checks
    sample_every: float = 1.0  # seconds between two samples of the rules, the status and CoreDNS
    series_every: float = 5.0  # seconds between two points of the agent's RSS/threads/fds series
    limits: LeakLimits = field(default_factory=LeakLimits)


def plan_for(quick: bool, seed: int, flavour: str) -> PlanSettings:
    """The quick run packs its faults closer (shorter pauses and lock holds) and lets the first agent be
    judged after 4 faults past its warm-up, so that 2 minutes judge one agent and see a restart even when
    the agent's restart backoff has grown; the full run lets each agent live through 20 to 40 faults past
    its warm-up (a few minutes) before a restart, so a slower leak has time to show."""
    kinds = kinds_for(flavour)
    if quick:
        return PlanSettings(
            seed, kinds, gap=(0.5, 2.0), lock_hold=(2.0, 4.0), judge_after=4, restart_after=12
        )
    return PlanSettings(seed, kinds, judge_after=20, restart_after=40)


@dataclass
class Incarnation:
    """One agent process: the faults it handled and its settled /proc samples, taken just before each fault
    (a quiet moment: the previous fault has recovered and the pause has passed) and at the end."""

    index: int
    agent: AgentProcess
    started_at: float
    kinds_seen: set[str] = field(default_factory=set)
    faults: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    ended_at: float | None = None
    end: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadRecord:
    start: float  # CLOCK_MONOTONIC of the first query
    end: float  # by when every query had its outcome
    totals: dict[str, Any]
    seconds: list[dict[str, Any]]  # bench.loadgen's per-second lines


class Sampler(threading.Thread):
    """Every ``sample_every`` seconds: the agent's rules (checked for duplicates by :class:`Eyes`; missing
    while the status says serving; host rules present while no CoreDNS runs), and now and then the agent's
    /proc figures."""

    def __init__(self, soak: Soak) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.soak = soak
        self.stop = threading.Event()
        self.serving_without_rules: list[dict[str, Any]] = []
        self.host_rules_without_coredns: list[dict[str, Any]] = []
        self.series: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        seq, next_series = 0, 0.0
        while not self.stop.wait(self.soak.settings.sample_every):
            seq += 1
            try:
                next_series = self.sample(seq, next_series)
            except Exception as exc:  # a lost sample is reported, never a silent gap
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def sample(self, seq: int, next_series: float) -> float:
        soak = self.soak
        agent = soak.chaos.current
        t = time.monotonic()
        rules = soak.eyes.rules()
        mark = {"seq": seq, "t": round(t - soak.t0, 3), "fault": soak.current_fault}
        status = agent.status()
        missing, _ = difference(rules, soak.reference)
        if status.get("serving") is True and status.get("pid") == agent.agent_pid() and missing:
            self.serving_without_rules.append({**mark, "missing": len(missing)})
        coredns = soak.eyes.coredns()
        running = [pid for pid, state in coredns.items() if state not in "TtZX"]
        if any(HOST_RULE_COMMENT in line for _, line in rules) and not running:
            self.host_rules_without_coredns.append({**mark, "coredns": coredns})
        if t >= next_series:
            s = proc_sample(agent.agent_pid())
            if s is not None:
                self.series.append({"t": round(t - soak.t0, 1), "pid": agent.agent_pid(), **asdict(s)})
            next_series = t + soak.settings.series_every
        return next_series


class Soak:
    def __init__(
        self, box: sb.Sandbox, settings: SoakSettings, log: Callable[[str], None], logs_dir: Path
    ) -> None:
        self.box = box
        self.settings = settings
        self.log = log
        self.logs_dir = logs_dir  # where the agents' logs are copied before the sandbox goes
        self.node = Node(box)
        self.lock = XtablesLock(box.workdir / "xtables.lock")
        self.eyes = Eyes(box, box.workdir / "harness-xtables.lock")
        self.reference: list[tuple[str, str]] = []
        self.chaos = Chaos(self.node, self.eyes, self.lock, self.reference)
        self.in_process = {k for k in settings.plan.kinds if k not in RESTARTS}
        self.incarnations: list[Incarnation] = []
        self.faults: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.relapses: list[dict[str, Any]] = []
        self.current_fault: int | None = None
        self.t0 = time.monotonic()
        self.aborted = ""

    # Agents ------------------------------------------------------------------------------------------
    @property
    def incarnation(self) -> Incarnation:
        return self.incarnations[-1]

    def new_incarnation(self, started_at: float) -> None:
        self.incarnations.append(Incarnation(len(self.incarnations), self.chaos.current, started_at))

    def end_incarnation(self, why: str, at: float | None = None) -> None:
        inc = self.incarnation
        inc.ended_at, inc.end = at or time.monotonic(), why

    def quiet_sample(self) -> None:
        inc = self.incarnation
        s = settled_sample(inc.agent.agent_pid())
        if s is not None:
            warmed = self.in_process <= inc.kinds_seen
            t = round(time.monotonic() - self.t0, 3)
            inc.samples.append({"t": t, "faults": inc.faults, "warmed": warmed, **asdict(s)})

    def restart_if_exited(self, injected: Injected | None) -> None:
        """The kubelet's part: an agent that exited by itself is recorded and started again after the
        kubelet's delay."""
        agent = self.chaos.current
        assert agent.proc is not None
        code = agent.proc.poll()
        if code is None:
            return
        _, other, _ = read_log(agent.log_path)
        t = round(time.monotonic() - self.t0, 3)
        self.crashes.append({"t": t, "fault": self.current_fault, "pid": agent.agent_pid(), "exit_code": code,
                             "log_tail": agent.tail(30), "non_json_lines": other[-30:]})  # fmt: skip
        self.log(f"  the agent exited {code} by itself; restarting it as a kubelet would")
        self.end_incarnation(f"exited {code} by itself")
        time.sleep(KUBELET_RESTART_DELAY)
        self.chaos.start_agent()
        self.new_incarnation(time.monotonic())
        if injected is not None:  # checks that named the old agent's CoreDNS no longer apply
            injected.checks = [c for c in injected.checks if c[0] == "the xtables lock released"]
            injected.details["agent_exited"] = code

    # Waiting -----------------------------------------------------------------------------------------
    def wait_recovered(self, injected: Injected | None, timeout: float) -> tuple[float | None, str | None]:
        """Check :meth:`Chaos.unmet` until it is satisfied: (when, None), or (None, what it still waits for)
        once ``timeout`` has passed (checked at least once)."""
        deadline = time.monotonic() + timeout
        while True:
            self.restart_if_exited(injected)
            waiting = self.chaos.unmet(injected)
            if waiting is None:
                return time.monotonic(), None
            if time.monotonic() >= deadline:
                return None, waiting
            time.sleep(self.settings.poll_every)

    def pause(self, seconds: float) -> None:
        """A pause between faults, watching the agent meanwhile (an exit is restarted at once)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.restart_if_exited(None)
            time.sleep(min(left, 0.2))

    # The run -----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The first agent serving, and its rules in steady state (the same complete set twice in a row,
        host rules included): the reference every recovery is checked against."""
        publish(self.box.workdir / "kube-dns-configmap", {})  # the kubelet's layout, no keys
        self.chaos.start_agent()
        self.new_incarnation(time.monotonic())
        self.chaos.current.wait_serving(30.0)
        self.node.warm(self.box.pod(0), sb.KUBE_DNS_IP, [SERVICE])
        previous: list[tuple[str, str]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rules = sorted(self.eyes.rules())
            if rules == previous and any(HOST_RULE_COMMENT in line for _, line in rules):
                break
            previous = rules
            time.sleep(0.5)
        else:
            raise BenchError(f"the agent's rules did not settle: {previous}")
        if duplicates(rules):
            raise BenchError(f"duplicate rules at start: {duplicates(rules)}")
        self.reference.extend(rules)
        _, waiting = self.wait_recovered(None, 20.0)
        if waiting is not None:
            raise BenchError(f"the agent did not reach steady state: waiting for {waiting}")

    def execute(self) -> dict[str, Any]:
        s = self.settings
        self.prepare()
        sampler = Sampler(self)
        sampler.start()
        load = self.node.load(rate=s.rate, duration=s.duration + LOAD_TAIL, per_second=True)
        try:
            start = load.started()
            self.t0 = start
            self.log(f"load started: {s.rate:g} queries a second for {s.duration + LOAD_TAIL:g}s")
            self.run_faults(start + s.duration)
            self.quiet_sample()
            totals = load.result()
        finally:
            sampler.stop.set()
            sampler.join(timeout=30)
            self.chaos.cancel_lock()
        seconds = [
            json.loads(x[len(SECOND_PREFIX) :]) for x in load.reader.lines if x.startswith(SECOND_PREFIX)
        ]
        record = LoadRecord(start, start + s.duration + LOAD_TAIL + QUERY_TIMEOUT, totals, seconds)
        final = self.final_stop()
        return self.results(record, sampler, final)

    def run_faults(self, end: float) -> None:
        s = self.settings
        for fault in schedule(s.plan):
            if time.monotonic() + fault.gap >= end:
                return
            self.pause(fault.gap)
            _, waiting = self.wait_recovered(None, 0.0)
            if waiting is not None:  # something broke during the pause, with no fault injected
                began = time.monotonic()
                self.log(f"  before fault {fault.index}: not steady (waiting for {waiting})")
                steady, still = self.wait_recovered(None, s.recover_timeout)
                self.relapses.append({
                    "t": round(began - self.t0, 3), "after_fault": self.current_fault, "waiting_for": waiting,
                    "steady_after_s": None if steady is None else round(steady - began, 3),
                })  # fmt: skip
                if still is not None:
                    self.aborted = f"not steady before fault {fault.index}: waiting for {still}"
                    return
            self.quiet_sample()
            if not self.one_fault(fault):
                return

    def one_fault(self, fault: Fault) -> bool:
        """Inject, wait for the recovery, record. False when the run cannot go on."""
        s = self.settings
        inc = self.incarnation
        self.current_fault = fault.index
        injected = self.chaos.inject(fault)
        if fault.kind in RESTARTS:
            inc.metrics = injected.details.pop("metrics", {})
            inc.faults += 1
            self.end_incarnation(f"fault {fault.index} ({fault.kind})", injected.at)
            self.new_incarnation(injected.at + KUBELET_RESTART_DELAY)
        timeout = s.recover_timeout + float(fault.params.get("hold_s", 0.0))
        recovered, waiting = self.wait_recovered(injected, timeout)
        late = None
        if recovered is None:
            late, _ = self.wait_recovered(injected, s.late_timeout)
        if fault.kind not in RESTARTS:
            self.incarnation.faults += 1
            self.incarnation.kinds_seen.add(fault.kind)
        if injected.after_recovery is not None and (recovered or late):
            injected.after_recovery()
        released = injected.lock_released_at
        record = {
            "index": fault.index,
            "kind": fault.kind,
            "params": dict(fault.params),
            "gap_s": fault.gap,
            "incarnation": inc.index,
            "at": injected.at,
            "t": round(injected.at - self.t0, 3),
            "recovered_at": recovered,
            "recovered_after_s": None if recovered is None else round(recovered - injected.at, 3),
            "late_recovery_s": None if late is None else round(late - injected.at, 3),
            "waiting_for": waiting,
            "lock_released_after_s": None if released is None else round(released - injected.at, 3),
            "agent_said": (said := self.agent_said(injected)),
            "restart_delay_s": restart_delay(said),
            **injected.details,
        }
        self.faults.append(record)
        took = "NOT RECOVERED" if recovered is None else f"recovered in {record['recovered_after_s']:.2f}s"
        self.log(f"  fault {fault.index:3} {fault.kind:22} {took}")
        if recovered is None and late is None:
            self.aborted = f"fault {fault.index} ({fault.kind}) never recovered: waiting for {waiting}"
            return False
        return True

    def agent_said(self, injected: Injected) -> list[str]:
        """The agent's events from the injection on (``event: cause``; not CoreDNS's own output), to read
        the recovery time against: a CoreDNS restart's backoff, a lock wait, a retry."""
        events, _, _ = read_log(self.chaos.current.log_path)
        wall = time.time() - (time.monotonic() - injected.at)
        start = datetime.datetime.fromtimestamp(wall, datetime.UTC)
        out = []
        for e in events:
            if e.get("level") == "debug" or e.get("event") == "coredns output":
                continue
            with contextlib.suppress(KeyError, ValueError):
                if datetime.datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")) >= start:
                    why = e.get("cause") or e.get("error") or e.get("detail") or ""
                    out.append(f"{e['event']}: {why}".strip())
        return out[:12]

    def final_stop(self) -> dict[str, Any]:
        """The final SIGTERM, and what is left of the agent afterwards (rules in both backends and families,
        the interface, CoreDNS processes)."""
        inc = self.incarnation
        inc.metrics = scrape(inc.agent)
        began = time.monotonic()
        try:
            code: int | str = inc.agent.stop(timeout=20.0)
        except AssertionError:
            code = "did not stop within 20s"
        stopped_in = round(time.monotonic() - began, 3)
        self.end_incarnation("final SIGTERM")
        left = []
        for flavour in ("legacy", "nft"):
            for family in (4, 6):
                rules = agent_rules(self.eyes.save(family, flavour), RULE_TAG)
                left += [f"{flavour} IPv{family} {table}: {line}" for table, line in rules]
        link = sb.run(["ip", "-n", self.box.node, "-o", "link", "show", "nodelocaldns"], check=False)
        return {
            "exit_code": code,
            "stopped_in_s": stopped_in,
            "rules_left": left,
            "interface_left": bool(link.strip()),
            "coredns_left": sorted(self.eyes.coredns()),
        }

    # Results -----------------------------------------------------------------------------------------
    def results(self, load: LoadRecord, sampler: Sampler, final: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        ends = [f["at"] for f in self.faults[1:]] + [load.end]
        windows = [Window(f["at"], f["recovered_at"], end) for f, end in zip(self.faults, ends, strict=True)]
        per_window, before = attribute(failure_times(load.seconds, load.start), windows)
        for f, (failed, after) in zip(self.faults, per_window, strict=True):
            f["failed"], f["failed_after_recovery"] = failed, after
        fault_at = [(f["at"], f["index"]) for f in self.faults]
        duplicates_seen = [
            {"t": round(d["at"] - self.t0, 3), "fault": max((i for at, i in fault_at if at <= d["at"]),
                                                            default=None), "rules": d["rules"]}
            for d in self.eyes.duplicate_snapshots
        ]  # fmt: skip
        for f in self.faults:
            del f["at"], f["recovered_at"]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return {
            "faults": self.faults,
            "per_kind": per_kind(self.faults, s.plan.kinds),
            "load": {
                **load.totals,
                "seconds": len(load.seconds),
                "failed_before_first_fault": before,
                # The seconds of the load in which queries failed, with why (t: seconds since the start).
                "failing_seconds": [
                    {"t": x["s"], "failed": x["failed"], "errors": x["errors"]}
                    for x in load.seconds
                    if x["failed"]
                ],
            },
            "rules": {
                "reference": [" ".join(r) for r in self.reference],
                "snapshots": self.eyes.snapshots,
                "duplicates_seen": len(duplicates_seen),
                "duplicate_snapshots": duplicates_seen[:20],
            },
            "invariants": {
                "serving_without_rules": stretches(
                    sampler.serving_without_rules, self.faults, s.sample_every
                ),
                "host_rules_without_coredns": stretches(
                    sampler.host_rules_without_coredns, self.faults, s.sample_every
                ),
            },
            "incarnations": [self.incarnation_result(inc) for inc in self.incarnations],
            "series": sampler.series,
            "sampler_errors": sampler.errors[:20],
            "crashes": self.crashes,
            "relapses": self.relapses,
            "aborted": self.aborted,
            "final": final,
        }

    def incarnation_result(self, inc: Incarnation) -> dict[str, Any]:
        events, other, _ = read_log(inc.agent.log_path)
        with contextlib.suppress(OSError):
            shutil.copyfile(inc.agent.log_path, self.logs_dir / f"agent-{inc.index}.log")
        lived = (inc.ended_at or time.monotonic()) - inc.started_at
        return {
            "incarnation": inc.index,
            "pid": inc.agent.agent_pid(),
            "lived_s": round(lived, 1),
            "faults": inc.faults,
            "end": inc.end,
            "samples": inc.samples,
            "judgement": judge_incarnation(inc.samples, self.settings.limits, self.settings.plan.judge_after),
            "metrics": {k: v for k, v in inc.metrics.items() if k.startswith(soakreport.METRIC_PREFIXES)},
            "log": summarize_log(events, other),
        }


_STARTED = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", flush=True)


def run(a: argparse.Namespace) -> dict[str, Any]:
    duration = a.duration if a.duration is not None else (120.0 if a.quick else 1200.0)
    duration = max(30.0, min(duration, 3 * 3600.0))  # bounded, like every load here
    seed = a.seed if a.seed is not None else secrets.randbelow(2**31)
    print(f"soak: seed {seed} (the same faults again: --seed {seed})", flush=True)
    settings = SoakSettings(
        duration=duration, plan=plan_for(a.quick, seed, a.flavour), rate=min(a.rate, 5000)
    )
    began = time.monotonic()
    try:
        with sb.sandbox(a.flavour, pods=2) as box:
            soak = Soak(box, settings, log, a.logs)
            try:
                raw = soak.execute()
            finally:
                soak.chaos.cancel_lock()
                soak.node.kill_all()
    finally:
        left = sb.leftovers(sb.CREATED_RUNS)
        if left:
            sb.remove_leftovers_of(sb.CREATED_RUNS)
            print(f"soak: removed leftovers: {left}", file=sys.stderr)
    path = a.out / RESULTS_FILE
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    meta = {
        "command": a.command or "python -m bench.soak " + " ".join(sys.argv[1:]),
        "mode": "quick" if a.quick else "full",
        "seed": seed,
        "flavour": a.flavour,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.monotonic() - began, 1),
        "machine": machine(),
        "settings": asdict(settings),
        "results_path": str(shown),
    }
    results = {"meta": meta, **raw}
    reasons = verdict(results)
    results["verdict"] = {"ok": not reasons, "reasons": reasons}
    return results


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.soak")
    p.add_argument("--quick", action="store_true", help="2 minutes, agents restarted after a short life (CI)")
    p.add_argument("--duration", type=float, help="seconds of load and faults (default 1200; 120 quick)")
    p.add_argument("--seed", type=int, help="the fault schedule's seed (default: a random one, printed)")
    p.add_argument("--rate", type=float, default=1000.0, help="queries per second from the pod")
    p.add_argument("--flavour", choices=["legacy", "nft"], default="legacy")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--logs", type=Path, default=REPO / "build" / "soak-logs",
                   help="where to keep the agents' logs (agent-N.log, one per agent process)")  # fmt: skip
    p.add_argument("--doc", type=Path, help="rewrite this page's section between the soak markers")
    p.add_argument("--command", default=None, help="the command to name in the report")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, iptables, conntrack)", file=sys.stderr)
        return 2
    results = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / RESULTS_FILE
    report.write_atomically(path, json.dumps(results, indent=1) + "\n")
    section = soakreport.render_section(results)
    report.write_atomically(a.out / SECTION_FILE, section)
    log(f"results in {path}, the section in {a.out / SECTION_FILE}, the agents' logs in {a.logs}")
    if a.doc is not None:
        try:
            text = report.replace_between_markers(a.doc.read_text(), section, MARKERS)
            report.write_atomically(a.doc, text)
            log(f"the soak section updated in {a.doc}")
        except report.MarkerError as exc:
            log(f"{a.doc} not updated: it has {exc}")
    print(soakreport.summary(results), flush=True)
    return 0 if results["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
