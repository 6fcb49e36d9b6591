"""The supervisor: the one owner of all state and all side effects.

Threads (the CoreDNS waiter and output pump, the prober, the file/API/netlink watchers, signal handlers) only
post events to one queue; the main thread takes them one at a time, changes state, and acts. Every state
change is logged once with its cause. Timeouts use ``time.monotonic()``.

DNS never blackholes: pod traffic is diverted to the local cache by a rule the kernel matches only while a
socket is bound to the local address, so when CoreDNS dies — however it dies — pod queries fall back to
kube-dns at once. Host traffic is diverted by rules this supervisor installs only while CoreDNS is healthy.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Protocol

from agent.children import describe_returncode
from agent.coredns.cgroup import Cgroup
from agent.coredns.process import RELOAD_DONE, CoreDnsProcess, CoreDnsStartError
from agent.events import (
    ApiConfigMap,
    ChildExited,
    ChildOutput,
    ChildStopped,
    ConfigChanged,
    Event,
    NetworkChanged,
    ProbeResult,
    Signal,
)
from agent.health.probe import Prober, ProbeSettings
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.observe.status import Status, write_status
from agent.settings import ConfigError, Settings
from agent.stopflag import StopFlag
from agent.supervisor.states import CoreDnsState

log = get_logger("supervisor")


class Network(Protocol):
    """The node's networking as the supervisor drives it (interface, rules, their watchers). It owns what is
    installed: the supervisor asks (``rules_in_place``), it does not keep a copy."""

    def remove_leftovers(self) -> None: ...
    def leaving(self, timeout: float) -> AbstractContextManager[bool]: ...
    def setup_interface(self) -> list[str]: ...
    def prepare_rules(self) -> None: ...
    def install_rules(self, host_rules: bool) -> None: ...
    def set_host_rules(self, enabled: bool) -> None: ...
    def rules_in_place(self) -> bool: ...
    def reconcile(self) -> list[str]: ...
    def remove_rules(self, deadline: float) -> None: ...
    def remove_host_rules(self, deadline: float) -> None: ...
    def remove_interface(self) -> None: ...
    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool: ...
    def stop_watchers(self, timeout: float) -> None: ...


class CorefileSource(Protocol):
    """Renders the Corefile from the current inputs; raises ConfigError naming the bad input."""

    def render(self, api_data: Mapping[str, str] | None) -> str: ...
    def write(self, text: str) -> bool: ...
    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def watchers_alive(self) -> bool: ...
    def stop_watchers(self, timeout: float) -> None: ...


class Notifier(Protocol):
    def ready(self, status: str) -> None: ...
    def status(self, text: str) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...


class NullNotifier:
    def ready(self, status: str) -> None: ...
    def status(self, text: str) -> None: ...
    def stopping(self) -> None: ...
    def watchdog(self) -> None: ...


class ProberLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def alive(self) -> bool: ...


# Launches instance N's CoreDNS (N counts from 0; twins differ only in their probe port).
Launcher = Callable[[Callable[[Event], None], int], CoreDnsProcess]
ProberFactory = Callable[[ProbeSettings, int, Callable[[Event], None]], ProberLike]


@dataclass(frozen=True)
class Timing:
    """The supervisor's clocks, in seconds. Defaults are chosen for DNS: fail over in well under a second,
    detect a hang within 3 s, never wait unboundedly."""

    # Restart delay after the n-th consecutive failure: min(backoff_max, backoff_base * 2**(n-1)).
    backoff_base: float = 0.25
    backoff_max: float = 10.0
    # Running healthily this long forgives earlier failures (the backoff starts over).
    backoff_reset_after: float = 30.0
    # A CoreDNS that does not answer on every local address this long after launch is restarted.
    start_timeout: float = 15.0
    # Consecutive failed probe rounds that make a running CoreDNS "hung" (with 0.5 s rounds: within 3 s).
    hang_after_failures: int = 3
    # How long a SIGUSR1 reload may take before it counts as failed.
    reload_timeout: float = 5.0
    # After a failed reload, try the new configuration again after this long.
    reload_retry: float = 30.0
    # Shutdown: CoreDNS gets this long after SIGTERM before SIGKILL; the whole shutdown is bounded by
    # shutdown_budget (the DaemonSet's grace period is longer).
    stop_grace: float = 3.0
    shutdown_budget: float = 10.0
    # Between removing the rules and stopping CoreDNS: queries already on their way to it are answered.
    drain: float = 0.2
    # Handing the node to another agent: how long to wait for its CoreDNS to bind before ours stops.
    handover_wait: float = 5.0
    # How often the status file, the watchdog and the memory gauges are refreshed: far inside the liveness
    # check's 10 s and systemd's 30 s watchdog, and cheap enough for the idle budget.
    heartbeat: float = 2.0
    # The inputs are rendered again this often even without a change notification (a resolv.conf edit, a
    # missed event); an unchanged render costs about a millisecond and changes nothing.
    rerender: float = 30.0


@dataclass
class _Reload:
    """A SIGUSR1 reload sent to one CoreDNS child, waiting for its confirmation."""

    pid: int
    deadline: float
    previous: str  # the Corefile that child confirmed last: written back if the reload fails


@dataclass
class Instance:
    """One CoreDNS slot (``--coredns-instances`` runs twins on the same sockets): its child, its state and
    its restart schedule. A twin fails, backs off and restarts on its own; the others keep serving."""

    index: int
    state: CoreDnsState = CoreDnsState.STOPPED
    cause: str = "not started"
    child: CoreDnsProcess | None = None
    prober: ProberLike | None = None
    failures: int = 0
    restart_at: float | None = None
    restart_delay: float = 0.0
    healthy_since: float | None = None
    # Per-child state: set at launch, cleared when that child exits or is replaced.
    probe_failures: int = 0
    wrong_answers: int = 0
    start_deadline: float | None = None
    oom_kills_at_start: int | None = None
    reload: _Reload | None = None
    reload_when_healthy: str | None = None  # a change seen while starting

    def owns(self, pid: int) -> bool:
        return self.child is not None and self.child.pid == pid


# Signals: the first group stops the agent (SIGQUIT too, as node-cache does: Python's default would dump
# core and leave the rules); the second re-renders the Corefile and reloads CoreDNS (SIGUSR1 even when
# nothing changed, as node-cache's CoreDNS does on SIGUSR1).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
# Exit status after an unexpected error: non-zero so that the kubelet or systemd restarts the agent.
EXIT_FAILED = 1


@dataclass
class Supervisor:
    settings: Settings
    network: Network
    corefile: CorefileSource
    launcher: Launcher
    probe_settings: ProbeSettings
    metrics: Metrics = field(default_factory=Metrics)
    notifier: Notifier = field(default_factory=NullNotifier)
    timing: Timing = field(default_factory=Timing)
    cgroup: Cgroup | None = None
    prober_factory: ProberFactory = Prober
    # Where CoreDNS's /health answers, read from the rendered Corefile at each launch (None: not probed).
    health_url: Callable[[], str | None] = lambda: None
    # The stop latch, shared with the packet filter so a stop cuts a lock wait short.
    stop: StopFlag = field(default_factory=StopFlag)
    # Every timeout and timer reads this clock; tests drive it.
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    # The node's view: the best of the instances' states (RUNNING while any twin runs), with its cause.
    state: CoreDnsState = field(default=CoreDnsState.STOPPED, init=False)
    cause: str = field(default="not started", init=False)
    serving: bool = field(default=False, init=False)  # RUNNING and the rules verified in place
    instances: list[Instance] = field(init=False)
    corefile_text: str | None = field(default=None, init=False)
    api_data: Mapping[str, str] | None = field(default=None, init=False)
    retry_render_at: float | None = field(default=None, init=False)
    shutting_down_since: float | None = field(default=None, init=False)
    ever_ready: bool = field(default=False, init=False)
    peak_rss: int = field(default=0, init=False)  # bytes, across every CoreDNS child
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue, init=False)
    # time.monotonic() when the reconcile last put missing rules back: earlier failed probes are discounted.
    probe_path_repaired_at: float = field(default=0.0, init=False)
    _next_reconcile: float = field(default=0.0, init=False)
    _next_heartbeat: float = field(default=0.0, init=False)
    _next_rerender: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.instances = [Instance(i) for i in range(self.settings.coredns_instances)]

    @property
    def stop_requested(self) -> str | None:
        return self.stop.reason

    # Posting (any thread). Signal handlers only record: the latch is one attribute write, and
    # SimpleQueue.put is reentrant (documented safe in a signal handler); the loop does the rest.
    def post(self, event: Event) -> None:
        self.events.put(event)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.stop.request(f"received {signal.Signals(signum).name}")
            self.post(Signal(signum))

        def record(signum: int, _frame: object) -> None:
            self.post(Signal(signum))

        for signum in STOP_SIGNALS:
            signal.signal(signum, stop)
        for signum in RELOAD_SIGNALS:
            signal.signal(signum, record)

    # The loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, loop until stopped, shut down. An unexpected error anywhere is logged once with its
        traceback, then the same bounded shutdown runs (rules out, CoreDNS stopped) and the exit status is
        non-zero, so that the kubelet or systemd starts a fresh agent."""
        failed = False
        try:
            self.start()
            while self.stop.reason is None:
                self.step(self._wait_time())
        except Exception as exc:
            failed = True
            self.failed_with(exc)
        code = self.shutdown()
        return EXIT_FAILED if failed else code

    def failed_with(self, exc: Exception) -> None:
        """Called from an ``except`` block: the error, once, with its traceback; the shutdown follows."""
        self.stop.request(f"unexpected error: {type(exc).__name__}: {exc}")
        log.error("agent failed", cause=self.stop.reason, traceback=traceback.format_exc())
        self.metrics.agent_failures.inc()

    def start(self) -> None:
        """Leftovers out, interface up, Corefile rendered, CoreDNS launched; rules follow once healthy."""
        log.info("agent starting", local_ips=[str(ip) for ip in self.settings.local_ips],
                 coredns_instances=len(self.instances))  # fmt: skip
        self.metrics.healthy_since.set_function(self._healthy_for)
        self.network.remove_leftovers()
        changes = self.network.setup_interface()
        if changes:
            log.info("interface set up", changes=changes)
        self.network.prepare_rules()
        self._render("start")
        self.corefile.start_watchers(self.post)
        self.network.start_watchers(self.post)
        for inst in self.instances:
            self._launch(inst, "start")

    def step(self, timeout: float) -> None:
        """Handle at most one event (waiting up to ``timeout``), then the timers. One loop cycle."""
        try:
            event: Event | None = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = None
        if event is not None:
            self.handle(event)
        self._timers(self.clock())

    def _wait_time(self) -> float:
        now = self.clock()
        deadlines = [self._next_reconcile, self._next_heartbeat, self._next_rerender]
        if self.retry_render_at is not None:
            deadlines.append(self.retry_render_at)
        for inst in self.instances:
            for d in (inst.restart_at, inst.start_deadline):
                if d is not None:
                    deadlines.append(d)
            if inst.reload is not None:
                deadlines.append(inst.reload.deadline)
        return max(0.0, min(deadlines) - now)

    def _instance_of(self, pid: int) -> Instance | None:
        """The instance whose current child ``pid`` is; None for an earlier child already given up on."""
        return next((inst for inst in self.instances if inst.owns(pid)), None)

    # Events -----------------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        match event:
            case ChildExited(pid=pid, returncode=returncode):
                self._on_child_exit(pid, returncode)
            case ChildStopped(pid=pid, signum=signum):
                self._on_child_stopped(pid, signum)
            case ProbeResult():
                self._on_probe(event)
            case ChildOutput(pid=pid, line=line):
                self._on_child_output(pid, line)
            case ConfigChanged(source=source):
                self._apply_config(f"{source} changed")
            case ApiConfigMap(data=data):
                self.api_data = data
                self._apply_config("kube-dns configmap changed (api)")
            case NetworkChanged(what=what):
                self._reconcile(f"kernel reported: {what}")
            case Signal(signum=signum):
                name = signal.Signals(signum).name
                if signum in RELOAD_SIGNALS:
                    self._apply_config(name, force=signum == signal.SIGUSR1)
                else:
                    self.stop.request(f"received {name}")

    def _on_child_exit(self, pid: int, returncode: int) -> None:
        inst = self._instance_of(pid)
        if inst is None or inst.child is None:
            return  # an earlier child we already gave up on
        how = describe_returncode(returncode)
        self._forget_reload(inst, "coredns exited")
        if inst.state is CoreDnsState.STOPPING:
            log.info("coredns stopped", pid=pid, how=how, **self._which(inst))
            return
        if inst.state is CoreDnsState.BACKOFF:
            return  # we killed it (hang or start timeout) and already said why
        cause, label = how, "exited" if returncode >= 0 else "signaled"
        if self._oom_killed(inst, returncode):
            cause, label = f"OOM-killed ({how}; the memory cgroup counted an oom_kill)", "oom"
        elif returncode > 0 and inst.child.recent_output:
            cause = f"{how}: {inst.child.recent_output[-1]}"
        self._fail(inst, cause, label)

    def _on_child_stopped(self, pid: int, signum: int) -> None:
        """A stopped CoreDNS answers nothing while its sockets hold the kernel gate open: a hang, known from
        the kernel at once rather than from three silent probe rounds."""
        inst = self._instance_of(pid)
        if inst is not None and inst.state in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            self._kill_and_fail(inst, f"hung: stopped by {_signal_name(signum)}", "hang")

    def _oom_killed(self, inst: Instance, returncode: int) -> bool:
        if returncode != -signal.SIGKILL or self.cgroup is None:
            return False
        kills = self.cgroup.oom_kills()
        return kills is not None and kills > (inst.oom_kills_at_start or 0)

    def _on_probe(self, result: ProbeResult) -> None:
        inst = self._instance_of(result.pid)
        if inst is None:
            return
        self.metrics.probe_latency.observe(result.latency)
        if result.ok:
            inst.probe_failures = inst.wrong_answers = 0
            # Answered, but by whom? Another agent's CoreDNS on the same sockets answers too (a surge
            # upgrade): this one is healthy once its own listeners are bound as well.
            if inst.state is CoreDnsState.STARTING and self._child_listening(inst):
                self._became_healthy(inst)
            return
        self.metrics.probe_failures.labels("health" if "/health" in result.detail else "dns").inc()
        if 0 < result.at <= self.probe_path_repaired_at:
            return  # made while the agent's rules were missing (a flush): it says nothing about CoreDNS
        if result.wrong_answer:
            # Answered, but not with the probe zone's answer: the probe went elsewhere (its rule gone,
            # kube-proxy sending it to kube-dns). Killing CoreDNS would not mend that; the rules back do.
            inst.wrong_answers += 1
            if inst.wrong_answers == 1:
                log.warning("probe answered by something else", detail=result.detail, **self._which(inst),
                            cause="the probe's path, not coredns: checking the rules")  # fmt: skip
            self._reconcile("a probe answered by something other than the local coredns")
            return
        if result.busy:
            # Unanswered, but CoreDNS kept the CPU busy meanwhile: a burst it is working through, not a hang.
            # Killing it would empty the cache and send the burst to kube-dns.
            if inst.probe_failures:
                log.warning("coredns busy, not hung", detail=result.detail, state=str(inst.state),
                            **self._which(inst))  # fmt: skip
            inst.probe_failures = 0
            return
        # While starting, only silence counts: CoreDNS not bound yet is normal (and harmless: pod queries go
        # to kube-dns), but a bound CoreDNS that does not answer swallows pod queries through the open gate.
        if inst.state is CoreDnsState.STARTING and not result.silent:
            return
        if inst.state not in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            return
        if result.stalled and inst.state is CoreDnsState.RUNNING:
            # The kernel confirmed it within the round: waiting for more silent rounds would only lose the
            # queries it swallows meanwhile.
            self._kill_and_fail(inst, f"hung: {result.detail}", "hang")
            return
        inst.probe_failures += 1
        if inst.probe_failures == 1:
            log.warning("coredns probe failed", detail=result.detail, state=str(inst.state),
                        **self._which(inst))  # fmt: skip
        if inst.probe_failures >= self.timing.hang_after_failures:
            cause = f"hung: {inst.probe_failures} probe rounds failed ({result.detail})"
            self._kill_and_fail(inst, cause, "hang")

    def _on_child_output(self, pid: int, line: str) -> None:
        inst = next((i for i in self.instances if i.reload is not None and i.reload.pid == pid), None)
        if inst is None:
            return
        if RELOAD_DONE in line:
            inst.reload = None
            self.metrics.reloads.labels("ok").inc()
            log.info("coredns reloaded", cause="SIGUSR1 reload confirmed by coredns", **self._which(inst))
        else:
            self._reload_failed(inst, line)

    # Timers -----------------------------------------------------------------------------------------
    def _timers(self, now: float) -> None:
        for inst in self.instances:
            self._instance_timers(inst, now)
        if self.retry_render_at is not None and now >= self.retry_render_at:
            self.retry_render_at = None
            self._apply_config("retry after a failed reload")
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.settings.sync_interval
            self._reconcile("periodic check")
        if now >= self._next_rerender:
            first, self._next_rerender = self._next_rerender == 0.0, now + self.timing.rerender
            if not first:  # start() has just rendered
                self._apply_config("periodic re-render")
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.timing.heartbeat
            self._heartbeat()

    def _instance_timers(self, inst: Instance, now: float) -> None:
        if inst.restart_at is not None and now >= inst.restart_at and inst.state is CoreDnsState.BACKOFF:
            self._launch(inst, f"restart after {inst.cause}")
        if (
            inst.start_deadline is not None
            and now >= inst.start_deadline
            and inst.state is CoreDnsState.STARTING
        ):
            self._kill_and_fail(
                inst,
                f"not answering on every local address {self.timing.start_timeout:.0f}s after launch"
                + self._last_output(inst),
                "unhealthy",
            )
        if inst.reload is not None and now >= inst.reload.deadline:
            self._reload_failed(inst, f"no reload confirmation within {self.timing.reload_timeout:.0f}s")

    # Actions ----------------------------------------------------------------------------------------
    def _which(self, inst: Instance) -> dict[str, int]:
        """The instance's number for its log events, when there are twins (one instance: as ever)."""
        return {"instance": inst.index} if len(self.instances) > 1 else {}

    def _set_state(self, inst: Instance, state: CoreDnsState, cause: str) -> None:
        if state is inst.state and cause == inst.cause:
            return
        before, inst.state, inst.cause = inst.state, state, cause
        self.state, self.cause = self._summary()
        for each in CoreDnsState:
            self.metrics.coredns_state.labels(str(each)).set(sum(i.state is each for i in self.instances))
        self._update_serving()
        log.info("coredns state", **{"from": str(before), "to": str(state)}, cause=cause,
                 serving=self.serving, **self._which(inst))  # fmt: skip
        self._publish()

    def _summary(self) -> tuple[CoreDnsState, str]:
        """The node's state: the best any instance is in (RUNNING while one twin runs) and why."""
        if len(self.instances) == 1:
            return self.instances[0].state, self.instances[0].cause
        order = (CoreDnsState.RUNNING, CoreDnsState.STARTING, CoreDnsState.BACKOFF, CoreDnsState.STOPPING)
        states = {inst.state for inst in self.instances}
        best = next((state for state in order if state in states), CoreDnsState.STOPPED)
        causes = {inst.cause for inst in self.instances}
        if len(states) == 1 and len(causes) == 1:
            return best, causes.pop()
        running = sum(inst.state is CoreDnsState.RUNNING for inst in self.instances)
        others = "; ".join(
            f"instance {i.index} {i.state}: {i.cause}" for i in self.instances if i.state is not best
        )
        return best, f"{running} of {len(self.instances)} instances running; {others}"

    def _update_serving(self) -> bool:
        """``serving`` follows what is true: CoreDNS healthy *and* the packet filter's rules verified in
        place. True when it changed."""
        serving = self.state is CoreDnsState.RUNNING and self.network.rules_in_place()
        if serving == self.serving:
            return False
        self.serving = serving
        self.metrics.serving.set(1 if serving else 0)
        return True

    def _publish(self) -> None:
        """The status file, then systemd: READY=1 the first time DNS is served, never before the file."""
        self._write_status()
        where = "serving DNS" if self.serving else "DNS on the kube-dns fallback path"
        self.notifier.status(f"{where}; coredns {self.state}: {self.cause}")
        if self.serving and not self.ever_ready:
            self.ever_ready = True
            self.notifier.ready("serving DNS")

    def _launch(self, inst: Instance, cause: str) -> None:
        inst.restart_at = None
        if inst.child is not None:
            inst.child.kill_group()
            inst.child.wait(timeout=2.0)
        self._forget_child(inst)
        if self.corefile_text is None:
            cause = "no valid Corefile yet: fix the template or ConfigMap"
            self._backoff(inst, cause, "start_failed", count=False)
            return
        inst.oom_kills_at_start = self.cgroup.oom_kills() if self.cgroup else None
        child = self.launcher(self.post, inst.index)
        try:
            pid = child.start()
        except CoreDnsStartError as exc:
            self._backoff(inst, str(exc), "start_failed")
            return
        inst.child = child
        inst.start_deadline = self.clock() + self.timing.start_timeout
        self._start_prober(inst)
        self._set_state(inst, CoreDnsState.STARTING, f"{cause}: launched pid {pid}")

    def _forget_child(self, inst: Instance) -> None:
        """Everything that belonged to the previous child goes with it."""
        self._stop_prober(inst)
        self._forget_reload(inst, "coredns replaced")
        inst.child = None
        inst.probe_failures = inst.wrong_answers = 0
        inst.start_deadline = None
        inst.reload_when_healthy = None

    def _start_prober(self, inst: Instance) -> None:
        assert inst.child is not None
        inst.prober = self.prober_factory(self._probe_for(inst), inst.child.pid, self.post)
        inst.prober.start()

    def _probe_for(self, inst: Instance) -> ProbeSettings:
        """What the instance's prober asks. One CoreDNS: the probe zone on every local address (the node's
        data path) and /health. Twins share those sockets, and the kernel hands a probe to any of them, so
        each twin is asked on its own port (``--coredns-probe-port`` + its number, on the link-local
        address), where only it answers."""
        if len(self.instances) == 1:
            return replace(self.probe_settings, health_url=self.health_url())
        return replace(
            self.probe_settings,
            addresses=(self.settings.twin_probe_address(),),
            port=self.settings.coredns_probe_port + inst.index,
            mark=None,
            health_url=None,
            watch_addresses=self.probe_settings.addresses,  # the pods' queries wait on the shared sockets
            watch_port=self.probe_settings.port,
        )

    def _child_listening(self, inst: Instance) -> bool:
        assert inst.child is not None
        return inst.child.listening(self.settings.require_local_ips(), self.settings.dns_port)

    def _others_listening(self) -> bool:
        """Another agent's CoreDNS has bound every local address: a process none of our instances is."""
        children = [inst.child for inst in self.instances if inst.child is not None]
        ips, port = self.settings.require_local_ips(), self.settings.dns_port
        return bool(children) and children[0].listening(ips, port, ours=False, also=children[1:])

    def _await_other_coredns(self, deadline: float) -> None:
        """Handing the node to another agent: its CoreDNS must have bound the addresses before ours stops
        (the other agent may not be serving yet), or pods on the link-local address would find no one."""
        if not any(i.child is not None and i.child.wait(timeout=0) is None for i in self.instances):
            return
        until = min(deadline, time.monotonic() + self.timing.handover_wait)
        while not self._others_listening():
            if time.monotonic() >= until:
                wait = self.timing.handover_wait
                log.warning(
                    "coredns stopped before the other agent's", waited=wait, cause="it did not bind in time"
                )
                return
            self.sleep(0.05)
        log.info("the other agent's coredns listens", cause="handing the node over")

    def _became_healthy(self, inst: Instance) -> None:
        inst.start_deadline = None
        inst.healthy_since = self.clock()
        self.network.install_rules(host_rules=True)
        self._set_state(inst, CoreDnsState.RUNNING, "answering on every local address")
        if inst.reload_when_healthy is not None:
            cause, inst.reload_when_healthy = inst.reload_when_healthy, None
            self._send_reload(inst, f"{cause} (while coredns was starting)")

    def _fail(self, inst: Instance, cause: str, label: str) -> None:
        """CoreDNS is gone or useless: host traffic back to kube-dns now (unless a twin still serves),
        restart after a backoff."""
        twin_serves = any(i.state is CoreDnsState.RUNNING for i in self.instances if i is not inst)
        if self.settings.host_failover and not twin_serves:
            self.network.set_host_rules(False)
        self._stop_prober(inst)
        self.metrics.coredns_restarts.labels(label).inc()
        if (
            inst.healthy_since is not None
            and self.clock() - inst.healthy_since >= self.timing.backoff_reset_after
        ):
            inst.failures = 0
        inst.healthy_since = None
        self._backoff(inst, cause, label)

    def _kill_and_fail(self, inst: Instance, cause: str, label: str) -> None:
        self._fail(inst, cause, label)
        if inst.child is not None:
            inst.child.kill_group()

    def _backoff(self, inst: Instance, cause: str, label: str, count: bool = True) -> None:
        if count:
            inst.failures += 1
        delay = min(self.timing.backoff_max, self.timing.backoff_base * 2 ** max(0, inst.failures - 1))
        inst.start_deadline = None
        inst.restart_delay = delay
        inst.restart_at = self.clock() + delay
        self._set_state(inst, CoreDnsState.BACKOFF, f"{cause}; restarting in {delay:.2f}s")
        if label == "start_failed" and count:
            self.metrics.coredns_restarts.labels(label).inc()

    @staticmethod
    def _stop_prober(inst: Instance) -> None:
        if inst.prober is not None:
            inst.prober.stop()
            inst.prober = None

    @staticmethod
    def _last_output(inst: Instance) -> str:
        if inst.child is not None and inst.child.recent_output:
            return f" (last output: {inst.child.recent_output[-1]})"
        return ""

    # Configuration ----------------------------------------------------------------------------------
    def _render(self, cause: str) -> bool:
        """Render and write the Corefile; True when it changed. Bad input keeps the last good Corefile."""
        try:
            text = self.corefile.render(self.api_data)
        except ConfigError as exc:
            self.metrics.setup_errors.labels("configmap").inc()
            self.metrics.corefile_renders.labels("invalid").inc()
            log.error("configuration rejected", cause=cause, error=str(exc), keeping="the last good Corefile")
            return False
        if text == self.corefile_text:
            self.metrics.corefile_renders.labels("unchanged").inc()
            return False
        try:
            self.corefile.write(text)
        except OSError as exc:
            self.metrics.corefile_renders.labels("unwritable").inc()
            log.error("corefile not written", cause=cause, path=str(self.settings.corefile),
                      error=f"{exc.strerror or exc}", keeping="the last good Corefile")  # fmt: skip
            return False
        previous, self.corefile_text = self.corefile_text, text
        self.metrics.corefile_renders.labels("changed").inc()
        log.info("corefile written", cause=cause, first=previous is None)
        return True

    def _apply_config(self, cause: str, *, force: bool = False) -> None:
        previous = self.corefile_text
        changed = self._render(cause)
        if previous is None:
            for inst in self.instances:
                if self.corefile_text is not None and inst.state is CoreDnsState.BACKOFF:
                    inst.restart_at = self.clock()  # the first valid Corefile: start now
            return
        if not changed and not force:
            return
        for inst in self.instances:
            if inst.child is None or inst.state is CoreDnsState.BACKOFF:
                continue  # the next launch reads the file as it is now
            if inst.state is CoreDnsState.STARTING:
                # It may have read the file before this write: reload once it answers, not while it binds.
                inst.reload_when_healthy = cause
                continue
            self._send_reload(inst, cause, previous)

    def _send_reload(self, inst: Instance, cause: str, previous: str | None = None) -> None:
        assert inst.child is not None
        # A reload still pending keeps the Corefile that was last confirmed as the one to fall back to.
        confirmed = inst.reload.previous if inst.reload is not None else previous or self.corefile_text
        assert confirmed is not None
        inst.reload = _Reload(inst.child.pid, self.clock() + self.timing.reload_timeout, confirmed)
        inst.child.signal(signal.SIGUSR1)
        log.info("coredns reload requested", cause=cause, **self._which(inst))

    def _forget_reload(self, inst: Instance, why: str) -> None:
        """A reload in flight belongs to its child: once the child is gone, the next one reads the current
        file at start, so the reload is neither confirmed nor failed."""
        if inst.reload is not None:
            log.info("coredns reload dropped", cause=why, pid=inst.reload.pid)
            inst.reload = None

    def _reload_failed(self, inst: Instance, why: str) -> None:
        assert inst.reload is not None
        previous, inst.reload = inst.reload.previous, None
        self.metrics.reloads.labels("failed").inc()
        self.retry_render_at = self.clock() + self.timing.reload_retry
        log.error("coredns reload failed", cause=why, keeping="the previous Corefile",
                  retry_in=self.timing.reload_retry, **self._which(inst))  # fmt: skip
        # CoreDNS keeps serving the old configuration; put the old file back so a restart uses it too.
        try:
            self.corefile.write(previous)
        except OSError as exc:
            log.error(
                "corefile not restored", path=str(self.settings.corefile), error=f"{exc.strerror or exc}"
            )
            return
        self.corefile_text = previous

    # Networking -------------------------------------------------------------------------------------
    def _reconcile(self, cause: str) -> None:
        changes = self.network.reconcile()
        if changes:  # the packet filter and the interface count what they restored
            self.probe_path_repaired_at = time.monotonic()
            log.warning("network restored", cause=cause, changes=changes)
        if self._update_serving():  # a state change logs it with the state; this is the rules' own change
            log.info("serving" if self.serving else "not serving", cause=f"rules checked ({cause})")
            self._publish()

    # Status -----------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._check_threads()
        self._write_status()
        self.notifier.watchdog()
        memories = [m for i in self.instances if i.child is not None and (m := i.child.memory()) is not None]
        if memories:
            self.peak_rss = max(self.peak_rss, sum(peak for _, peak in memories))
            self.metrics.coredns_rss.set(sum(resident for resident, _ in memories))
            self.metrics.coredns_peak_rss.set(self.peak_rss)

    def _check_threads(self) -> None:
        """A background thread that died is noticed here. The prober belongs to one child and starts again;
        a dead watcher means missed changes for good, so the agent fails (the run's boundary shuts down
        cleanly and exits non-zero) rather than limp on."""
        for inst in self.instances:
            if inst.prober is not None and not inst.prober.alive:
                log.error("prober restarted", cause="its thread died",
                          pid=inst.child.pid if inst.child else None, **self._which(inst))  # fmt: skip
                self.metrics.thread_restarts.labels("prober").inc()
                self._start_prober(inst)
        for what, alive in (
            ("network", self.network.watchers_alive),
            ("config", self.corefile.watchers_alive),
        ):
            if not alive():
                raise ThreadDiedError(f"a {what} watcher thread died")

    def _healthy_for(self) -> float:
        """Seconds since CoreDNS last became healthy, at scrape time; 0 while it is not (twins: the longest
        a running one has been)."""
        now = self.clock()
        since = [i.healthy_since for i in self.instances if i.healthy_since is not None and i.state.serving]
        return now - min(since) if since else 0.0

    def _write_status(self) -> None:
        status = Status(
            pid=os.getpid(),
            heartbeat=time.monotonic(),
            state=str(self.state),
            serving=self.serving,
            detail=self.cause,
            shutting_down_since=self.shutting_down_since,
        )
        try:
            write_status(self.settings.status_file, status)
        except OSError as exc:
            log.error("status file not written", path=str(self.settings.status_file), error=str(exc))

    # Shutdown ---------------------------------------------------------------------------------------
    def shutdown(self) -> int:
        """DNS handed back to kube-dns while CoreDNS still answers, then CoreDNS stopped, then the interface
        removed, then the watchers: all within the budget. Removing the rules before stopping CoreDNS (not
        after) means no query is caught in a closing socket: new queries already go to kube-dns, those on
        their way get answered. Each step runs even if an earlier one failed."""
        # Deadlines handed to the network are real monotonic time (a lock wait is real), as is the status.
        started = self.shutting_down_since = time.monotonic()
        deadline = started + self.timing.shutdown_budget
        cause = self.stop.reason or "shutdown"
        self.stop.request(cause)  # operations other than the shutdown's own now fail at once
        log.info("agent stopping", cause=cause)
        self._run_steps([("announce", lambda: self._stopping(cause)), ("probers", self._stop_probers)])
        # Another agent on the node (a surge upgrade) keeps the rules and the interface: only the last agent
        # out removes them. Its CoreDNS shares the sockets, so stopping ours loses no query.
        with self.network.leaving(self._left(deadline, self.timing.shutdown_budget / 2)) as last:
            teardown = last and not self.settings.skip_teardown
            steps: list[tuple[str, Callable[[], None]]] = []
            if teardown:
                steps += [
                    ("rules", lambda: self.network.remove_rules(deadline)),
                    ("drain", lambda: self._drain(deadline)),
                ]
            elif last:
                steps += [("host rules", lambda: self.network.remove_host_rules(deadline))]
            else:
                steps += [("handover", lambda: self._await_other_coredns(deadline))]
            steps.append(("coredns", lambda: self._stop_coredns(deadline)))
            if teardown:
                steps.append(("interface", self.network.remove_interface))
            self._run_steps(steps)
        self._run_steps([
            ("config watchers", lambda: self.corefile.stop_watchers(self._left(deadline, 1.0))),
            ("network watchers", lambda: self.network.stop_watchers(self._left(deadline, 1.0))),
        ])  # fmt: skip
        if last and self.settings.skip_teardown:
            log.info("networking left in place", cause="-skipteardown")
        for inst in self.instances:
            inst.state, inst.cause = CoreDnsState.STOPPED, cause
        self.state, self.cause = CoreDnsState.STOPPED, cause
        log.info("agent stopped", seconds=round(time.monotonic() - started, 3))
        return 0

    def _run_steps(self, steps: Sequence[tuple[str, Callable[[], None]]]) -> None:
        """Each step runs even if an earlier one failed."""
        for name, action in steps:
            # The rules get a second try: rules left pointing at a stopped CoreDNS are the one leftover
            # that costs DNS (pods are safe behind the kernel gate; the node's own queries are not).
            for attempt in (1, 2) if name in ("rules", "host rules") else (1,):
                try:
                    action()
                    break
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.error("shutdown step failed", step=name, attempt=attempt, error=error,
                              traceback=traceback.format_exc())  # fmt: skip

    @staticmethod
    def _left(deadline: float, at_most: float) -> float:
        return min(at_most, max(0.0, deadline - time.monotonic()))

    def _stopping(self, cause: str) -> None:
        self.notifier.stopping()
        for inst in self.instances:
            self._set_state(inst, CoreDnsState.STOPPING, cause)

    def _stop_probers(self) -> None:
        for inst in self.instances:
            self._stop_prober(inst)

    def _drain(self, deadline: float) -> None:
        self.sleep(self._left(deadline, self.timing.drain))

    def _stop_coredns(self, deadline: float) -> None:
        """Every instance at once: SIGTERM to all, then each waited for within the grace."""
        children = [inst.child for inst in self.instances if inst.child is not None]
        for child in children:
            child.signal(signal.SIGTERM)
        for child in children:
            if child.wait(timeout=self._left(deadline, self.timing.stop_grace)) is None:
                log.warning("coredns did not stop in time, killing it", grace=self.timing.stop_grace,
                            pid=child.pid)  # fmt: skip
                child.kill_group()
                child.wait(timeout=1.0)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ThreadDiedError(RuntimeError):
    """A background thread the agent depends on is gone."""
