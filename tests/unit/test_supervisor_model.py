"""The supervisor as a state machine, driven by random interleavings of everything that can happen to it.

The real :class:`Supervisor` and the real :class:`NodeNetwork` (its packet filter and interface) run over
recording fakes of the OS: the iptables binaries (an in-memory model that can hold the xtables lock), netlink,
CoreDNS children, the clock. Hypothesis picks the events — child exits of every kind, probe results, valid and
invalid configuration changes, reload outcomes, the lock held and freed, unexpected exceptions from the seams,
signals, time passing — and after every step the invariants of the no-blackhole promise are checked against
what the fakes recorded, not against the supervisor's own fields.
"""

from __future__ import annotations

import ipaddress
import itertools
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import agent.node.packetfilter
from agent.events import ChildExited, ChildOutput, ChildStopped, ConfigChanged, Event, ProbeResult, Signal
from agent.health.probe import ProbeSettings
from agent.node.interface import Interface
from agent.node.network import NodeNetwork
from agent.node.packetfilter import PacketFilter
from agent.node.rules import HOST_QUERIES, SKIP_CONNTRACK, TAG
from agent.node.xtables import Xtables
from agent.observe.metrics import Metrics
from agent.settings import ConfigError, Settings
from agent.stopflag import StopFlag
from agent.supervisor.loop import Supervisor, Timing
from agent.supervisor.states import CoreDnsState
from tests.unit.fakes import FakeIptables, FakeNetlink

