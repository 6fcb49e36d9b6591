"""The supervisor's state machine, driven event by event with the shared recording fakes (no processes, no
network) and a fake clock moved through :meth:`Supervisor.tick`."""

from __future__ import annotations

import ipaddress
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from agent.events import (
    ApiConfigMap,
    ChildExited,
    ChildOutput,
    ChildStopped,
    ConfigChanged,
    ProbeResult,
    Signal,
    Verdict,
)
from agent.health.probe import ProbeSettings
from agent.observe.status import read_status
from agent.settings import Settings
from agent.supervisor.loop import Supervisor
from agent.supervisor.states import CoreDnsState
from tests.unit.fakes import (
    Calls,
    FakeCgroup,
    FakeChild,
    FakeChildren,
    FakeClock,
    FakeCorefile,
    FakeNetwork,
    FakeNotifier,
    FakeProbers,
    sample,
)


@dataclass
class Harness:
    sup: Supervisor
    clock: FakeClock
    calls: Calls
    corefile: FakeCorefile
    network: FakeNetwork
    launched: FakeChildren
    probers: FakeProbers
    notifier: FakeNotifier
    cgroup: FakeCgroup

    @property
    def children(self) -> list[FakeChild]:
        return self.launched.made

    @property
    def child(self) -> FakeChild:
        return self.children[-1]

    def probe(self, ok: bool, detail: str = "ok") -> None:
        if ok:
            verdict, detail = Verdict.HEALTHY, "ok"
        else:
            verdict = Verdict.SILENT if detail.startswith("no answer") else Verdict.NOT_LISTENING
        self.sup.handle(ProbeResult(self.child.pid, verdict, detail, 0.001))

    def exit(self, returncode: int) -> None:
        self.child.alive = False
        self.sup.handle(ChildExited(self.child.pid, returncode))

    def after(self, seconds: float) -> str:
        """``seconds`` pass; the loop runs its timers. The cycle's sentence."""
        self.clock.now += seconds
        return self.sup.tick(self.clock.now)

    def advance_to_restart(self, index: int = 0) -> str:
        restart_at = self.sup.instances[index].restart_at
        assert restart_at is not None
        return self.after(restart_at - self.clock.now)


