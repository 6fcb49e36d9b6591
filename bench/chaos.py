"""The soak's hands and eyes in the node sandbox: the faults it injects into a running agent, and what it
observes of the agent from outside — its processes, its rules, its addresses, its status file, its log, and
a pod's answers. Nothing here reads the agent's memory or imports its code: the soak judges the agent by
its command line and its observable behaviour only.

Every iptables command the harness runs names a private lock file in the sandbox's work directory, never
the machine's ``/run/xtables.lock``; the agents run with ``--xtables-lock`` on the same private file
(``harness.agentproc``), which :class:`XtablesLock` holds with ``flock`` as kube-proxy would.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.node import RULE_TAG, BenchError, Node
from bench.soakplan import HOLD_LOCK, RESTARTS, Fault
from bench.soakstats import Rule, agent_rules, difference, duplicates
from harness import sandbox as sb
from harness.agentproc import SERVICE, SERVICE_IP, AgentProcess
from harness.configmapdir import publish

# The comment of the agent's host rules (docs/design.md, "Node networking"): present only while CoreDNS is
# healthy.
HOST_RULE_COMMENT = "host queries skip conntrack"
STUB_NAME = f"www.{sb.STUB_DOMAIN}"
STUB_ANSWER = sb.SERVICES.stub[STUB_NAME]
# The kubelet restarts a dead container at its next PLEG relist (every second); see bench.failover.
KUBELET_RESTART_DELAY = 1.0
# Source ports of the gate probes (from the second pod): a fresh port per probe, reused only after
# thousands of probes, long after conntrack forgot the flow (30 s for an unanswered UDP flow).
GATE_PORTS = range(20000, 30000)
# The ConfigMaps the agent must reject (bench.soakplan.INVALID_CONFIGMAPS), as the kubelet would mount them.
INVALID_DATA: dict[str, dict[str, str | bytes]] = {
    "malformed_json": {"stubDomains": '{"acme.local": ["10.244.2.10"'},
    "too_many_upstreams": {"upstreamNameservers": '["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]'},
    "host_name": {"stubDomains": '{"acme.local": ["ns1.acme.local"]}'},
    "not_utf8": {"stubDomains": b'{"acme.local": ["10.244.2.\xff"]}'},
    "cluster_domain": {"stubDomains": '{"cluster.local": ["10.244.2.10"]}'},
}
# The agent's event for a refused input (docs/configuration.md, "The Corefile").
REJECTED_EVENT = "configuration rejected"


class XtablesLock:
    """The sandbox's private xtables lock, held by the harness the way iptables holds it (``flock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._guard = threading.Lock()

    def acquire(self, timeout: float = 10.0) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise BenchError(f"{self.path}: not acquired within {timeout}s") from None
                time.sleep(0.01)
        with self._guard:
            self._fd = fd

    def release(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        with self._guard:
            return self._fd is not None


@dataclass(frozen=True)
class ProcSample:
    rss_kib: int
    threads: int
    fds: int


def proc_sample(pid: int) -> ProcSample | None:
    """Resident memory, threads and open file descriptors of ``pid`` from /proc; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return ProcSample(int(fields["VmRSS"].split()[0]), int(fields["Threads"]), fds)


def settled_sample(pid: int, readings: int = 5, every: float = 0.05) -> ProcSample | None:
    """The median of a few readings ``every`` seconds apart, so that one moment's odd figure (an iptables
    pipe still open, the health probe's connection just closed) is not taken for the agent's state."""
    got = []
    for i in range(readings):
        if i:
            time.sleep(every)
        s = proc_sample(pid)
        if s is None:
            return None
        got.append(s)
    return ProcSample(
        int(statistics.median_low(s.rss_kib for s in got)),
        statistics.median_low(s.threads for s in got),
        statistics.median_low(s.fds for s in got),
    )


@dataclass
class Eyes:
    """What the harness sees of the node: rules, addresses, CoreDNS processes, a pod's answers."""

    box: sb.Sandbox
    harness_lock: Path  # for the harness's own iptables reads and for changes made while it holds the lock
    snapshots: int = 0  # reads of the agent's rules (every one is checked for duplicates)
    duplicate_snapshots: list[dict[str, Any]] = field(default_factory=list)
    _ports: itertools.cycle[int] = field(default_factory=lambda: itertools.cycle(GATE_PORTS))
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.netns_inode = os.stat(f"/run/netns/{self.box.node}").st_ino

    def iptables(self, tool: str, *args: str, lock: Path | None = None, stdin: str | None = None) -> str:
        """An iptables tool in the node namespace, with a private lock file."""
        argv = ["ip", "netns", "exec", self.box.node, "env", f"XTABLES_LOCKFILE={lock or self.harness_lock}",
                tool, *args]  # fmt: skip
        return sb.run(argv, input=stdin, timeout=20)

    def save(self, family: int = 4, flavour: str | None = None) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return self.iptables(f"{base}-{flavour or self.box.flavour}-save")

    def rules(self) -> list[Rule]:
        """The agent's rules now; a read that holds a duplicate is recorded (CLOCK_MONOTONIC, the rules)."""
        rules = agent_rules(self.save(), RULE_TAG)
        dups = duplicates(rules)
        with self._guard:
            self.snapshots += 1
            if dups:
                self.duplicate_snapshots.append(
                    {"at": time.monotonic(), "rules": [" ".join(r) for r in dups]}
                )
        return rules

    def addresses(self) -> set[str]:
        out = sb.run(["ip", "-n", self.box.node, "-o", "addr", "show", "dev", "nodelocaldns"], check=False)
        return set(re.findall(r"\binet6? ([0-9a-f.:]+)/", out))

    def coredns(self) -> dict[int, str]:
        """CoreDNS processes in the node namespace: pid → state letter (R, S, T stopped, Z zombie…)."""
        out: dict[int, str] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() != "coredns":
                    continue
                if os.stat(proc / "ns" / "net").st_ino != self.netns_inode:
                    continue
                stat = (proc / "stat").read_text()
                out[int(proc.name)] = stat[stat.rindex(")") + 2]
        return out

    def gate(self) -> str:
        """A query from the second pod to the kube-dns ClusterIP: ``local`` when the local CoreDNS answered
        it (no conntrack entry: it went through the agent's socket-gated NOTRACK rule), ``fallback`` when it
        was answered through kube-proxy's DNAT (tracked), ``none`` when nothing answered."""
        port, ip = next(self._ports), self.box.pod_ip(1)
        out = self.box.exec(self.box.pod(1), ["dig", f"@{sb.KUBE_DNS_IP}", SERVICE, "-b", f"{ip}#{port}",
                                              "+short", "+time=1", "+tries=1"], check=False)  # fmt: skip
        if SERVICE_IP not in out.split():
            return "none"
        # Deleting the flow's entry tells whether there was one (exit 0), and leaves the table clean.
        deleted = subprocess.run(
            ["ip", "netns", "exec", self.box.node, "conntrack", "-D", "-p", "udp", "--orig-src", ip,
             "--orig-port-src", str(port)], capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return "fallback" if deleted.returncode == 0 else "local"

    def lookup(self, name: str) -> str:
        """``STATUS ANSWERS`` of a pod's A query for ``name`` to the ClusterIP (``"NOERROR 1.2.3.4"``,
        ``"NXDOMAIN"``; ``""`` when nothing answered)."""
        out = self.box.exec(self.box.pod(1), ["dig", f"@{sb.KUBE_DNS_IP}", name, "A", "+time=1", "+tries=1",
                                              "+noall", "+comments", "+answer"], check=False)  # fmt: skip
        m = re.search(r"status: (\w+)", out)
        if m is None:
            return ""
        records = [ln.split() for ln in out.splitlines() if ln and not ln.startswith(";")]
        answers = [r[-1] for r in records if len(r) == 5 and r[3] == "A"]
        return " ".join([m.group(1), *sorted(answers)])


def scrape(agent: AgentProcess) -> dict[str, float]:
    """The agent's metrics endpoint, as ``{"name{labels}": value}``; empty when it does not answer."""
    try:
        text = agent.metrics()
    except (sb.SandboxError, subprocess.TimeoutExpired):
        return {}
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                series[key] = float(value)
    return series


def read_log(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], list[str], int]:
    """The agent's log from byte ``offset``: its JSON events, the lines that are not JSON (a traceback), and
    the offset after the last complete line."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], [], offset
    end = data.rfind(b"\n") + 1
    events: list[dict[str, Any]] = []
    other: list[str] = []
    for raw in data[:end].decode(errors="replace").splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        elif raw.strip():
            other.append(raw)
    return events, other, offset + end


@dataclass
class Injected:
    """A fault as injected: when, what exactly, and what must hold again for it to count as recovered."""

    fault: Fault
    at: float
    details: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)
    after_recovery: Callable[[], None] | None = None
    lock_released_at: float | None = None


class Chaos:
    """The faults, aimed at the current agent; :meth:`unmet` says what is not yet back to normal."""

    def __init__(self, node: Node, eyes: Eyes, lock: XtablesLock, reference: list[Rule]) -> None:
        self.node = node
        self.box = node.box
        self.eyes = eyes
        self.lock = lock
        self.reference = reference
        self.agent: AgentProcess | None = None
        self.valid_data: dict[str, str | bytes] = {}
        self.stub_present = False
        self._release_timer: threading.Timer | None = None

    # The agent ---------------------------------------------------------------------------------------
    def start_agent(self) -> AgentProcess:
        agent = self.node.start_agent("ours", wait=False)
        lock_flag = agent.argv[agent.argv.index("--xtables-lock") + 1]
        if Path(lock_flag) != self.lock.path:  # never the machine's /run/xtables.lock
            agent.kill()
            raise BenchError(f"the agent's xtables lock is {lock_flag}, not the sandbox's {self.lock.path}")
        self.agent = agent
        return agent

    @property
    def current(self) -> AgentProcess:
        if self.agent is None:
            raise BenchError("no agent started")
        return self.agent

    def publish(self, data: dict[str, str | bytes]) -> None:
        publish(self.current.kubedns_dir, data)

    # Recovery ----------------------------------------------------------------------------------------
    def unmet(self, injected: Injected | None) -> str | None:
        """The first condition that does not hold yet (cheap ones first), or None when all hold:
        the agent alive and its status ``serving`` in state ``running``; the fault's own conditions; every
        local address on the interface; the agent's rules exactly as in steady state (nothing missing, no
        duplicate, nothing extra); and a pod's query to the ClusterIP answered by the local CoreDNS."""
        agent = self.current
        if agent.proc is None or agent.proc.poll() is not None:
            return "the agent to run"
        status = agent.status()
        if status.get("pid") != agent.agent_pid() or status.get("state") != "running":
            return "the status to say running"
        if status.get("serving") is not True:
            return "the status to say serving"
        for name, check in injected.checks if injected is not None else ():
            if not check():
                return name
        if set(agent.local_ips) - self.eyes.addresses():
            return "every local address on nodelocaldns"
        missing, extra = difference(self.eyes.rules(), self.reference)
        if missing or extra:
            return f"the rules as in steady state ({len(missing)} missing, {len(extra)} extra)"
        if self.eyes.gate() != "local":
            return "a pod's query answered by the local CoreDNS"
        return None

    def cancel_lock(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
        self.lock.release()

    # Faults ------------------------------------------------------------------------------------------
    def inject(self, fault: Fault) -> Injected:
        metrics = scrape(self.current) if fault.kind in RESTARTS else None  # the agent about to be killed
        if fault.kind in HOLD_LOCK:
            self.lock.acquire()
        injected = Injected(fault, time.monotonic())
        if metrics is not None:
            injected.details["metrics"] = metrics
        if fault.kind in HOLD_LOCK:
            self._release_after(injected, float(fault.params["hold_s"]))
            injected.checks.append(("the xtables lock released", lambda: not self.lock.held))
        kind = fault.kind
        if kind in ("sigkill_coredns", "lock_sigkill_coredns"):
            self._signal_coredns(injected, signal.SIGKILL)
        elif kind == "sigstop_coredns":
            self._signal_coredns(injected, signal.SIGSTOP)
        elif kind in ("flush_rules", "lock_flush_rules"):
            self._flush(injected, str(fault.params["scope"]))
        elif kind == "remove_address":
            address = str(fault.params["address"])
            sb.run(["ip", "-n", self.box.node, "addr", "del", f"{address}/32", "dev", "nodelocaldns"])
            injected.details["address"] = address
        elif kind == "configmap_valid":
            self._valid_configmap(injected, str(fault.params["stub"]))
        elif kind == "configmap_invalid":
            self._invalid_configmap(injected, str(fault.params["invalid"]))
        elif kind in RESTARTS:
            self._restart_agent(injected)
        else:
            raise BenchError(f"unknown fault kind {kind}")
        return injected

    def _release_after(self, injected: Injected, hold: float) -> None:
        def release() -> None:
            injected.lock_released_at = time.monotonic()
            self.lock.release()

        self._release_timer = threading.Timer(max(0.0, injected.at + hold - time.monotonic()), release)
        self._release_timer.daemon = True
        self._release_timer.start()

    def _signal_coredns(self, injected: Injected, signum: int) -> None:
        pid = self.current.coredns_pid()
        if pid is None:
            raise BenchError("the agent has no CoreDNS to signal")
        os.kill(pid, signum)
        injected.details["coredns_pid"] = pid
        agent = self.current
        injected.checks.append(("the signalled CoreDNS gone", lambda: pid not in self.eyes.coredns()))
        injected.checks.append(("a new CoreDNS", lambda: agent.coredns_pid() not in (None, pid)))

    def _flush(self, injected: Injected, scope: str) -> None:
        """Delete the agent's rules (all, or one table's) in one ``iptables-restore --noflush`` transaction
        of ``-D`` lines: exactly the tagged rules, nothing else. Retried if the agent changed them between
        the read and the write. While the harness holds the lock itself, it writes as the lock's holder."""
        tool = f"iptables-{self.box.flavour}-restore"
        lock = self.eyes.harness_lock if self.lock.held else self.lock.path
        for _ in range(5):
            rules = [r for r in self.eyes.rules() if scope in ("all", r[0])]
            text = "".join(
                f"*{table}\n"
                + "".join("-D" + line[2:] + "\n" for t, line in rules if t == table)
                + "COMMIT\n"
                for table in dict.fromkeys(t for t, _ in rules)
            )
            try:
                self.eyes.iptables(tool, "--noflush", "-w", "5", lock=lock, stdin=text)
            except sb.SandboxError:
                continue
            injected.details["rules_deleted"] = len(rules)
            return
        raise BenchError(f"could not delete the agent's {scope} rules in 5 tries")

    def _valid_configmap(self, injected: Injected, spelling: str) -> None:
        stub = spelling.format(ip=self.box.stub_ip)
        data: dict[str, str | bytes] = {"stubDomains": json.dumps({sb.STUB_DOMAIN: [stub]})} if stub else {}
        self.publish(data)
        self.valid_data, self.stub_present = data, bool(stub)
        injected.details["stub"] = stub
        injected.checks.append(self._stub_check())

    def _stub_check(self) -> tuple[str, Callable[[], bool]]:
        want = f"NOERROR {STUB_ANSWER}" if self.stub_present else "NXDOMAIN"
        return (f"{STUB_NAME} to give {want}", lambda: self.eyes.lookup(STUB_NAME) == want)

    def _invalid_configmap(self, injected: Injected, variant: str) -> None:
        agent = self.current
        offset = agent.log_path.stat().st_size
        self.publish(INVALID_DATA[variant])
        rejected: list[str] = []

        def logged() -> bool:
            events, _, _ = read_log(agent.log_path, offset)
            rejected.extend(str(e.get("error", e.get("cause", ""))) for e in events
                            if e.get("event") == REJECTED_EVENT)  # fmt: skip
            if rejected:
                injected.details["rejection"] = rejected[0]
            return bool(rejected)

        injected.checks.append((f"a '{REJECTED_EVENT}' event", logged))
        injected.checks.append(self._stub_check())  # the last good configuration keeps serving
        good = dict(self.valid_data)
        injected.after_recovery = lambda: self.publish(good)

    def _restart_agent(self, injected: Injected) -> None:
        old = self.current
        killed = self.node.kill_agent_and_coredns(old, signal.SIGKILL)
        injected.details["killed_pids"] = killed
        assert old.proc is not None
        old.proc.wait(timeout=10)
        time.sleep(KUBELET_RESTART_DELAY)
        new = self.start_agent()
        injected.details["new_agent_started_after_s"] = round(time.monotonic() - injected.at, 3)
        injected.details["new_agent_pid"] = new.agent_pid()
        injected.checks.append(
            ("the killed CoreDNS gone", lambda: not set(killed) & set(self.eyes.coredns()))
        )
