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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.events import (
    ChildExited,
    ChildOutput,
    ChildStopped,
    ConfigChanged,
    Event,
    ProbeResult,
    Signal,
    Verdict,
)
from agent.health.probe import ProbeSettings
from agent.node.interface import Interface
from agent.node.packetfilter import PacketFilter
from agent.node.rules import HOST_QUERIES, SKIP_CONNTRACK, TAG
from agent.node.xtables import Xtables
from agent.observe.metrics import Metrics
from agent.settings import Settings
from agent.stopflag import StopFlag
from agent.supervisor.loop import Supervisor
from agent.supervisor.states import CoreDnsState
from agent.supervisor.timing import Timing
from tests.unit.fakes import (
    FakeChild,
    FakeChildren,
    FakeClock,
    FakeCorefile,
    FakeIptables,
    FakeNetlink,
    FakeNotifier,
    FakeProbers,
    QuietNetwork,
    sample,
)

LOCAL_IPS = (ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10"))
TIMING = Timing()
HANG = f"no answer from {LOCAL_IPS[0]}:53 within 0.5s"
REFUSED = f"query to {LOCAL_IPS[0]}:53 failed: Connection refused"
WRONG = f"{LOCAL_IPS[1]}:53 answered NXDOMAIN for health.node-local-dns."
PROBES = {
    "ok": (Verdict.HEALTHY, "ok"),
    "silent": (Verdict.SILENT, HANG),
    "stalled": (Verdict.STALLED, HANG),
    "refused": (Verdict.NOT_LISTENING, REFUSED),
    "wrong": (Verdict.WRONG_ANSWER, WRONG),
}


class SupervisorModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="supervisor-model-"))
        for names in ("ip_tables_names", "ip6_tables_names"):
            (self.tmp / names).write_text("raw\nfilter\n")
        self.clock = FakeClock()
        self.launched = FakeChildren(clock=self.clock, others_listening=False, first_pid=1000)
        self.iptables = FakeIptables()
        self.corefile = FakeCorefile()
        self.version = 1
        self.stopped = False
        self.exit_code: int | None = None
        self.state_events: list[dict[str, Any]] = []
        self.lock_busy_since_healthy = False

    # Set-up ---------------------------------------------------------------------------------------------
    @initialize(instances=st.sampled_from([1, 2]))
    def start(self, instances: int) -> None:
        s = Settings(
            coredns_instances=instances,
            local_ips=LOCAL_IPS,
            status_file=self.tmp / "status.json",
            agents_lock=self.tmp / "agents.lock",
            iptables_mode="legacy",
        )
        metrics, stop = Metrics(), StopFlag()
        xtables = Xtables("legacy", self.tmp / "xtables.lock", 1.0, run=self.iptables, proc_net=self.tmp)
        packet_filter = PacketFilter(
            s,
            metrics,
            xtables=xtables,
            fingerprint=self.iptables.fingerprint,
            clock=self.clock,
            stop=stop,
            lock_retry_pause=0.0,  # the fake lock frees itself at once: no real pauses
        )
        self.netlink = FakeNetlink()
        self.network = network = QuietNetwork(
            s,
            metrics,
            stop,
            interface=Interface(s.interface_name, s.local_ips, metrics, netlink=self.netlink),
            packet_filter=packet_filter,
            leftover_backends=[xtables],
        )
        self.notifier = FakeNotifier(at_ready=self.pod_rules_present)
        self.sup = Supervisor(
            settings=s,
            network=network,
            corefile=self.corefile,
            launcher=self.launched,  # type: ignore[arg-type]
            probe_settings=ProbeSettings(LOCAL_IPS, 53, "health.node-local-dns.", None),
            metrics=metrics,
            notifier=self.notifier,
            prober_factory=FakeProbers(),  # type: ignore[arg-type]
            stop=stop,
            clock=self.clock,
            sleep=self.clock.sleep,
        )
        self._guarded(self.sup.start)

    def teardown(self) -> None:
        if not getattr(self, "stopped", True) and hasattr(self, "sup"):
            self.iptables.lock_busy = self.iptables.blow_up = self.corefile.blow_up = False
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
        assert sample(self.sup.metrics, "nodelocaldns_agent_failures_total") == (1 if expect_failure else 0)

    def _post(self, event: Event) -> None:
        self.sup.post(event)
        self._guarded(lambda: self.sup.step(0))

    @property
    def children(self) -> list[FakeChild]:
        return [c for c in self.launched.made if c.pid]

    @property
    def pending_exits(self) -> list[ChildExited]:
        return self.launched.exits

    def live(self, index: int) -> FakeChild | None:
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
        verdict, detail = PROBES[outcome]
        self._post(ProbeResult(pid, verdict, detail, 0.001, at=self.clock.now))

    @precondition(lambda self: not self.stopped)
    @rule(how=st.sampled_from([1, 2, -signal.SIGKILL, -signal.SIGSEGV]), index=st.integers(0, 1))
    def coredns_dies(self, how: int, index: int) -> None:
        child = self.live(index)
        if child is not None:
            child.recent_output.append("[FATAL] plugin/loop: Loop detected")
            child.die(how)

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
        self.version += 1
        self.corefile.text = f"corefile v{self.version}"
        self.corefile.error = None if valid else "stubDomains: malformed JSON"
        self.corefile.unwritable = unwritable
        self._post(ConfigChanged("kube-dns configmap"))

    @precondition(lambda self: not self.stopped and bool(self.launched.reloads))
    @rule(confirmed=st.booleans(), stale=st.booleans())
    def reload_outcome(self, confirmed: bool, stale: bool) -> None:
        pid = self.launched.reloads[0] if stale else self.launched.reloads[-1]
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
            self.iptables.blow_up = True
        else:
            self.corefile.blow_up = True

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
        assert self.host_rules_present() == healthy
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

    # Invariants -----------------------------------------------------------------------------------------
    @invariant()
    def host_rules_only_while_coredns_is_healthy(self) -> None:
        if self.stopped or not self.host_rules_present():
            return
        healthy = self.sup.state is CoreDnsState.RUNNING and self.healthy()
        # Without the lock they cannot come off; the reconcile retries (with back-off) once it is free.
        assert self.network.packet_filter is not None
        retry_at = self.network.packet_filter.state.retry_at
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
        assert all(self.notifier.ready_answers)
        assert len(self.notifier.ready_answers) <= 1

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


TestSupervisorModel = SupervisorModel.TestCase
TestSupervisorModel.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