def build(
    tmp_path: Path, instances: int = 1, *, settings: dict[str, object] | None = None, **kw: object
) -> Harness:
    clock, calls = FakeClock(), Calls()
    launched = FakeChildren(calls, clock)
    s = Settings(
        local_ips=(ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10")),
        status_file=tmp_path / "status.json",
        coredns_instances=instances,
        **(settings or {}),  # type: ignore[arg-type]
    )
    corefile, network, probers, notifier, cgroup = (
        FakeCorefile(),
        FakeNetwork(calls),
        FakeProbers(),
        FakeNotifier(),
        FakeCgroup(),
    )
    sup = Supervisor(
        settings=s,
        network=network,
        corefile=corefile,
        launcher=launched,  # type: ignore[arg-type]
        probe_settings=ProbeSettings(s.local_ips, 53, "probe.test.", None),
        cgroup=cgroup,  # type: ignore[arg-type]
        prober_factory=probers,  # type: ignore[arg-type]  # tests feed ProbeResults by hand
        notifier=notifier,
        **{"clock": clock, "sleep": clock.sleep, **kw},  # type: ignore[arg-type]
    )
    return Harness(sup, clock, calls, corefile, network, launched, probers, notifier, cgroup)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = build(tmp_path)
    harness.sup.start()
    return harness


def test_start_sets_up_before_launching_and_installs_rules_only_once_healthy(h: Harness) -> None:
    assert h.calls.log == ["join_node", "setup_interface", "prepare_rules", f"start {h.child.pid}"]
    assert h.sup.state is CoreDnsState.STARTING
    assert h.corefile.written == ["corefile v1"]
    h.probe(ok=True)
    assert h.sup.state is CoreDnsState.RUNNING
    assert h.calls.log[-1] == "install_rules(host=True)"


def test_a_crash_removes_host_rules_at_once_and_restarts_after_a_backoff(h: Harness) -> None:
    h.probe(ok=True)
    first = h.child.pid
    h.exit(1)
    assert h.calls.log[-1] == "host_rules(False)"
    assert h.sup.state is CoreDnsState.BACKOFF
    assert "exited 1" in h.sup.cause
    h.advance_to_restart()
    assert h.child.pid != first and h.sup.state is CoreDnsState.STARTING
    h.probe(ok=True)
    assert h.calls.log[-1] == "host_rules(True)"  # rules are not installed twice
    assert sum(1 for c in h.calls.log if c.startswith("install_rules")) == 1


def test_backoff_doubles_with_consecutive_failures_and_is_capped(h: Harness) -> None:
    delays = []
    for _ in range(8):
        h.exit(2)
        restart_at = h.sup.instances[0].restart_at
        assert restart_at is not None
        delays.append(restart_at - h.clock.now)
        h.advance_to_restart()
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_three_failed_probe_rounds_mean_hung_and_coredns_is_killed(h: Harness) -> None:
    h.probe(ok=True)
    pid = h.child.pid
    h.probe(ok=False, detail="no answer from 169.254.20.10:53 within 0.5s")
    h.probe(ok=False, detail="no answer from 169.254.20.10:53 within 0.5s")
    assert h.sup.state is CoreDnsState.RUNNING
    h.probe(ok=False, detail="no answer from 169.254.20.10:53 within 0.5s")
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung")
    assert h.calls.log[-2:] == ["host_rules(False)", f"kill {pid}"]
    h.exit(-9)  # the kill's own exit is not a second failure
    assert sample(h.sup.metrics, "nodelocaldns_agent_coredns_restarts_total", cause="hang") == 1
    assert sample(h.sup.metrics, "nodelocaldns_agent_coredns_restarts_total", cause="signaled") == 0


def test_a_round_the_kernel_confirms_stalled_kills_a_running_coredns_at_once(h: Harness) -> None:
    stalled = "no answer from 169.254.20.10:53 for 0.20s, coredns read none of the 180 bytes waiting"
    h.sup.handle(ProbeResult(h.child.pid, Verdict.STALLED, stalled, 0.2))
    assert h.sup.state is CoreDnsState.STARTING  # starting: one silent round, as before, no kill yet
    assert h.sup.instances[0].probe_failures == 1
    h.probe(ok=True)
    pid = h.child.pid
    h.sup.handle(ProbeResult(pid, Verdict.STALLED, stalled, 0.2))
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith(f"hung: {stalled}")
    assert h.calls.log[-2:] == ["host_rules(False)", f"kill {pid}"]
    assert sample(h.sup.metrics, "nodelocaldns_agent_coredns_restarts_total", cause="hang") == 1


def test_unanswered_rounds_of_a_busy_coredns_never_kill_it_but_later_idle_silence_does(h: Harness) -> None:
    h.probe(ok=True)
    silent = "no answer from 10.96.0.10:53 within 0.5s"
    busy = f"{silent}; coredns busy (80% of a core since the last unanswered round)"
    h.probe(ok=False, detail=silent)
    h.probe(ok=False, detail=silent)
    for _ in range(10):  # a burst: its receive queue overflows, CoreDNS works through it
        h.sup.handle(ProbeResult(h.child.pid, Verdict.BUSY, busy, 0.5))
    assert h.sup.state is CoreDnsState.RUNNING
    assert not any(c.startswith("kill") for c in h.calls.log)
    for _ in range(3):  # then silent and idle: hung
        h.probe(ok=False, detail=silent)
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung: 3 probe rounds")


def test_probe_results_for_an_earlier_child_are_ignored(h: Harness) -> None:
    old = h.child.pid
    h.exit(1)
    h.advance_to_restart()
    h.sup.handle(ProbeResult(old, Verdict.HEALTHY, "ok", 0.001))
    assert h.sup.state is CoreDnsState.STARTING


def test_a_sigkill_counted_in_memory_events_is_reported_as_oom(h: Harness) -> None:
    h.probe(ok=True)
    h.cgroup.kills = 1
    h.exit(-9)
    assert h.sup.cause.startswith("OOM-killed (terminated by SIGKILL")
    assert sample(h.sup.metrics, "nodelocaldns_agent_coredns_restarts_total", cause="oom") == 1


def test_a_sigkill_without_an_oom_kill_is_not_called_oom(h: Harness) -> None:
    h.probe(ok=True)
    h.exit(-9)
    assert h.sup.cause.startswith("terminated by SIGKILL")


def test_invalid_configuration_is_counted_and_the_last_good_corefile_stays(h: Harness) -> None:
    h.probe(ok=True)
    h.corefile.error = "stubDomains: 'acme..local' is not a domain name"
    h.sup.handle(ConfigChanged("kube-dns configmap"))
    assert h.corefile.written == ["corefile v1"]
    assert sample(h.sup.metrics, "coredns_nodecache_setup_errors_total", errortype="configmap") == 1
    assert not any("SIGUSR1" in c for c in h.calls.log)


def test_a_changed_configuration_reloads_coredns_and_waits_for_its_confirmation(h: Harness) -> None:
    h.probe(ok=True)
    h.sup.handle(ApiConfigMap({"stubDomains": '{"acme.local": ["10.244.2.10"]}'}))
    assert h.calls.log[-1] == f"signal {h.child.pid} SIGUSR1"
    assert h.sup.instances[0].reload is not None
    h.sup.handle(ChildOutput(h.child.pid, "[INFO] Reloading complete"))
    assert h.sup.instances[0].reload is None
    assert sample(h.sup.metrics, "nodelocaldns_agent_reloads_total", result="ok") == 1


def test_a_failed_reload_puts_the_previous_corefile_back(h: Harness) -> None:
    h.probe(ok=True)
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    h.sup.handle(ChildOutput(h.child.pid, "[ERROR] Restart failed: listen tcp: address already in use"))
    assert h.corefile.written == ["corefile v1", "corefile v2", "corefile v1"]
    assert sample(h.sup.metrics, "nodelocaldns_agent_reloads_total", result="failed") == 1
    assert h.sup.reloads.retry_at is not None


def test_an_unchanged_render_does_not_reload(h: Harness) -> None:
    h.probe(ok=True)
    h.sup.handle(ConfigChanged("kube-dns configmap"))
    assert not any("SIGUSR1" in c for c in h.calls.log)


def test_sigterm_hands_dns_to_kube_dns_before_coredns_stops_then_removes_the_interface(h: Harness) -> None:
    h.probe(ok=True)
    pid = h.child.pid
    h.sup.handle(Signal(signal.SIGTERM))
    assert h.sup.stop_requested == "received SIGTERM"
    assert h.sup.shutdown() == 0
    # Every rule (host rules included) goes before CoreDNS stops; the watchers, bounded, go last.
    tail = h.calls.log[-6:]
    assert tail == ["leave_node: last", "remove_rules", f"signal {pid} SIGTERM", "remove_interface", "left",
                    "stop network watchers"]  # fmt: skip


@pytest.mark.parametrize("skip_teardown", [False, True])
def test_with_another_agent_on_the_node_the_shutdown_only_stops_coredns(
    tmp_path: Path, skip_teardown: bool
) -> None:
    h = build(tmp_path, settings={"skip_teardown": skip_teardown})
    h.sup.start()
    h.probe(ok=True)
    h.network.others_alive = True
    assert h.sup.shutdown() == 0
    # The other agent's CoreDNS serves on the same sockets: the rules (host rules too) and the interface stay.
    start = h.calls.log.index("leave_node: handover")
    assert h.calls.log[start : start + 3] == ["leave_node: handover", f"signal {h.child.pid} SIGTERM", "left"]
    assert not {"remove_rules", "remove_host_rules", "remove_interface"} & set(h.calls.log)


def test_skipteardown_leaves_the_networking_but_not_the_host_rules(tmp_path: Path) -> None:
    h = build(tmp_path, settings={"skip_teardown": True})
    h.sup.start()
    h.probe(ok=True)
    h.sup.shutdown()
    assert "remove_rules" not in h.calls.log and "remove_interface" not in h.calls.log
    # Host queries must not follow a CoreDNS that is about to stop: their rules go first.
    assert h.calls.log.index("remove_host_rules") < h.calls.log.index(f"signal {h.child.pid} SIGTERM")


def test_a_missing_binary_keeps_the_agent_running_in_backoff(h: Harness) -> None:
    h.launched.fail_start = True
    h.exit(1)
    h.advance_to_restart()
    assert h.sup.state is CoreDnsState.BACKOFF
    assert "cannot run /nope/coredns" in h.sup.cause


def test_the_periodic_check_reconciles_the_network(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    h.network.restore = ["rule: raw PREROUTING -d 169.254.20.10 udp 53"]
    h.after(h.sup.settings.sync_interval)
    assert h.network.restore == []
    assert "network restored" in capsys.readouterr().out


def test_status_file_reports_the_state_for_the_liveness_check(h: Harness) -> None:
    h.probe(ok=True)
    status = read_status(h.sup.settings.status_file)
    assert status.state == "running" and status.serving


def test_inputs_are_rendered_again_periodically_and_a_change_reloads(h: Harness) -> None:
    h.probe(ok=True)
    h.after(h.sup.timing.rerender)  # the first periodic render: nothing changed, nothing reloaded
    assert h.corefile.written == ["corefile v1"] and not any("SIGUSR1" in c for c in h.calls.log)
    h.corefile.text = "corefile v2 (resolv.conf changed)"
    h.after(h.sup.timing.rerender)
    assert h.corefile.written[-1] == "corefile v2 (resolv.conf changed)"
    assert h.calls.log[-1] == f"signal {h.child.pid} SIGUSR1"


def test_a_restarted_coredns_that_binds_but_stays_silent_is_killed_without_waiting_for_the_start_timeout(
    h: Harness,
) -> None:
    h.probe(ok=True)
    h.exit(1)
    h.advance_to_restart()
    refused = "query to 169.254.20.10:53 failed: Connection refused"
    for _ in range(5):  # not bound yet: normal while starting, pod queries go to kube-dns meanwhile
        h.sup.handle(ProbeResult(h.child.pid, Verdict.NOT_LISTENING, refused, 0.001))
    assert h.sup.state is CoreDnsState.STARTING
    pid = h.child.pid
    for _ in range(3):  # bound (the kernel gate is open) but silent: pod queries are being lost
        h.sup.handle(
            ProbeResult(h.child.pid, Verdict.SILENT, "no answer from 169.254.20.10:53 within 0.5s", 0.5)
        )
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung")
    assert f"kill {pid}" in h.calls.log


# Paths where the no-blackhole promise used to break -------------------------------------------------------


def test_an_unexpected_error_in_the_loop_is_logged_once_then_the_same_shutdown_runs_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.node.rules import RuleSyntaxError

    h = build(tmp_path)

    def broken() -> list[str]:
        raise RuleSyntaxError("cannot split rule '-m comment --comment \"NodeLocal DNS agent: x'")

    h.network.reconcile = broken  # type: ignore[method-assign]
    assert h.sup.run() == 1
    pid = h.child.pid
    assert h.calls.log[-5:] == [
        "remove_rules",
        f"signal {pid} SIGTERM",
        "remove_interface",
        "left",
        "stop network watchers",
    ]
    out = capsys.readouterr().out
    assert out.count("agent failed") == 1
    assert "RuleSyntaxError" in out and "Traceback" in out
    assert sample(h.sup.metrics, "nodelocaldns_agent_failures_total") == 1


def test_an_error_inside_one_shutdown_step_does_not_skip_the_others(h: Harness) -> None:
    h.probe(ok=True)

    def broken(deadline: float) -> None:
        raise OSError(5, "Input/output error")

    h.network.remove_rules = broken  # type: ignore[method-assign]
    assert h.sup.shutdown() == 0
    assert h.calls.log[-4:] == [
        f"signal {h.child.pid} SIGTERM",
        "remove_interface",
        "left",
        "stop network watchers",
    ]


def test_a_dead_watcher_thread_stops_the_agent_cleanly_with_a_non_zero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = build(tmp_path)
    h.network.watchers_dead = True
    assert h.sup.run() == 1
    assert "remove_rules" in h.calls.log
    assert "a network watcher thread died" in capsys.readouterr().out


def test_a_dead_prober_is_started_again_for_the_same_child(h: Harness) -> None:
    h.exit(1)
    made = len(h.probers.made)
    h.advance_to_restart()
    assert h.sup.instances[0].prober is h.probers.made[-1]
    h.probers.made[-1].alive = False
    h.after(h.sup.timing.heartbeat)
    started = [prober.pid for prober in h.probers.made[made:]]
    assert started == [h.child.pid, h.child.pid]
    assert sample(h.sup.metrics, "nodelocaldns_agent_thread_restarts_total", thread="prober") == 1


def test_a_crash_during_a_reload_keeps_the_new_corefile_and_counts_no_failed_reload(h: Harness) -> None:
    h.probe(ok=True)
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    assert h.sup.instances[0].reload is not None
    h.exit(-9)  # CoreDNS dies before it confirms
    h.advance_to_restart()  # the new CoreDNS reads v2 from the file
    h.probe(ok=True)
    h.after(60)  # long past the old reload's deadline
    assert h.corefile.written == ["corefile v1", "corefile v2"]
    assert sample(h.sup.metrics, "nodelocaldns_agent_reloads_total", result="failed") == 0


def test_a_reload_confirmation_from_an_earlier_child_does_not_count(h: Harness) -> None:
    h.probe(ok=True)
    old = h.child.pid
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    h.exit(1)
    h.advance_to_restart()
    h.sup.handle(ChildOutput(old, "[INFO] Reloading complete"))
    assert sample(h.sup.metrics, "nodelocaldns_agent_reloads_total", result="ok") == 0


def test_a_change_while_coredns_starts_is_reloaded_once_it_answers_not_before(h: Harness) -> None:
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("kube-dns configmap"))
    assert h.corefile.written[-1] == "corefile v2"
    assert not any("SIGUSR1" in c for c in h.calls.log)  # not to a CoreDNS still binding its sockets
    h.probe(ok=True)
    assert h.calls.log[-1] == f"signal {h.child.pid} SIGUSR1"
    assert h.sup.instances[0].reload is not None and h.sup.instances[0].reload.pid == h.child.pid


def test_a_failed_first_install_is_not_reported_as_serving_until_the_rules_are_in(tmp_path: Path) -> None:
    h = build(tmp_path)
    notifier = h.notifier
    h.network.fail_install = True  # the xtables lock is held at the first install
    h.sup.start()
    h.probe(ok=True)
    assert h.sup.state is CoreDnsState.RUNNING
    assert not h.sup.serving and notifier.sent == []
    assert sample(h.sup.metrics, "nodelocaldns_agent_serving") == 0
    assert read_status(h.sup.settings.status_file).serving is False
    h.network.fail_install = False  # the lock is free again: the reconcile retries and succeeds
    h.after(h.sup.settings.sync_interval)
    assert h.sup.serving and notifier.sent == ["READY=1"]
    assert read_status(h.sup.settings.status_file).serving is True
    assert sample(h.sup.metrics, "nodelocaldns_agent_serving") == 1


def test_an_unwritable_corefile_keeps_the_last_good_one_and_the_agent_running(h: Harness) -> None:
    h.probe(ok=True)

    h.corefile.unwritable = True
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    assert h.sup.corefile_text == "corefile v1"
    assert h.sup.state is CoreDnsState.RUNNING
    assert not any("SIGUSR1" in c for c in h.calls.log)
    assert sample(h.sup.metrics, "nodelocaldns_agent_corefile_renders_total", result="unwritable") == 1


def test_signal_handlers_only_record_and_the_loop_acts(h: Harness) -> None:
    import os

    h.probe(ok=True)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGQUIT)}
    try:
        h.sup.install_signal_handlers()
        before = list(h.calls.log)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGQUIT)
        assert h.calls.log == before  # nothing acted inside the handlers
        assert h.sup.stop_requested == "received SIGQUIT"
        h.sup.step(0)  # the loop takes SIGUSR1: a reload even though nothing changed
        assert h.calls.log[-1] == f"signal {h.child.pid} SIGUSR1"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_stopped_coredns_is_killed_at_once_without_waiting_for_three_rounds(h: Harness) -> None:
    h.probe(ok=True)
    pid = h.child.pid
    h.sup.handle(ChildStopped(pid, signal.SIGSTOP))
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung: stopped by SIGSTOP")
    assert f"kill {pid}" in h.calls.log
    h.sup.handle(ChildStopped(pid, signal.SIGSTOP))  # a late notice of the same child changes nothing
    assert h.calls.log.count(f"kill {pid}") == 1


