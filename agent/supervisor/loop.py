"""The supervisor: the one owner of all state and all side effects.

Threads (the CoreDNS waiter and output pump, the prober, the file/API/netlink watchers, signal handlers) only
post events to one queue; the main thread takes them one at a time, changes state, and acts. Each CoreDNS
instance is a :class:`~agent.supervisor.slot.Slot` whose state changes only through its table of allowed
transitions, every change logged once with its cause. Every time is read from one injected clock (the
production clock is ``time.monotonic()``); tests drive the timers through :meth:`Supervisor.tick`. Each
cycle returns one sentence, the node's state in words, which is also the status file's ``detail``.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from agent.children import describe_returncode
from agent.coredns.cgroup import Cgroup
from agent.coredns.process import CoreDnsStartError
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
    Verdict,
)
from agent.health.probe import Prober, ProbeSettings
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.observe.sdnotify import NullNotifier
from agent.observe.status import Status, write_status
from agent.settings import ConfigError, Settings
from agent.stopflag import StopFlag
from agent.supervisor.reload import Reloads
from agent.supervisor.seams import CorefileSource, Launcher, Network, Notifier, ProberFactory
from agent.supervisor.shutdown import Shutdown
from agent.supervisor.slot import Slot
from agent.supervisor.states import CoreDnsState
from agent.supervisor.timing import Timing

log = get_logger("supervisor")

# Signals: the first group stops the agent (SIGQUIT too, as node-cache does: Python's default would dump
# core and leave the rules); the second re-renders the Corefile and reloads CoreDNS (SIGUSR1 even when
# nothing changed, as node-cache's CoreDNS does on SIGUSR1).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
# Exit status after an unexpected error: non-zero so that the kubelet or systemd restarts the agent.
EXIT_FAILED = 1
# The probe verdicts that count toward a hang only once CoreDNS runs: while it starts, not being bound yet
# is normal (and harmless: pod queries go to kube-dns through the closed gate).
_FAILED_WHILE_RUNNING = (Verdict.NOT_LISTENING, Verdict.PROBE_ERROR, Verdict.HEALTH_ENDPOINT_FAILED)


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
    # Every time the supervisor reads, and every wait of its own, goes through these; tests drive them.
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    # The node's view: the best of the instances' states (RUNNING while any twin runs), with its cause.
    state: CoreDnsState = field(default=CoreDnsState.STOPPED, init=False)
    cause: str = field(default="not started", init=False)
    serving: bool = field(default=False, init=False)  # RUNNING and the rules verified in place
    instances: list[Slot] = field(init=False)
    reloads: Reloads = field(init=False)
    corefile_text: str | None = field(default=None, init=False)
    api_data: Mapping[str, str] | None = field(default=None, init=False)
    shutting_down_since: float | None = field(default=None, init=False)
    ever_ready: bool = field(default=False, init=False)
    peak_rss: int = field(default=0, init=False)  # bytes, across every CoreDNS child
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue, init=False)
    # When the reconcile last put missing rules back: failed probes made before it are discounted.
    probe_path_repaired_at: float = field(default=0.0, init=False)
    _next_reconcile: float = field(default=0.0, init=False)
    _next_heartbeat: float = field(default=0.0, init=False)
    _next_rerender: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        twins = self.settings.coredns_instances > 1
        self.instances = [Slot(i, twins=twins) for i in range(self.settings.coredns_instances)]
        self.reloads = Reloads(self.corefile, self.settings.corefile, self.metrics, self.timing, self.clock)

    @property
    def stop_requested(self) -> str | None:
        return self.stop.reason

    @property
    def sentence(self) -> str:
        """The node's state in one sentence, as the status file's ``detail`` carries it and each cycle
        returns it: the cause of the last state change (twins: how many run, and why the others do not)."""
        return self.cause

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
                self.step(self.wait_time())
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
        """Join the node, interface up, Corefile rendered, CoreDNS launched; rules follow once healthy."""
        log.info("agent starting", local_ips=[str(ip) for ip in self.settings.local_ips],
                 coredns_instances=len(self.instances))  # fmt: skip
        self.metrics.healthy_since.set_function(self._healthy_for)
        self.network.join_node()
        changes = self.network.setup_interface()
        if changes:
            log.info("interface set up", changes=changes)
        self.network.prepare_rules()
        self._render("start")
        self._next_rerender = self.clock() + self.timing.rerender
        self.corefile.start_watchers(self.post)
        self.network.start_watchers(self.post)
        for slot in self.instances:
            self._launch(slot, "start")

    def step(self, timeout: float) -> str:
        """One loop cycle: at most one event (waiting up to ``timeout``), then the timers. Returns the
        cycle's sentence (see :attr:`sentence`)."""
        try:
            event: Event | None = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = None
        if event is not None:
            self.handle(event)
        return self.tick(self.clock())

    def tick(self, now: float) -> str:
        """Run every timer due at ``now`` (on the supervisor's clock): restarts, start timeouts, reload
        timeouts and retries, the periodic reconcile and re-render, the heartbeat. Returns the sentence."""
        for slot in self.instances:
            self._slot_timers(slot, now)
        if self.reloads.retry_due(now):
            self._apply_config("retry after a failed reload")
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.settings.sync_interval
            self._reconcile("periodic check")
        if self._next_rerender is not None and now >= self._next_rerender:
            self._next_rerender = now + self.timing.rerender
            self._apply_config("periodic re-render")
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.timing.heartbeat
            self._heartbeat()
        return self.sentence

    def wait_time(self) -> float:
        """How long the loop may wait for an event before a timer is due."""
        now = self.clock()
        deadlines = [self._next_reconcile, self._next_heartbeat]
        for deadline in (self._next_rerender, self.reloads.retry_at):
            if deadline is not None:
                deadlines.append(deadline)
        for slot in self.instances:
            for d in (slot.restart_at, slot.start_deadline):
                if d is not None:
                    deadlines.append(d)
            if slot.reload is not None:
                deadlines.append(slot.reload.deadline)
        return max(0.0, min(deadlines) - now)

    def _slot_of(self, pid: int) -> Slot | None:
        """The slot whose current child ``pid`` is; None for an earlier child already given up on."""
        return next((slot for slot in self.instances if slot.owns(pid)), None)

    def _slot_timers(self, slot: Slot, now: float) -> None:
        if slot.restart_at is not None and now >= slot.restart_at and slot.state is CoreDnsState.BACKOFF:
            self._launch(slot, f"restart after {slot.cause}")
        if (
            slot.start_deadline is not None
            and now >= slot.start_deadline
            and slot.state is CoreDnsState.STARTING
        ):
            self._kill_and_fail(
                slot,
                f"not answering on every local address {self.timing.start_timeout:.0f}s after launch"
                + slot.last_output(),
                "unhealthy",
            )
        self._restored(self.reloads.expire(slot, now))

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
        slot = self._slot_of(pid)
        if slot is None or slot.child is None:
            return  # an earlier child we already gave up on
        how = describe_returncode(returncode)
        self.reloads.forget(slot, "coredns exited")
        if slot.state is CoreDnsState.STOPPING:
            log.info("coredns stopped", pid=pid, how=how, **slot.which)
            return
        if slot.state is CoreDnsState.BACKOFF:
            return  # we killed it (hang or start timeout) and already said why
        cause, label = how, "exited" if returncode >= 0 else "signaled"
        if self._oom_killed(slot, returncode):
            cause, label = f"OOM-killed ({how}; the memory cgroup counted an oom_kill)", "oom"
        elif returncode > 0 and slot.child.recent_output:
            cause = f"{how}: {slot.child.recent_output[-1]}"
        self._fail(slot, cause, label)

    def _on_child_stopped(self, pid: int, signum: int) -> None:
        """A stopped CoreDNS answers nothing while its sockets hold the kernel gate open: a hang, known from
        the kernel at once rather than from three silent probe rounds."""
        slot = self._slot_of(pid)
        if slot is not None and slot.state in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            self._kill_and_fail(slot, f"hung: stopped by {_signal_name(signum)}", "hang")

    def _oom_killed(self, slot: Slot, returncode: int) -> bool:
        if returncode != -signal.SIGKILL or self.cgroup is None:
            return False
        kills = self.cgroup.oom_kills()
        return kills is not None and kills > (slot.oom_kills_at_start or 0)

    def _on_probe(self, result: ProbeResult) -> None:
        """The prober's verdict, mapped to what it means for this slot."""
        slot = self._slot_of(result.pid)
        if slot is None:
            return
        self.metrics.probe_latency.observe(result.latency)
        verdict = result.verdict
        if verdict is Verdict.HEALTHY:
            slot.probe_failures = slot.wrong_answers = 0
            # Answered, but by whom? Another agent's CoreDNS on the same sockets answers too (a surge
            # upgrade): this one is healthy once its own listeners are bound as well.
            if slot.state is CoreDnsState.STARTING and self._child_listening(slot):
                self._became_healthy(slot)
            return
        self.metrics.probe_failures.labels(verdict.endpoint).inc()
        if 0 < result.at <= self.probe_path_repaired_at:
            return  # made while the agent's rules were missing (a flush): it says nothing about CoreDNS
        if verdict is Verdict.WRONG_ANSWER:
            # The probe went elsewhere (its rule gone, kube-proxy sending it to kube-dns). Killing CoreDNS
            # would not mend that; the rules back do.
            slot.wrong_answers += 1
            if slot.wrong_answers == 1:
                log.warning("probe answered by something else", detail=result.detail, **slot.which,
                            cause="the probe's path, not coredns: checking the rules")  # fmt: skip
            self._reconcile("a probe answered by something other than the local coredns")
            return
        if verdict.busy:
            # A burst it is working through, not a hang. Killing it would empty the cache and send the
            # burst to kube-dns.
            if slot.probe_failures:
                log.warning("coredns busy, not hung", detail=result.detail, state=str(slot.state),
                            **slot.which)  # fmt: skip
            slot.probe_failures = 0
            return
        if slot.state is CoreDnsState.STARTING and verdict in _FAILED_WHILE_RUNNING:
            return  # while starting only silence counts: a bound CoreDNS that does not answer loses queries
        if slot.state not in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            return
        if verdict is Verdict.STALLED and slot.state is CoreDnsState.RUNNING:
            # The kernel confirmed it within the round: waiting for more silent rounds would only lose the
            # queries it swallows meanwhile.
            self._kill_and_fail(slot, f"hung: {result.detail}", "hang")
            return
        slot.probe_failures += 1
        if slot.probe_failures == 1:
            log.warning("coredns probe failed", detail=result.detail, state=str(slot.state),
                        **slot.which)  # fmt: skip
        if slot.probe_failures >= self.timing.hang_after_failures:
            cause = f"hung: {slot.probe_failures} probe rounds failed ({result.detail})"
            self._kill_and_fail(slot, cause, "hang")

    def _on_child_output(self, pid: int, line: str) -> None:
        slot = next((s for s in self.instances if s.reload is not None and s.reload.pid == pid), None)
        if slot is not None:
            self._restored(self.reloads.on_output(slot, line))

    # Actions ----------------------------------------------------------------------------------------
    def _set_state(self, slot: Slot, state: CoreDnsState, cause: str) -> None:
        """The one way a slot's state changes while the agent runs: checked against the slot's table,
        logged once with its cause, published."""
        before = slot.change_state(state, cause)
        if before is None:
            return
        self.state, self.cause = self._summary()
        for each in CoreDnsState:
            self.metrics.coredns_state.labels(str(each)).set(sum(s.state is each for s in self.instances))
        self._update_serving()
        node = {"node": self.sentence} if slot.twins else {}  # one instance: the sentence is its cause
        log.info("coredns state", **{"from": str(before), "to": str(state)}, cause=cause,
                 serving=self.serving, **slot.which, **node)  # fmt: skip
        self._publish()

    def _summary(self) -> tuple[CoreDnsState, str]:
        """The node's state: the best any instance is in (RUNNING while one twin runs) and why."""
        if len(self.instances) == 1:
            return self.instances[0].state, self.instances[0].cause
        order = (CoreDnsState.RUNNING, CoreDnsState.STARTING, CoreDnsState.BACKOFF, CoreDnsState.STOPPING)
        states = {slot.state for slot in self.instances}
        best = next((state for state in order if state in states), CoreDnsState.STOPPED)
        causes = {slot.cause for slot in self.instances}
        if len(states) == 1 and len(causes) == 1:
            return best, causes.pop()
        running = sum(slot.state is CoreDnsState.RUNNING for slot in self.instances)
        others = "; ".join(
            f"instance {s.index} {s.state}: {s.cause}" for s in self.instances if s.state is not best
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

    def _launch(self, slot: Slot, cause: str) -> None:
        slot.restart_at = None
        if slot.child is not None:
            slot.child.kill_group()
            slot.child.wait(timeout=2.0)
        self.reloads.forget(slot, "coredns replaced")
        slot.forget_child()
        if self.corefile_text is None:
            self._backoff(slot, "no valid Corefile yet: fix the template or ConfigMap", "start_failed", False)
            return
        slot.oom_kills_at_start = self.cgroup.oom_kills() if self.cgroup else None
        child = self.launcher(self.post, slot.index)
        try:
            pid = child.start()
        except CoreDnsStartError as exc:
            self._backoff(slot, str(exc), "start_failed")
            return
        slot.child = child
        slot.start_deadline = self.clock() + self.timing.start_timeout
        self._start_prober(slot)
        self._set_state(slot, CoreDnsState.STARTING, f"{cause}: launched pid {pid}")

    def _start_prober(self, slot: Slot) -> None:
        assert slot.child is not None
        slot.prober = self.prober_factory(self._probe_for(slot), slot.child.pid, self.post)
        slot.prober.start()

    def _probe_for(self, slot: Slot) -> ProbeSettings:
        """What the slot's prober asks. One CoreDNS: the probe zone on every local address (the node's
        data path) and /health. Twins share those sockets, and the kernel hands a probe to any of them, so
        each twin is asked on its own port (``--coredns-probe-port`` + its number, on the link-local
        address), where only it answers."""
        if len(self.instances) == 1:
            return replace(self.probe_settings, health_url=self.health_url())
        return replace(
            self.probe_settings,
            addresses=(self.settings.twin_probe_address(),),
            port=self.settings.coredns_probe_port + slot.index,
            mark=None,
            health_url=None,
            watch_addresses=self.probe_settings.addresses,  # the pods' queries wait on the shared sockets
            watch_port=self.probe_settings.port,
        )

    def _child_listening(self, slot: Slot) -> bool:
        assert slot.child is not None
        return slot.child.listening(self.settings.require_local_ips(), self.settings.dns_port)

    def _became_healthy(self, slot: Slot) -> None:
        slot.start_deadline = None
        slot.healthy_since = self.clock()
        self.network.install_rules(host_rules=True)
        self._set_state(slot, CoreDnsState.RUNNING, "answering on every local address")
        if slot.reload_when_healthy is not None:
            cause, slot.reload_when_healthy = slot.reload_when_healthy, None
            self._send_reload(slot, f"{cause} (while coredns was starting)")

    def _fail(self, slot: Slot, cause: str, label: str) -> None:
        """CoreDNS is gone or useless: host traffic back to kube-dns now (unless a twin still serves),
        restart after a backoff."""
        twin_serves = any(s.state is CoreDnsState.RUNNING for s in self.instances if s is not slot)
        if not twin_serves:
            self.network.set_host_rules(False)
        slot.stop_prober()
        self.metrics.coredns_restarts.labels(label).inc()
        slot.forgive(self.clock(), self.timing)
        self._backoff(slot, cause, label)

    def _kill_and_fail(self, slot: Slot, cause: str, label: str) -> None:
        self._fail(slot, cause, label)
        if slot.child is not None:
            slot.child.kill_group()

    def _backoff(self, slot: Slot, cause: str, label: str, count: bool = True) -> None:
        delay = slot.schedule_restart(self.clock(), self.timing, count=count)
        self._set_state(slot, CoreDnsState.BACKOFF, f"{cause}; restarting in {delay:.2f}s")
        if label == "start_failed" and count:
            self.metrics.coredns_restarts.labels(label).inc()

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
            for slot in self.instances:
                if self.corefile_text is not None and slot.state is CoreDnsState.BACKOFF:
                    slot.restart_at = self.clock()  # the first valid Corefile: start now
            return
        if not changed and not force:
            return
        for slot in self.instances:
            if slot.child is None or slot.state is CoreDnsState.BACKOFF:
                continue  # the next launch reads the file as it is now
            if slot.state is CoreDnsState.STARTING:
                # It may have read the file before this write: reload once it answers, not while it binds.
                slot.reload_when_healthy = cause
                continue
            self._send_reload(slot, cause, previous)

    def _send_reload(self, slot: Slot, cause: str, previous: str | None = None) -> None:
        confirmed = previous or self.corefile_text
        assert confirmed is not None
        self.reloads.send(slot, cause, confirmed)

    def _restored(self, text: str | None) -> None:
        """A failed reload wrote the previous Corefile back: it is the current one again."""
        if text is not None:
            self.corefile_text = text

    # Networking -------------------------------------------------------------------------------------
    def _reconcile(self, cause: str) -> None:
        changes = self.network.reconcile()
        if changes:  # the packet filter and the interface count what they restored
            self.probe_path_repaired_at = self.clock()
            log.warning("network restored", cause=cause, changes=changes)
        if self._update_serving():  # a state change logs it with the state; this is the rules' own change
            log.info("serving" if self.serving else "not serving", cause=f"rules checked ({cause})")
            self._publish()

    # Status -----------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._check_threads()
        self._write_status()
        self.notifier.watchdog()
        memories = [m for s in self.instances if s.child is not None and (m := s.child.memory()) is not None]
        if memories:
            self.peak_rss = max(self.peak_rss, sum(peak for _, peak in memories))
            self.metrics.coredns_rss.set(sum(resident for resident, _ in memories))
            self.metrics.coredns_peak_rss.set(self.peak_rss)

    def _check_threads(self) -> None:
        """A background thread that died is noticed here. The prober belongs to one child and starts again;
        a dead watcher means missed changes for good, so the agent fails (the run's boundary shuts down
        cleanly and exits non-zero) rather than limp on."""
        for slot in self.instances:
            if slot.prober is not None and not slot.prober.alive:
                log.error("prober restarted", cause="its thread died",
                          pid=slot.child.pid if slot.child else None, **slot.which)  # fmt: skip
                self.metrics.thread_restarts.labels("prober").inc()
                self._start_prober(slot)
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
        since = [s.healthy_since for s in self.instances if s.healthy_since is not None and s.state.serving]
        return now - min(since) if since else 0.0

    def _write_status(self) -> None:
        # The heartbeat is compared by ``agent --check`` with time.monotonic(): the production clock.
        status = Status(
            pid=os.getpid(),
            heartbeat=self.clock(),
            state=str(self.state),
            serving=self.serving,
            detail=self.sentence,
            shutting_down_since=self.shutting_down_since,
        )
        try:
            write_status(self.settings.status_file, status)
        except OSError as exc:
            log.error("status file not written", path=str(self.settings.status_file), error=str(exc))

    # Shutdown ---------------------------------------------------------------------------------------
    def shutdown(self) -> int:
        """The budgeted shutdown (agent.supervisor.shutdown): the probers stopped, the node handed back to
        kube-dns or to another agent, CoreDNS stopped, the watchers last. Returns the exit status."""
        started = self.shutting_down_since = self.clock()
        cause = self.stop.reason or "shutdown"
        self.stop.request(cause)  # operations other than the shutdown's own now fail at once
        log.info("agent stopping", cause=cause)
        children = [slot.child for slot in self.instances if slot.child is not None]
        Shutdown(
            self.settings, self.timing, self.network, self.corefile, children, self.clock, self.sleep
        ).run(first=[("announce", lambda: self._stopping(cause)), ("probers", self._stop_probers)])
        for slot in self.instances:
            slot.stopped(cause)
        self.state, self.cause = CoreDnsState.STOPPED, cause
        log.info("agent stopped", seconds=round(self.clock() - started, 3))
        return 0

    def _stopping(self, cause: str) -> None:
        self.notifier.stopping()
        for slot in self.instances:
            self._set_state(slot, CoreDnsState.STOPPING, cause)

    def _stop_probers(self) -> None:
        for slot in self.instances:
            slot.stop_prober()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ThreadDiedError(RuntimeError):
    """A background thread the agent depends on is gone."""