LOCAL_IPS = (ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10"))
TIMING = Timing()
HANG = f"no answer from {LOCAL_IPS[0]}:53 within 0.5s"
REFUSED = f"query to {LOCAL_IPS[0]}:53 failed: Connection refused"
WRONG = f"{LOCAL_IPS[1]}:53 answered NXDOMAIN for health.node-local-dns."


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SeamBugError(RuntimeError):
    """An unexpected error from a seam (a bug, not a failure the seam reports)."""


class Runner:
    """The fake iptables binaries, which can fail once with an unexpected error."""

    def __init__(self, fake: FakeIptables) -> None:
        self.fake = fake
        self.boom = False

    def __call__(self, argv: Any, **kwargs: Any) -> Any:
        if self.boom:
            self.boom = False
            raise SeamBugError(f"{argv[0]} blew up")
        return self.fake(argv, **kwargs)


class Child:
    """A CoreDNS child: alive from start until it exits or is killed; its exit is delivered later."""

    next_pid = 1000

    def __init__(self, model: SupervisorModel, index: int = 0) -> None:
        self.model = model
        self.index = index  # the instance it was launched for (twins: 0 or 1)
        self.pid = 0
        self.alive = False
        self.recent_output: deque[str] = deque(maxlen=20)

    def start(self) -> int:
        Child.next_pid += 1
        self.pid, self.alive = Child.next_pid, True
        self.model.children.append(self)
        return self.pid

    def signal(self, signum: int) -> None:
        if signum == signal.SIGTERM and self.alive:
            self._die(0)
        elif signum == signal.SIGUSR1 and self.alive:
            self.model.reloads_sent.append(self.pid)

    def kill_group(self) -> None:
        if self.alive:
            self._die(-signal.SIGKILL)

    def _die(self, returncode: int) -> None:
        self.alive = False
        self.model.pending_exits.append(ChildExited(self.pid, returncode))

    def wait(self, timeout: float) -> int | None:
        return None if self.alive else 0

    def listening(self, ips: object, port: int, *, ours: bool = True, also: object = ()) -> bool:
        return self.alive and ours

    def memory(self) -> tuple[int, int] | None:
        return (10 << 20, 12 << 20) if self.alive else None


class Corefile:
    def __init__(self) -> None:
        self.version = 1
        self.invalid = False
        self.unwritable = False
        self.boom = False
        self.written: list[str] = []

    def render(self, api_data: Mapping[str, str] | None) -> str:
        if self.boom:
            self.boom = False
            raise SeamBugError("render blew up")
        if self.invalid:
            raise ConfigError("stubDomains: malformed JSON")
        return f"corefile v{self.version}"

    def write(self, text: str) -> bool:
        if self.unwritable:
            raise PermissionError(13, "Permission denied")
        self.written.append(text)
        return True

    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool:
        return True

    def stop_watchers(self, timeout: float) -> None: ...


class Notifier:
    def __init__(self, model: SupervisorModel) -> None:
        self.model = model
        self.ready_while_serving: list[bool] = []

    def ready(self, status: str) -> None:
        self.ready_while_serving.append(self.model.pod_rules_present())

    def status(self, text: str) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...


class Prober:
    alive = True

    def __init__(self, *args: object) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class QuietNetwork(NodeNetwork):
    """The real node network, without the kernel watchers (events come from the model instead)."""

    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool:
        return True

    def stop_watchers(self, timeout: float) -> None: ...


class SupervisorModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="supervisor-model-"))
        for names in ("ip_tables_names", "ip6_tables_names"):
            (self.tmp / names).write_text("raw\nfilter\n")
        self.children: list[Child] = []
        self.pending_exits: list[ChildExited] = []
        self.reloads_sent: list[int] = []
        self.clock = Clock()
        self.iptables = FakeIptables()
        self.runner = Runner(self.iptables)
        self.corefile = Corefile()
        self.stopped = False
        self.exit_code: int | None = None
        self.state_events: list[dict[str, Any]] = []
        self.lock_busy_since_healthy = False

    # Set-up ---------------------------------------------------------------------------------------------
    @initialize(host_failover=st.booleans(), instances=st.sampled_from([1, 2]))
    def start(self, host_failover: bool, instances: int) -> None:
        s = Settings(
            coredns_instances=instances,
            local_ips=LOCAL_IPS,
            status_file=self.tmp / "status.json",
            agents_lock=self.tmp / "agents.lock",
            host_failover=host_failover,
            iptables_mode="legacy",
        )
        metrics, stop = Metrics(), StopFlag()
        xtables = Xtables("legacy", self.tmp / "xtables.lock", 1.0, run=self.runner, proc_net=self.tmp)
        packet_filter = PacketFilter(
            s, metrics, xtables=xtables, fingerprint=self.iptables.fingerprint, clock=self.clock, stop=stop
        )
        self.netlink = FakeNetlink()
        network = QuietNetwork(
            s,
            metrics,
            stop,
            interface=Interface(s.interface_name, s.local_ips, metrics, netlink=self.netlink),
            packet_filter=packet_filter,
            leftover_backends=[xtables],
        )
        self.notifier = Notifier(self)
        self.sup = Supervisor(
            settings=s,
            network=network,
            corefile=self.corefile,
            launcher=lambda post, index: Child(self, index),  # type: ignore[arg-type, return-value]
            probe_settings=ProbeSettings(LOCAL_IPS, 53, "health.node-local-dns.", None),
            metrics=metrics,
            notifier=self.notifier,
            prober_factory=Prober,
            stop=stop,
            clock=self.clock,
            sleep=lambda seconds: None,
        )
        self._guarded(self.sup.start)

    def teardown(self) -> None:
        if not getattr(self, "stopped", True) and hasattr(self, "sup"):
            self.iptables.lock_busy = self.runner.boom = self.corefile.boom = False
            with structlog.testing.capture_logs():
                self.sup.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # Driving --------------------------------------------------------------------------------------------
    def _guarded(self, action: Callable[[], None]) -> None:
        """What :meth:`Supervisor.run` does around each cycle: an unexpected error ends in the shutdown."""
        with structlog.testing.capture_logs() as logs:
            try:
                action()
            except Exception as exc:
                self.sup.failed_with(exc)
                self._shutdown(expect_failure=True)
            else:
                if self.sup.stop_requested is not None and not self.stopped:
                    self._shutdown(expect_failure=False)
        self.state_events += [e for e in logs if e.get("event") == "coredns state"]

    def _shutdown(self, *, expect_failure: bool) -> None:
        self.iptables.lock_busy = False  # the lock-held shutdown is its own test: here it must finish
        self.exit_code = self.sup.shutdown()
        self.stopped = True
        assert self.exit_code == 0
        assert self.sup.metrics.agent_failures._value.get() == (1 if expect_failure else 0)

    def _post(self, event: Event) -> None:
        self.sup.post(event)
        self._guarded(lambda: self.sup.step(0))

    def live(self, index: int) -> Child | None:
        """Instance ``index``'s child while it lives."""
        mine = [c for c in self.children if c.index == index % self.sup.settings.coredns_instances]
        return mine[-1] if mine and mine[-1].alive else None

    def healthy(self) -> bool:
        """An instance RUNNING as far as anyone can know: a death is known once its exit reaches the loop."""
        for inst in self.sup.instances:
            if inst.state is CoreDnsState.RUNNING and inst.child is not None:
                alive = self.live(inst.index) is not None
                if alive or any(e.pid == inst.child.pid for e in self.pending_exits):
                    return True
        return False

    # Rules (what can happen) ----------------------------------------------------------------------------
    @precondition(lambda self: not self.stopped)
    @rule(
        outcome=st.sampled_from(["ok", "silent", "stalled", "refused", "wrong"]),
        stale=st.booleans(),
        index=st.integers(0, 1),
    )
    def probe(self, outcome: str, stale: bool, index: int) -> None:
        twins = self.sup.settings.coredns_instances
        pids = [c.pid for c in self.children if c.index == index % twins]
        if not pids:
            return
        pid = pids[0] if stale else pids[-1]
        detail = {"ok": "ok", "silent": HANG, "stalled": HANG, "refused": REFUSED, "wrong": WRONG}[outcome]
        result = ProbeResult(
            pid, outcome == "ok", detail, 0.001, outcome in ("silent", "stalled"),
            wrong_answer=outcome == "wrong", stalled=outcome == "stalled", at=time.monotonic(),
        )  # fmt: skip
        self._post(result)

    @precondition(lambda self: not self.stopped)
    @rule(how=st.sampled_from([1, 2, -signal.SIGKILL, -signal.SIGSEGV]), index=st.integers(0, 1))
    def coredns_dies(self, how: int, index: int) -> None:
        child = self.live(index)
        if child is not None:
            child.recent_output.append("[FATAL] plugin/loop: Loop detected")
            child.alive = False
            self.pending_exits.append(ChildExited(child.pid, how))

    @precondition(lambda self: not self.stopped)
    @rule(index=st.integers(0, 1))
    def coredns_is_stopped(self, index: int) -> None:
        """SIGSTOP: the waiter hears of it from the kernel at once."""
        child = self.live(index)
        if child is not None:
            self._post(ChildStopped(child.pid, signal.SIGSTOP))

    @precondition(lambda self: not self.stopped and bool(self.pending_exits))
    @rule(index=st.integers(min_value=0, max_value=5))
    def exit_is_delivered(self, index: int) -> None:
        self._post(self.pending_exits.pop(index % len(self.pending_exits)))

    @precondition(lambda self: not self.stopped)
    @rule(valid=st.booleans(), unwritable=st.booleans())
    def config_changes(self, valid: bool, unwritable: bool) -> None:
        self.corefile.version += 1
        self.corefile.invalid, self.corefile.unwritable = not valid, unwritable
        self._post(ConfigChanged("kube-dns configmap"))

    @precondition(lambda self: not self.stopped and bool(self.reloads_sent))
    @rule(confirmed=st.booleans(), stale=st.booleans())
    def reload_outcome(self, confirmed: bool, stale: bool) -> None:
        pid = self.reloads_sent[0] if stale else self.reloads_sent[-1]
        line = "[INFO] Reloading complete" if confirmed else "[ERROR] Restart failed: address in use"
        self._post(ChildOutput(pid, line))

    @precondition(lambda self: not self.stopped)
    @rule(busy=st.booleans())
    def xtables_lock(self, busy: bool) -> None:
        self.iptables.lock_busy = busy

    @precondition(lambda self: not self.stopped)
    @rule(seam=st.sampled_from(["iptables", "render"]))
    def a_seam_raises_unexpectedly(self, seam: str) -> None:
        if seam == "iptables":
            self.runner.boom = True
        else:
            self.corefile.boom = True

    @precondition(lambda self: not self.stopped)
    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.0, 5.0, 16.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        self._guarded(lambda: self.sup.step(0))

    @precondition(lambda self: not self.stopped)
    @rule(
        signum=st.sampled_from([signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
    )
    def a_signal_arrives(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.sup.stop.request(f"received {signal.Signals(signum).name}")  # what the handler records
        self._post(Signal(signum))

    @precondition(lambda self: not self.stopped)
    @rule()
    def things_settle(self) -> None:
        """The lock is freed and a minute passes with CoreDNS left alone: everything must be consistent."""
        self.iptables.lock_busy = False
        while self.pending_exits and not self.stopped:  # exits reach the loop within milliseconds
            self._post(self.pending_exits.pop(0))
        for _ in range(60):
            if self.stopped:
                return
            self.clock.now += 1.0
            self._guarded(lambda: self.sup.step(0))
        if self.stopped:
            return
        healthy = self.sup.state is CoreDnsState.RUNNING and self.healthy()
        host_rules_stay = not self.sup.settings.host_failover and self.ever_installed()
        assert self.host_rules_present() == (healthy or host_rules_stay)
        assert self.sup.serving == (healthy and self.pod_rules_present())

    @precondition(lambda self: self.stopped)
    @rule()
    def nothing_more_happens(self) -> None:
        """After the shutdown the run is over; the invariants keep being checked."""

    # What the fakes say ---------------------------------------------------------------------------------
    def _ours(self) -> list[str]:
        return [
            spec
            for (_mode, _family, _table), chains in self.iptables.tables.items()
            for specs in chains.values()
            for spec in specs
            if f"{TAG}:" in spec
        ]

    def host_rules_present(self) -> bool:
        return any(HOST_QUERIES in spec for spec in self._ours())

    def pod_rules_present(self) -> bool:
        gated = [spec for spec in self._ours() if SKIP_CONNTRACK in spec and "-m socket" in spec]
        return len(gated) == 2 * len(LOCAL_IPS)  # udp and tcp per address

    def ever_installed(self) -> bool:
        return any("-m socket" in text for text in self.iptables.inputs)

    # Invariants -----------------------------------------------------------------------------------------
    @invariant()
    def host_rules_only_while_coredns_is_healthy(self) -> None:
        if self.stopped or not self.sup.settings.host_failover or not self.host_rules_present():
            return
        healthy = self.sup.state is CoreDnsState.RUNNING and self.healthy()
        # Without the lock they cannot come off; the reconcile retries (with back-off) once it is free.
        retry_at = self.sup.network.packet_filter._retry_at  # type: ignore[attr-defined]
        assert healthy or self.iptables.lock_busy or retry_at > self.clock.now, (
            f"host rules point at a CoreDNS that is {self.sup.state}"
        )

    @invariant()
    def serving_and_ready_only_with_the_pod_rules_in(self) -> None:
        if self.stopped:
            return
        if self.sup.serving:
            assert self.sup.state is CoreDnsState.RUNNING
            assert self.pod_rules_present()
        assert all(self.notifier.ready_while_serving)
        assert len(self.notifier.ready_while_serving) <= 1

    @invariant()
    def at_most_one_live_child_per_instance(self) -> None:
        for index in range(self.sup.settings.coredns_instances):
            assert sum(1 for c in self.children if c.alive and c.index == index) <= 1

    @invariant()
    def the_node_is_running_while_any_instance_is(self) -> None:
        running = any(inst.state is CoreDnsState.RUNNING for inst in self.sup.instances)
        assert (self.sup.state is CoreDnsState.RUNNING) == running

    @invariant()
    def backoff_is_bounded(self) -> None:
        for inst in self.sup.instances:
            assert inst.restart_delay <= TIMING.backoff_max
            if inst.restart_at is not None and not self.stopped:
                assert inst.restart_at - self.clock.now <= TIMING.backoff_max

    @invariant()
    def every_state_change_is_logged_once_with_a_cause(self) -> None:
        assert all(e.get("cause") for e in self.state_events)
        for inst in self.sup.instances:
            # Twins' events name their instance; one instance's name none.
            events = [e for e in self.state_events if e.get("instance", 0) == inst.index]
            for before, after in itertools.pairwise(events):
                assert after["from"] == before["to"], (before, after)
            if events and not self.stopped:
                assert events[-1]["to"] == str(inst.state)

    @invariant()
    def after_shutdown_nothing_is_left(self) -> None:
        if not self.stopped:
            return
        assert self._ours() == []
        assert not any(c.alive for c in self.children)
        assert self.netlink.links == {}
        assert self.sup.state is CoreDnsState.STOPPED


@pytest.fixture(autouse=True)
def _no_real_lock_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.node.packetfilter, "_LOCK_RETRY_PAUSE", 0.0)


TestSupervisorModel = SupervisorModel.TestCase
TestSupervisorModel.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