def test_a_probe_answered_by_something_else_checks_the_rules_and_never_kills_coredns(h: Harness) -> None:
    h.probe(ok=True)
    nxdomain = "10.96.0.10:53 answered NXDOMAIN for health.node-local-dns."
    for _ in range(5):  # the probe rules were flushed: kube-proxy sends the probes to kube-dns
        h.sup.handle(ProbeResult(h.child.pid, Verdict.WRONG_ANSWER, nxdomain, 0.001))
    assert h.sup.state is CoreDnsState.RUNNING
    assert not any(c.startswith("kill") for c in h.calls.log)


def test_failed_probes_from_before_the_rules_were_repaired_do_not_count(h: Harness) -> None:
    h.probe(ok=True)
    silent = "no answer from 10.96.0.10:53 within 0.5s"
    made = h.clock.now
    h.network.restore = ["added IPv4 raw OUTPUT ... health probes skip conntrack"]  # a flush, repaired late
    h.after(1.0)
    for _ in range(3):  # the rounds that queued up while the loop waited for the xtables lock
        h.sup.handle(ProbeResult(h.child.pid, Verdict.SILENT, silent, 0.5, at=made))
    assert h.sup.state is CoreDnsState.RUNNING
    h.clock.now += 0.5
    for _ in range(3):  # later silence is CoreDNS's own
        h.sup.handle(ProbeResult(h.child.pid, Verdict.SILENT, silent, 0.5, at=h.clock.now))
    assert h.sup.state is CoreDnsState.BACKOFF


