"""The supervisor's state machine, driven event by event with recording fakes (no processes, no network)."""

from __future__ import annotations

import contextlib
import ipaddress
import signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.coredns.cgroup import Cgroup
from agent.events import (
    ApiConfigMap,
    ChildExited,
    ChildOutput,
    ChildStopped,
    ConfigChanged,
    Event,
    ProbeResult,
    Signal,
)
from agent.health.probe import ProbeSettings
from agent.settings import ConfigError, Settings
from agent.supervisor.loop import Supervisor
from agent.supervisor.states import CoreDnsState
from tests.unit.fakes import sample


@dataclass
class Calls:
    log: list[str] = field(default_factory=list)


@dataclass
class FakeNetwork:
    """Records what the supervisor asks; ``fail_install`` makes installs fail (the xtables lock held)."""

    calls: Calls
    restore: list[str] = field(default_factory=list)
    fail_install: bool = False
    installed: bool = False
    host: bool = False
    others_alive: bool = False  # another agent holds the agents lock

    def remove_leftovers(self) -> None:
        self.calls.log.append("remove_leftovers")

    @contextlib.contextmanager
    def leaving(self, timeout: float) -> Iterator[bool]:
        self.calls.log.append("leaving: " + ("handover" if self.others_alive else "last"))
        yield not self.others_alive
        self.calls.log.append("left")

    def setup_interface(self) -> list[str]:
        self.calls.log.append("setup_interface")
        return []

    def prepare_rules(self) -> None:
        self.calls.log.append("prepare_rules")

    def install_rules(self, host_rules: bool) -> None:
        if self.installed:
            self.set_host_rules(host_rules)
            return
        self.calls.log.append(f"install_rules(host={host_rules})")
        self.installed, self.host = not self.fail_install, host_rules

    def set_host_rules(self, enabled: bool) -> None:
        if enabled != self.host:
            self.calls.log.append(f"host_rules({enabled})")
        self.host = enabled

    def rules_in_place(self) -> bool:
        return self.installed

    def reconcile(self) -> list[str]:
        changes, self.restore = self.restore, []
        if not self.installed and not self.fail_install and "install_rules(host=True)" in self.calls.log:
            self.installed = True
            changes.append("rules installed on retry")
        return changes

    def remove_rules(self, deadline: float) -> None:
        self.calls.log.append("remove_rules")
        self.installed = self.host = False

    def remove_host_rules(self, deadline: float) -> None:
        self.calls.log.append("remove_host_rules")
        self.host = False

    def remove_interface(self) -> None:
        self.calls.log.append("remove_interface")

    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool:
        return True

    def stop_watchers(self, timeout: float) -> None:
        self.calls.log.append("stop network watchers")


@dataclass
class FakeCorefile:
    calls: Calls
    text: str = "corefile v1"
    error: str | None = None
    written: list[str] = field(default_factory=list)

    def render(self, api_data: Mapping[str, str] | None) -> str:
        if self.error:
            raise ConfigError(self.error)
        return self.text + (f" api={dict(api_data)}" if api_data else "")

    def write(self, text: str) -> bool:
        self.written.append(text)
        return True

    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool:
        return True

    def stop_watchers(self, timeout: float) -> None: ...


class FakeChild:
    next_pid = 100

    def __init__(self, calls: Calls, fail_start: bool = False) -> None:
        self.calls = calls
        self.fail_start = fail_start
        self.pid = 0
        self.recent_output: deque[str] = deque(maxlen=20)
        self.alive = False
        self.index = 0  # the instance it was launched for

    def start(self) -> int:
        from agent.coredns.process import CoreDnsStartError

        if self.fail_start:
            raise CoreDnsStartError("cannot run /nope/coredns: No such file or directory")
        FakeChild.next_pid += 1
        self.pid = FakeChild.next_pid
        self.alive = True
        self.calls.log.append(f"start {self.pid}")
        return self.pid

    def signal(self, signum: int) -> None:
        self.calls.log.append(f"signal {self.pid} {signal.Signals(signum).name}")
        if signum == signal.SIGTERM:
            self.alive = False

    def kill_group(self) -> None:
        self.calls.log.append(f"kill {self.pid}")
        self.alive = False

    def wait(self, timeout: float) -> int | None:
        return None if self.alive else 0

    def memory(self) -> tuple[int, int] | None:
        return (10 << 20, 12 << 20) if self.alive else None

    def listening(self, ips: object, port: int, *, ours: bool = True, also: object = ()) -> bool:
        return self.alive if ours else self.others_listening

    others_listening = True  # another agent's CoreDNS has bound the addresses