# Twins (--coredns-instances 2) ---------------------------------------------------------------------------


@pytest.fixture
def twins(tmp_path: Path) -> Harness:
    harness = build(tmp_path, instances=2)
    harness.sup.start()
    return harness


def _of(h: Harness, index: int) -> FakeChild:
    """The newest child launched for instance ``index``."""
    return h.launched.of(index)


def _answer(h: Harness, index: int) -> None:
    h.sup.handle(ProbeResult(_of(h, index).pid, Verdict.HEALTHY, "ok", 0.001))


def test_twins_start_together_and_the_node_serves_once_the_first_answers(twins: Harness) -> None:
    h = twins
    assert [c.index for c in h.children] == [0, 1]
    assert h.sup.state is CoreDnsState.STARTING
    _answer(h, 1)
    assert h.sup.state is CoreDnsState.RUNNING and h.sup.serving
    assert h.sup.instances[0].state is CoreDnsState.STARTING
    assert "1 of 2 instances running" in h.sup.cause
    _answer(h, 0)
    assert h.sup.cause == "answering on every local address"
    assert sum(1 for c in h.calls.log if c.startswith("install_rules")) == 1
    assert sample(h.sup.metrics, "nodelocaldns_agent_coredns_state", state="running") == 2


def test_a_twin_that_crashes_restarts_alone_and_the_host_keeps_the_cache(twins: Harness) -> None:
    h = twins
    _answer(h, 0)
    _answer(h, 1)
    survivor, crashed = _of(h, 1), _of(h, 0)
    crashed.alive = False
    h.sup.handle(ChildExited(crashed.pid, -9))
    assert "host_rules(False)" not in h.calls.log  # the twin still serves the node's own queries
    assert h.sup.state is CoreDnsState.RUNNING and h.sup.serving
    assert h.sup.instances[0].state is CoreDnsState.BACKOFF
    assert "instance 0 backoff: terminated by SIGKILL" in h.sup.cause
    h.advance_to_restart(0)
    assert _of(h, 0).pid != crashed.pid and _of(h, 1) is survivor and survivor.alive
    assert f"kill {survivor.pid}" not in h.calls.log
    _answer(h, 0)
    assert h.sup.cause == "answering on every local address"


def test_a_hung_twin_is_killed_alone_and_when_both_are_down_host_traffic_falls_back(twins: Harness) -> None:
    h = twins
    _answer(h, 0)
    _answer(h, 1)
    stalled = "no answer from 169.254.20.10:5302 for 0.20s, coredns read none of the 90 bytes waiting"
    hung = _of(h, 1)
    h.sup.handle(ProbeResult(hung.pid, Verdict.STALLED, stalled, 0.2))
    assert f"kill {hung.pid}" in h.calls.log and "host_rules(False)" not in h.calls.log
    assert f"kill {_of(h, 0).pid}" not in h.calls.log
    _of(h, 0).alive = False
    h.sup.handle(ChildExited(_of(h, 0).pid, 2))
    assert h.calls.log[-1] == "host_rules(False)"  # no twin left serving: the node's queries to kube-dns
    assert h.sup.state is CoreDnsState.BACKOFF and not h.sup.serving


def test_each_twin_is_probed_on_its_own_port_and_a_probe_of_one_says_nothing_of_the_other(
    tmp_path: Path,
) -> None:
    h = build(tmp_path, instances=2)
    h.sup.start()
    asked = [(prober.pid, prober.settings) for prober in h.probers.made]
    ports = {pid: (s.addresses, s.port, s.mark, s.health_url) for pid, s in asked}
    first = (ipaddress.ip_address("169.254.20.10"),)
    assert ports == {_of(h, 0).pid: (first, 5301, None, None), _of(h, 1).pid: (first, 5302, None, None)}
    # Between rounds each watches the shared DNS sockets, where a hung twin's share of queries waits.
    assert {(s.watch_addresses, s.watch_port) for _, s in asked} == {(h.sup.settings.local_ips, 53)}
    for _ in range(3):
        h.sup.handle(ProbeResult(_of(h, 0).pid, Verdict.SILENT, "no answer from 169.254.20.10:5301", 0.5))
    assert h.sup.instances[0].state is CoreDnsState.BACKOFF
    assert h.sup.instances[1].state is CoreDnsState.STARTING