class FakeCgroup(Cgroup):
    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))
        object.__setattr__(self, "kills", 0)

    def oom_kills(self) -> int | None:
        return int(self.kills)  # type: ignore[attr-defined]


@dataclass
class Harness:
    sup: Supervisor
    calls: Calls
    corefile: FakeCorefile
    network: FakeNetwork
    children: list[FakeChild]

    @property
    def child(self) -> FakeChild:
        return self.children[-1]

    def probe(self, ok: bool, detail: str = "ok") -> None:
        silent = detail.startswith("no answer")
        self.sup.handle(ProbeResult(self.child.pid, ok, detail if not ok else "ok", 0.001, silent))

    def exit(self, returncode: int) -> None:
        self.child.alive = False
        self.sup.handle(ChildExited(self.child.pid, returncode))

    def advance_to_restart(self) -> None:
        assert self.sup.instances[0].restart_at is not None
        self.sup._timers(self.sup.instances[0].restart_at)


def build(tmp_path: Path, instances: int = 1, **kw: object) -> Harness:
    calls = Calls()
    children: list[FakeChild] = []

    def launcher(post: Callable[[Event], None], index: int) -> FakeChild:
        children.append(FakeChild(calls))
        children[-1].index = index
        return children[-1]

    settings = Settings(
        local_ips=(ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10")),
        status_file=tmp_path / "status.json",
        coredns_instances=instances,
    )
    corefile, network = FakeCorefile(calls), FakeNetwork(calls)
    sup = Supervisor(
        settings=settings,
        network=network,
        corefile=corefile,
        launcher=launcher,  # type: ignore[arg-type]
        probe_settings=ProbeSettings(settings.local_ips, 53, "probe.test.", None),
        cgroup=FakeCgroup(),
        **{"prober_factory": _NoProber, **kw},  # type: ignore[arg-type]  # most feed ProbeResults by hand
    )
    return Harness(sup, calls, corefile, network, children)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = build(tmp_path)
    harness.sup.start()
    return harness


class _NoProber:
    alive = True

    def __init__(self, *args: object) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


def test_start_sets_up_before_launching_and_installs_rules_only_once_healthy(h: Harness) -> None:
    assert h.calls.log == ["remove_leftovers", "setup_interface", "prepare_rules", f"start {h.child.pid}"]
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
        delays.append(h.sup.instances[0].restart_delay)
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
    assert h.sup.metrics.coredns_restarts.labels("hang")._value.get() == 1
    assert h.sup.metrics.coredns_restarts.labels("signaled")._value.get() == 0


def test_a_round_the_kernel_confirms_stalled_kills_a_running_coredns_at_once(h: Harness) -> None:
    stalled = "no answer from 169.254.20.10:53 for 0.20s, coredns read none of the 180 bytes waiting"
    h.sup.handle(ProbeResult(h.child.pid, False, stalled, 0.2, silent=True, stalled=True))
    assert h.sup.state is CoreDnsState.STARTING  # starting: one silent round, as before, no kill yet
    assert h.sup.instances[0].probe_failures == 1
    h.probe(ok=True)
    pid = h.child.pid
    h.sup.handle(ProbeResult(pid, False, stalled, 0.2, silent=True, stalled=True))
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith(f"hung: {stalled}")
    assert h.calls.log[-2:] == ["host_rules(False)", f"kill {pid}"]
    assert h.sup.metrics.coredns_restarts.labels("hang")._value.get() == 1


def test_unanswered_rounds_of_a_busy_coredns_never_kill_it_but_later_idle_silence_does(h: Harness) -> None:
    h.probe(ok=True)
    silent = "no answer from 10.96.0.10:53 within 0.5s"
    busy = f"{silent}; coredns busy (80% of a core since the last unanswered round)"
    h.probe(ok=False, detail=silent)
    h.probe(ok=False, detail=silent)
    for _ in range(10):  # a burst: its receive queue overflows, CoreDNS works through it
        h.sup.handle(ProbeResult(h.child.pid, False, busy, 0.5, silent=True, busy=True))
    assert h.sup.state is CoreDnsState.RUNNING
    assert not any(c.startswith("kill") for c in h.calls.log)
    for _ in range(3):  # then silent and idle: hung
        h.probe(ok=False, detail=silent)
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung: 3 probe rounds")


def test_probe_results_for_an_earlier_child_are_ignored(h: Harness) -> None:
    old = h.child.pid
    h.exit(1)
    h.advance_to_restart()
    h.sup.handle(ProbeResult(old, True, "ok", 0.001))
    assert h.sup.state is CoreDnsState.STARTING


def test_a_sigkill_counted_in_memory_events_is_reported_as_oom(h: Harness) -> None:
    h.probe(ok=True)
    object.__setattr__(h.sup.cgroup, "kills", 1)
    h.exit(-9)
    assert h.sup.cause.startswith("OOM-killed (terminated by SIGKILL")
    assert h.sup.metrics.coredns_restarts.labels("oom")._value.get() == 1


def test_a_sigkill_without_an_oom_kill_is_not_called_oom(h: Harness) -> None:
    h.probe(ok=True)
    h.exit(-9)
    assert h.sup.cause.startswith("terminated by SIGKILL")


def test_invalid_configuration_is_counted_and_the_last_good_corefile_stays(h: Harness) -> None:
    h.probe(ok=True)
    h.corefile.error = "stubDomains: 'acme..local' is not a domain name"
    h.sup.handle(ConfigChanged("kube-dns configmap"))
    assert h.corefile.written == ["corefile v1"]
    assert h.sup.metrics.setup_errors.labels("configmap")._value.get() == 1
    assert not any("SIGUSR1" in c for c in h.calls.log)


def test_a_changed_configuration_reloads_coredns_and_waits_for_its_confirmation(h: Harness) -> None:
    h.probe(ok=True)
    h.sup.handle(ApiConfigMap({"stubDomains": '{"acme.local": ["10.244.2.10"]}'}))
    assert h.calls.log[-1] == f"signal {h.child.pid} SIGUSR1"
    assert h.sup.instances[0].reload is not None
    h.sup.handle(ChildOutput(h.child.pid, "[INFO] Reloading complete"))
    assert h.sup.instances[0].reload is None
    assert h.sup.metrics.reloads.labels("ok")._value.get() == 1


def test_a_failed_reload_puts_the_previous_corefile_back(h: Harness) -> None:
    h.probe(ok=True)
    h.corefile.text = "corefile v2"
    h.sup.handle(ConfigChanged("template"))
    h.sup.handle(ChildOutput(h.child.pid, "[ERROR] Restart failed: listen tcp: address already in use"))
    assert h.corefile.written == ["corefile v1", "corefile v2", "corefile v1"]
    assert h.sup.metrics.reloads.labels("failed")._value.get() == 1
    assert h.sup.retry_render_at is not None


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
    assert tail == ["leaving: last", "remove_rules", f"signal {pid} SIGTERM", "remove_interface", "left",
                    "stop network watchers"]  # fmt: skip


@pytest.mark.parametrize("skip_teardown", [False, True])
def test_with_another_agent_on_the_node_the_shutdown_only_stops_coredns(
    tmp_path: Path, h: Harness, skip_teardown: bool
) -> None:
    h.probe(ok=True)
    object.__setattr__(
        h.sup, "settings", Settings(skip_teardown=skip_teardown, status_file=tmp_path / "s.json")
    )
    h.network.others_alive = True
    assert h.sup.shutdown() == 0
    # The other agent's CoreDNS serves on the same sockets: the rules (host rules too) and the interface stay.
    start = h.calls.log.index("leaving: handover")
    assert h.calls.log[start : start + 3] == ["leaving: handover", f"signal {h.child.pid} SIGTERM", "left"]
    assert not {"remove_rules", "remove_host_rules", "remove_interface"} & set(h.calls.log)


def test_skipteardown_leaves_the_networking_but_not_the_host_rules(tmp_path: Path, h: Harness) -> None:
    h.probe(ok=True)
    object.__setattr__(h.sup, "settings", Settings(skip_teardown=True, status_file=tmp_path / "s.json"))
    h.sup.shutdown()
    assert "remove_rules" not in h.calls.log and "remove_interface" not in h.calls.log
    # Host queries must not follow a CoreDNS that is about to stop: their rules go first.
    assert h.calls.log.index("remove_host_rules") < h.calls.log.index(f"signal {h.child.pid} SIGTERM")


def test_a_missing_binary_keeps_the_agent_running_in_backoff(h: Harness) -> None:
    h.sup.launcher = lambda post, index=0: FakeChild(h.calls, fail_start=True)  # type: ignore[assignment, return-value]
    h.exit(1)
    h.advance_to_restart()
    assert h.sup.state is CoreDnsState.BACKOFF
    assert "cannot run /nope/coredns" in h.sup.cause


def test_the_periodic_check_reconciles_the_network(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    h.network.restore = ["rule: raw PREROUTING -d 169.254.20.10 udp 53"]
    h.sup._timers(h.sup._next_reconcile + 1)
    assert h.network.restore == []
    assert "network restored" in capsys.readouterr().out


def test_status_file_reports_the_state_for_the_liveness_check(h: Harness) -> None:
    from agent.observe.status import read_status

    h.probe(ok=True)
    status = read_status(h.sup.settings.status_file)
    assert status.state == "running" and status.serving


def test_without_host_failover_the_host_rules_stay_when_coredns_dies(tmp_path: Path, h: Harness) -> None:
    h.probe(ok=True)
    object.__setattr__(h.sup, "settings", Settings(host_failover=False, status_file=tmp_path / "s.json"))
    h.exit(-9)
    assert "host_rules(False)" not in h.calls.log


def test_inputs_are_rendered_again_periodically_and_a_change_reloads(h: Harness) -> None:
    h.probe(ok=True)
    h.sup._timers(h.sup._next_rerender)  # schedules the first periodic render
    h.corefile.text = "corefile v2 (resolv.conf changed)"
    h.sup._timers(h.sup._next_rerender)
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
        h.sup.handle(ProbeResult(h.child.pid, False, refused, 0.001))
    assert h.sup.state is CoreDnsState.STARTING
    pid = h.child.pid
    for _ in range(3):  # bound (the kernel gate is open) but silent: pod queries are being lost
        h.sup.handle(
            ProbeResult(h.child.pid, False, "no answer from 169.254.20.10:53 within 0.5s", 0.5, True)
        )
    assert h.sup.state is CoreDnsState.BACKOFF and h.sup.cause.startswith("hung")
    assert f"kill {pid}" in h.calls.log


# Paths where the no-blackhole promise used to break -------------------------------------------------------


class _Notifier:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str) -> None:
        self.sent.append("READY=1")

    def status(self, text: str) -> None: ...
    def stopping(self) -> None:
        self.sent.append("STOPPING=1")

    def watchdog(self) -> None: ...


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
    h.network.watchers_alive = lambda: False  # type: ignore[method-assign]
    assert h.sup.run() == 1
    assert "remove_rules" in h.calls.log
    assert "a network watcher thread died" in capsys.readouterr().out


def test_a_dead_prober_is_started_again_for_the_same_child(h: Harness) -> None:
    started: list[int] = []

    class Prober:
        alive = True

        def __init__(self, settings: object, pid: int, post: object) -> None:
            started.append(pid)

        def start(self) -> None: ...
        def stop(self) -> None: ...

    h.sup.prober_factory = Prober  # type: ignore[assignment]
    h.exit(1)
    h.advance_to_restart()
    assert h.sup.instances[0].prober is not None
    h.sup.instances[0].prober.alive = False  # type: ignore[misc]
    h.sup._timers(h.sup._next_heartbeat)
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
    h.sup._timers(h.sup.clock() + 60)  # long past the old reload's deadline
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
    notifier = _Notifier()
    h = build(tmp_path, notifier=notifier)
    h.network.fail_install = True  # the xtables lock is held at the first install
    h.sup.start()
    h.probe(ok=True)
    assert h.sup.state is CoreDnsState.RUNNING
    assert not h.sup.serving and notifier.sent == []
    assert sample(h.sup.metrics, "nodelocaldns_agent_serving") == 0
    from agent.observe.status import read_status

    assert read_status(h.sup.settings.status_file).serving is False
    h.network.fail_install = False  # the lock is free again: the reconcile retries and succeeds
    h.sup._timers(h.sup._next_reconcile)
    assert h.sup.serving and notifier.sent == ["READY=1"]
    assert read_status(h.sup.settings.status_file).serving is True
    assert sample(h.sup.metrics, "nodelocaldns_agent_serving") == 1


def test_an_unwritable_corefile_keeps_the_last_good_one_and_the_agent_running(h: Harness) -> None:
    h.probe(ok=True)

    def unwritable(text: str) -> bool:
        raise PermissionError(13, "Permission denied")

    h.corefile.write = unwritable  # type: ignore[method-assign]
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
        h.sup.handle(ProbeResult(h.child.pid, False, nxdomain, 0.001, wrong_answer=True))
    assert h.sup.state is CoreDnsState.RUNNING
    assert not any(c.startswith("kill") for c in h.calls.log)


def test_failed_probes_from_before_the_rules_were_repaired_do_not_count(h: Harness) -> None:
    import time

    h.probe(ok=True)
    silent = "no answer from 10.96.0.10:53 within 0.5s"
    made = time.monotonic()
    h.network.restore = ["added IPv4 raw OUTPUT ... health probes skip conntrack"]  # a flush, repaired late
    h.sup._timers(h.sup._next_reconcile)
    for _ in range(3):  # the rounds that queued up while the loop waited for the xtables lock
        h.sup.handle(ProbeResult(h.child.pid, False, silent, 0.5, silent=True, at=made))
    assert h.sup.state is CoreDnsState.RUNNING
    for _ in range(3):  # later silence is CoreDNS's own
        h.sup.handle(ProbeResult(h.child.pid, False, silent, 0.5, silent=True, at=time.monotonic()))
    assert h.sup.state is CoreDnsState.BACKOFF


# Twins (--coredns-instances 2) ---------------------------------------------------------------------------


@pytest.fixture
def twins(tmp_path: Path) -> Harness:
    harness = build(tmp_path, instances=2)
    harness.sup.start()
    return harness


def _of(h: Harness, index: int) -> FakeChild:
    """The newest child launched for instance ``index``."""
    return [c for c in h.children if c.index == index][-1]


def _answer(h: Harness, index: int) -> None:
    h.sup.handle(ProbeResult(_of(h, index).pid, True, "ok", 0.001))


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
    restart_at = h.sup.instances[0].restart_at
    assert restart_at is not None
    h.sup._timers(restart_at)
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
    h.sup.handle(ProbeResult(hung.pid, False, stalled, 0.2, silent=True, stalled=True))
    assert f"kill {hung.pid}" in h.calls.log and "host_rules(False)" not in h.calls.log
    assert f"kill {_of(h, 0).pid}" not in h.calls.log
    _of(h, 0).alive = False
    h.sup.handle(ChildExited(_of(h, 0).pid, 2))
    assert h.calls.log[-1] == "host_rules(False)"  # no twin left serving: the node's queries to kube-dns
    assert h.sup.state is CoreDnsState.BACKOFF and not h.sup.serving


def test_each_twin_is_probed_on_its_own_port_and_a_probe_of_one_says_nothing_of_the_other(
    tmp_path: Path,
) -> None:
    asked: list[tuple[int, ProbeSettings]] = []

    class Prober(_NoProber):
        def __init__(self, settings: ProbeSettings, pid: int, post: object) -> None:
            asked.append((pid, settings))

    h = build(tmp_path, instances=2, prober_factory=Prober)
    h.sup.start()
    ports = {pid: (s.addresses, s.port, s.mark, s.health_url) for pid, s in asked}
    first = (ipaddress.ip_address("169.254.20.10"),)
    assert ports == {_of(h, 0).pid: (first, 5301, None, None), _of(h, 1).pid: (first, 5302, None, None)}
    # Between rounds each watches the shared DNS sockets, where a hung twin's share of queries waits.
    assert {(s.watch_addresses, s.watch_port) for _, s in asked} == {(h.sup.settings.local_ips, 53)}
    for _ in range(3):
        h.sup.handle(ProbeResult(_of(h, 0).pid, False, "no answer from 169.254.20.10:5301", 0.5, True))
    assert h.sup.instances[0].state is CoreDnsState.BACKOFF
    assert h.sup.instances[1].state is CoreDnsState.STARTING


def test_one_instance_is_probed_on_every_local_address_as_before(tmp_path: Path) -> None:
    asked: list[ProbeSettings] = []

    class Prober(_NoProber):
        def __init__(self, settings: ProbeSettings, pid: int, post: object) -> None:
            asked.append(settings)

    h = build(tmp_path, prober_factory=Prober, health_url=lambda: "http://169.254.20.10:8080/health")
    h.sup.start()
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