def test_one_instance_is_probed_on_every_local_address_as_before(tmp_path: Path) -> None:
    h = build(tmp_path, health_url=lambda: "http://169.254.20.10:8080/health")
    h.sup.start()
    asked = [prober.settings for prober in h.probers.made]
    assert [(s.addresses, s.port, s.health_url) for s in asked] == [
        (h.sup.settings.local_ips, 53, "http://169.254.20.10:8080/health")
    ]


def test_a_change_reloads_every_running_twin_and_waits_for_a_starting_one(twins: Harness) -> None:
    h = twins
    _answer(h, 0)
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    assert f"signal {_of(h, 0).pid} SIGUSR1" in h.calls.log
    assert f"signal {_of(h, 1).pid} SIGUSR1" not in h.calls.log
    _answer(h, 1)
    assert h.calls.log[-1] == f"signal {_of(h, 1).pid} SIGUSR1"
    for index in (0, 1):
        h.sup.handle(ChildOutput(_of(h, index).pid, "[INFO] Reloading complete"))
    assert sample(h.sup.metrics, "nodelocaldns_agent_reloads_total", result="ok") == 2
    assert all(inst.reload is None for inst in h.sup.instances)


def test_shutdown_stops_every_twin_after_the_rules(twins: Harness) -> None:
    h = twins
    _answer(h, 0)
    _answer(h, 1)
    h.sup.stop.request("received SIGTERM")
    assert h.sup.shutdown() == 0
    pids = [_of(h, 0).pid, _of(h, 1).pid]
    stop = h.calls.log[h.calls.log.index("remove_rules") :]
    assert stop[:3] == ["remove_rules", f"signal {pids[0]} SIGTERM", f"signal {pids[1]} SIGTERM"]
    assert not any(c.alive for c in h.children)
    assert h.sup.state is CoreDnsState.STOPPED


# One clock: shutdown and handover on the fake clock, without real sleeping -------------------------------


def test_a_coredns_that_ignores_sigterm_is_killed_once_the_clock_passes_the_grace(tmp_path: Path) -> None:
    h = build(tmp_path)
    h.launched.ignore_sigterm = True
    h.sup.start()
    h.probe(ok=True)
    pid, began = h.child.pid, h.clock.now
    assert h.sup.shutdown() == 0
    stop = h.calls.log[h.calls.log.index(f"signal {pid} SIGTERM") :]
    assert stop[:2] == [f"signal {pid} SIGTERM", f"kill {pid}"] and not h.child.alive
    # The drain, then the whole grace waited for on the fake clock: nothing slept for real.
    assert h.clock.slept == [h.sup.timing.drain]
    assert h.clock.now - began == pytest.approx(h.sup.timing.drain + h.sup.timing.stop_grace)


def test_the_grace_is_cut_to_what_is_left_of_the_shutdown_budget(tmp_path: Path) -> None:
    from agent.supervisor.timing import Timing

    h = build(tmp_path, timing=Timing(shutdown_budget=1.0, stop_grace=3.0, drain=0.2))
    h.launched.ignore_sigterm = True
    h.sup.start()
    h.probe(ok=True)
    began = h.clock.now
    h.sup.shutdown()
    assert f"kill {h.child.pid}" in h.calls.log
    assert h.clock.now - began == pytest.approx(1.0)  # 0.2 of drain, 0.8 of grace: the budget, no more
    assert h.network.deadlines == [began + 1.0]  # the rules' removal is bounded by the same deadline


def test_the_handover_waits_on_the_clock_for_the_other_agents_coredns_then_stops_ours(tmp_path: Path) -> None:
    h = build(tmp_path)
    h.sup.start()
    h.probe(ok=True)
    h.network.others_alive = True
    h.launched.others_listening = False  # the other agent's CoreDNS never binds
    began = h.clock.now
    h.sup.shutdown()
    waited = h.clock.now - began
    assert h.sup.timing.handover_wait <= waited < h.sup.timing.handover_wait + 0.1
    assert set(h.clock.slept) == {0.05}
    assert h.calls.log[-3:] == [f"signal {h.child.pid} SIGTERM", "left", "stop network watchers"]


def test_the_handover_stops_ours_at_once_when_the_other_agents_coredns_listens(tmp_path: Path) -> None:
    h = build(tmp_path)
    h.sup.start()
    h.probe(ok=True)
    h.network.others_alive = True
    began = h.clock.now
    h.sup.shutdown()
    assert h.clock.now == began and h.clock.slept == []


def test_the_status_file_times_come_from_the_supervisors_clock(h: Harness) -> None:
    h.after(5.0)
    assert read_status(h.sup.settings.status_file).heartbeat == h.clock.now
    h.sup.shutdown()
    status = read_status(h.sup.settings.status_file)
    assert status.shutting_down_since is not None and status.shutting_down_since <= h.clock.now
    assert status.shutting_down_since >= 1005.0


def test_the_heartbeat_written_with_the_production_clock_passes_the_liveness_check(tmp_path: Path) -> None:
    import time

    from agent.commands.check import liveness

    h = build(tmp_path, clock=time.monotonic)
    h.sup.start()
    h.sup.tick(h.sup.clock())
    alive, why = liveness(h.sup.settings)
    assert alive, why


# Each cycle's sentence ------------------------------------------------------------------------------------


def test_each_cycle_returns_its_sentence_and_the_status_file_carries_it(h: Harness) -> None:
    assert h.after(0.1).startswith("start: launched pid")
    h.probe(ok=True)
    sentence = h.after(h.sup.timing.heartbeat)
    assert sentence == "answering on every local address"
    assert read_status(h.sup.settings.status_file).detail == sentence
    h.exit(1)
    sentence = h.after(0.1)
    assert sentence == "exited 1; restarting in 0.25s"
    assert read_status(h.sup.settings.status_file).detail == sentence


def test_a_step_returns_the_sentence_after_the_event_it_handled(h: Harness) -> None:
    h.sup.post(ProbeResult(h.child.pid, Verdict.HEALTHY, "ok", 0.001))
    assert h.sup.step(0) == "answering on every local address"


def test_with_twins_the_sentence_says_how_many_run_and_why_the_others_do_not(twins: Harness) -> None:
    h = twins
    with structlog.testing.capture_logs() as logs:
        _answer(h, 1)
    sentence = h.after(h.sup.timing.heartbeat)
    assert sentence.startswith("1 of 2 instances running; instance 0 starting: start: launched pid")
    assert read_status(h.sup.settings.status_file).detail == sentence
    # The state change is logged with the instance's own cause and the node's sentence.
    [change] = [e for e in logs if e["event"] == "coredns state"]
    assert change["cause"] == "answering on every local address" and change["node"] == sentence


# The verdict mapped, with no text read -------------------------------------------------------------------


def test_the_probe_failure_metric_is_labelled_by_the_verdicts_endpoint(h: Harness) -> None:
    h.probe(ok=True)
    h.sup.handle(ProbeResult(h.child.pid, Verdict.HEALTH_ENDPOINT_FAILED, "a detail naming nothing", 0.001))
    h.sup.handle(ProbeResult(h.child.pid, Verdict.NOT_LISTENING, "/health in a dns detail", 0.001))
    assert sample(h.sup.metrics, "nodelocaldns_agent_probe_failures_total", kind="health") == 1
    assert sample(h.sup.metrics, "nodelocaldns_agent_probe_failures_total", kind="dns") == 1


@pytest.mark.parametrize(
    ("verdict", "counts"),
    [(Verdict.NOT_LISTENING, False), (Verdict.PROBE_ERROR, False), (Verdict.HEALTH_ENDPOINT_FAILED, False),
     (Verdict.SILENT, True), (Verdict.HEALTH_ENDPOINT_SILENT, True), (Verdict.STALLED, True),
     (Verdict.BUSY, False), (Verdict.HEALTH_ENDPOINT_BUSY, False), (Verdict.WRONG_ANSWER, False)],
)  # fmt: skip
def test_while_starting_only_silence_counts_toward_a_hang(h: Harness, verdict: Verdict, counts: bool) -> None:
    for _ in range(3):
        h.sup.handle(ProbeResult(h.child.pid, verdict, "detail", 0.5))
    assert h.sup.state is (CoreDnsState.BACKOFF if counts else CoreDnsState.STARTING)


@pytest.mark.parametrize(
    "verdict", [Verdict.NOT_LISTENING, Verdict.PROBE_ERROR, Verdict.HEALTH_ENDPOINT_FAILED, Verdict.SILENT]
)
def test_once_running_three_failed_rounds_of_any_failing_verdict_mean_hung(
    h: Harness, verdict: Verdict
) -> None:
    h.probe(ok=True)
    for _ in range(3):
        h.sup.handle(ProbeResult(h.child.pid, verdict, "detail", 0.5))
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung: 3 probe rounds failed")


def test_the_supervisors_notifier_is_the_one_null_notifier_unless_one_is_given(tmp_path: Path) -> None:
    from agent.observe.sdnotify import NullNotifier

    s = Settings(status_file=tmp_path / "status.json")
    sup = Supervisor(
        s, FakeNetwork(), FakeCorefile(), FakeChildren(), ProbeSettings(s.local_ips, 53, "p.", None)
    )  # type: ignore[arg-type]
    assert type(sup.notifier) is NullNotifier
