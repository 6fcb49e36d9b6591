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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from agent.cgroup import Cgroup
from agent.config import ConfigError, Settings
from agent.coredns import RELOAD_DONE, CoreDnsProcess, CoreDnsStartError, describe_returncode
from agent.events import (
    ApiConfigMap,
    ChildExited,
    ChildOutput,
    ConfigChanged,
    Event,
    NetworkChanged,
    ProbeResult,
    Signal,
)
from agent.health import Prober, ProbeSettings
from agent.logs import get_logger
from agent.metrics import Metrics
from agent.states import CoreDnsState
from agent.status import Status, write_status

log = get_logger("supervisor")


class Network(Protocol):
    """The node's networking as the supervisor drives it (interface, rules, their watchers)."""

    def remove_leftovers(self) -> None: ...
    def setup_interface(self) -> list[str]: ...
    def prepare_rules(self) -> None: ...
    def install_rules(self, host_rules: bool) -> None: ...
    def set_host_rules(self, enabled: bool) -> None: ...
    def reconcile(self) -> list[str]: ...
    def remove_rules(self, deadline: float) -> None: ...
    def remove_interface(self) -> None: ...
    def interrupt(self) -> None: ...
    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def stop_watchers(self) -> None: ...


class CorefileSource(Protocol):
    """Renders the Corefile from the current inputs; raises ConfigError naming the bad input."""

    def render(self, api_data: Mapping[str, str] | None) -> str: ...
    def write(self, text: str) -> bool: ...
    def start_watchers(self, post: Callable[[Event], None]) -> None: ...
    def stop_watchers(self) -> None: ...


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


Launcher = Callable[[Callable[[Event], None]], CoreDnsProcess]
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
    # How often the status file, the watchdog and the memory gauges are refreshed: far inside the liveness
    # check's 10 s and systemd's 30 s watchdog, and cheap enough for the idle budget.
    heartbeat: float = 2.0
    # The inputs are rendered again this often even without a change notification (a resolv.conf edit, a
    # missed event); an unchanged render costs about a millisecond and changes nothing.
    rerender: float = 30.0


@dataclass
class _Reload:
    deadline: float
    previous: str


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

    state: CoreDnsState = field(default=CoreDnsState.STOPPED, init=False)
    cause: str = field(default="not started", init=False)
    child: CoreDnsProcess | None = field(default=None, init=False)
    prober: ProberLike | None = field(default=None, init=False)
    rules_installed: bool = field(default=False, init=False)
    host_rules: bool = field(default=False, init=False)
    failures: int = field(default=0, init=False)
    probe_failures: int = field(default=0, init=False)
    restart_at: float | None = field(default=None, init=False)
    restart_delay: float = field(default=0.0, init=False)
    start_deadline: float | None = field(default=None, init=False)
    healthy_since: float | None = field(default=None, init=False)
    corefile_text: str | None = field(default=None, init=False)
    api_data: Mapping[str, str] | None = field(default=None, init=False)
    reload: _Reload | None = field(default=None, init=False)
    retry_render_at: float | None = field(default=None, init=False)
    stop_requested: str | None = field(default=None, init=False)
    shutting_down_since: float | None = field(default=None, init=False)
    oom_kills_at_start: int | None = field(default=None, init=False)
    ever_ready: bool = field(default=False, init=False)
    peak_rss: int = field(default=0, init=False)  # bytes, across every CoreDNS child
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue, init=False)
    _next_reconcile: float = field(default=0.0, init=False)
    _next_heartbeat: float = field(default=0.0, init=False)
    _next_rerender: float = field(default=0.0, init=False)

    # Posting (any thread; SimpleQueue.put is reentrant, so signal handlers may call it) ------------------
    def post(self, event: Event) -> None:
        self.events.put(event)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            self.network.interrupt()  # a lock wait in progress must not delay the shutdown
            self.post(Signal(signum))

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda signum, _frame: self.post(Signal(signum)))

    # The loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        while self.stop_requested is None:
            self.step(self._wait_time())
        return self.shutdown()

    def start(self) -> None:
        """Leftovers out, interface up, Corefile rendered, CoreDNS launched; rules follow once healthy."""
        log.info("agent starting", local_ips=[str(ip) for ip in self.settings.local_ips])
        self.metrics.healthy_since.set_function(self._healthy_for)
        self.network.remove_leftovers()
        changes = self.network.setup_interface()
        if changes:
            log.info("interface set up", changes=changes)
        self.network.prepare_rules()
        self._render("start")
        self.corefile.start_watchers(self.post)
        self.network.start_watchers(self.post)
        self._launch("start")

    def step(self, timeout: float) -> None:
        """Handle at most one event (waiting up to ``timeout``), then the timers. One loop cycle."""
        try:
            event: Event | None = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = None
        if event is not None:
            self.handle(event)
        self._timers(time.monotonic())

    def _wait_time(self) -> float:
        now = time.monotonic()
        deadlines = [self._next_reconcile, self._next_heartbeat, self._next_rerender]
        for d in (self.restart_at, self.start_deadline, self.retry_render_at):
            if d is not None:
                deadlines.append(d)
        if self.reload is not None:
            deadlines.append(self.reload.deadline)
        return max(0.0, min(deadlines) - now)

    # Events -----------------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        match event:
            case ChildExited(pid=pid, returncode=returncode):
                self._on_child_exit(pid, returncode)
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
                if signum == signal.SIGHUP:
                    self._apply_config("SIGHUP")
                else:
                    self.stop_requested = f"received {name}"

    def _on_child_exit(self, pid: int, returncode: int) -> None:
        if self.child is None or pid != self.child.pid:
            return  # an earlier child we already gave up on
        how = describe_returncode(returncode)
        if self.state is CoreDnsState.STOPPING:
            log.info("coredns stopped", pid=pid, how=how)
            return
        if self.state is CoreDnsState.BACKOFF:
            return  # we killed it (hang or start timeout) and already said why
        cause, label = how, "exited" if returncode >= 0 else "signaled"
        if self._oom_killed(returncode):
            cause, label = f"OOM-killed ({how}; the memory cgroup counted an oom_kill)", "oom"
        elif returncode > 0 and self.child.recent_output:
            cause = f"{how}: {self.child.recent_output[-1]}"
        self._fail(cause, label)

    def _oom_killed(self, returncode: int) -> bool:
        if returncode != -signal.SIGKILL or self.cgroup is None:
            return False
        kills = self.cgroup.oom_kills()
        return kills is not None and kills > (self.oom_kills_at_start or 0)

    def _on_probe(self, result: ProbeResult) -> None:
        if self.child is None or result.pid != self.child.pid:
            return
        self.metrics.probe_latency.observe(result.latency)
        if result.ok:
            self.probe_failures = 0
            if self.state is CoreDnsState.STARTING:
                self._became_healthy()
            return
        self.metrics.probe_failures.labels("health" if "/health" in result.detail else "dns").inc()
        # While starting, only silence counts: CoreDNS not bound yet is normal (and harmless: pod queries go
        # to kube-dns), but a bound CoreDNS that does not answer swallows pod queries through the open gate.
        if self.state is CoreDnsState.STARTING and not result.silent:
            return
        if self.state not in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            return
        self.probe_failures += 1
        if self.probe_failures == 1:
            log.warning("coredns probe failed", detail=result.detail, state=str(self.state))
        if self.probe_failures >= self.timing.hang_after_failures:
            self._kill_and_fail(f"hung: {self.probe_failures} probe rounds failed ({result.detail})", "hang")

    def _on_child_output(self, pid: int, line: str) -> None:
        if self.reload is None or self.child is None or pid != self.child.pid:
            return
        if RELOAD_DONE in line:
            self.reload = None
            self.metrics.reloads.labels("ok").inc()
            log.info("coredns reloaded", cause="SIGUSR1 reload confirmed by coredns")
        else:
            self._reload_failed(line)

    # Timers -----------------------------------------------------------------------------------------
    def _timers(self, now: float) -> None:
        if self.restart_at is not None and now >= self.restart_at and self.state is CoreDnsState.BACKOFF:
            self._launch(f"restart after {self.cause}")
        if (
            self.start_deadline is not None
            and now >= self.start_deadline
            and self.state is CoreDnsState.STARTING
        ):
            self._kill_and_fail(
                f"not answering on every local address {self.timing.start_timeout:.0f}s after launch"
                + self._last_output(),
                "unhealthy",
            )
        if self.reload is not None and now >= self.reload.deadline:
            self._reload_failed(f"no reload confirmation within {self.timing.reload_timeout:.0f}s")
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

    # Actions ----------------------------------------------------------------------------------------
    def _set_state(self, state: CoreDnsState, cause: str) -> None:
        if state is self.state and cause == self.cause:
            return
        log.info("coredns state", **{"from": str(self.state), "to": str(state)}, cause=cause)
        self.metrics.coredns_state.labels(str(self.state)).set(0)
        self.metrics.coredns_state.labels(str(state)).set(1)
        self.state, self.cause = state, cause
        self._write_status()
        where = "serving DNS" if state.serving else "DNS on the kube-dns fallback path"
        self.notifier.status(f"{where}; coredns {state}: {cause}")

    def _launch(self, cause: str) -> None:
        self.restart_at = None
        if self.child is not None:
            self.child.kill_group()
            self.child.wait(timeout=2.0)
        if self.corefile_text is None:
            self._backoff("no valid Corefile yet: fix the template or ConfigMap", "start_failed", count=False)
            return
        self.oom_kills_at_start = self.cgroup.oom_kills() if self.cgroup else None
        child = self.launcher(self.post)
        try:
            pid = child.start()
        except CoreDnsStartError as exc:
            self.child = None
            self._backoff(str(exc), "start_failed")
            return
        self.child = child
        self.probe_failures = 0
        self.start_deadline = time.monotonic() + self.timing.start_timeout
        probe = replace(self.probe_settings, health_url=self.health_url())
        self.prober = self.prober_factory(probe, pid, self.post)
        self.prober.start()
        self._set_state(CoreDnsState.STARTING, f"{cause}: launched pid {pid}")

    def _became_healthy(self) -> None:
        self.start_deadline = None
        self.healthy_since = time.monotonic()
        if not self.rules_installed:
            self.network.install_rules(host_rules=True)
            self.rules_installed = self.host_rules = True
        else:
            self.network.set_host_rules(True)
            self.host_rules = True
        self._set_state(CoreDnsState.RUNNING, "answering on every local address")
        if not self.ever_ready:
            self.ever_ready = True
            self.notifier.ready("serving DNS")

    def _host_rules_off(self) -> None:
        if self.host_rules and self.settings.host_failover:
            self.network.set_host_rules(False)
            self.host_rules = False

    def _fail(self, cause: str, label: str) -> None:
        """CoreDNS is gone or useless: host traffic back to kube-dns now, restart after a backoff."""
        self._host_rules_off()
        self._stop_prober()
        self.metrics.coredns_restarts.labels(label).inc()
        if (
            self.healthy_since is not None
            and time.monotonic() - self.healthy_since >= self.timing.backoff_reset_after
        ):
            self.failures = 0
        self.healthy_since = None
        self._backoff(cause, label)

    def _kill_and_fail(self, cause: str, label: str) -> None:
        self._fail(cause, label)
        if self.child is not None:
            self.child.kill_group()

    def _backoff(self, cause: str, label: str, count: bool = True) -> None:
        if count:
            self.failures += 1
        delay = min(self.timing.backoff_max, self.timing.backoff_base * 2 ** max(0, self.failures - 1))
        self.start_deadline = None
        self.restart_delay = delay
        self.restart_at = time.monotonic() + delay
        self._set_state(CoreDnsState.BACKOFF, f"{cause}; restarting in {delay:.2f}s")
        if label == "start_failed" and count:
            self.metrics.coredns_restarts.labels(label).inc()

    def _stop_prober(self) -> None:
        if self.prober is not None:
            self.prober.stop()
            self.prober = None

    def _last_output(self) -> str:
        if self.child is not None and self.child.recent_output:
            return f" (last output: {self.child.recent_output[-1]})"
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
        self.corefile.write(text)
        previous, self.corefile_text = self.corefile_text, text
        self.metrics.corefile_renders.labels("changed").inc()
        log.info("corefile written", cause=cause, first=previous is None)
        return True

    def _apply_config(self, cause: str) -> None:
        previous = self.corefile_text
        if not self._render(cause) or previous is None:
            if previous is None and self.corefile_text is not None and self.state is CoreDnsState.BACKOFF:
                self.restart_at = time.monotonic()  # the first valid Corefile: start now
            return
        if self.child is not None and self.state in (CoreDnsState.STARTING, CoreDnsState.RUNNING):
            self.reload = _Reload(time.monotonic() + self.timing.reload_timeout, previous)
            self.child.signal(signal.SIGUSR1)
            log.info("coredns reload requested", cause=cause)

    def _reload_failed(self, why: str) -> None:
        assert self.reload is not None
        previous, self.reload = self.reload.previous, None
        self.metrics.reloads.labels("failed").inc()
        # CoreDNS keeps serving the old configuration; put the old file back so a restart uses it too.
        self.corefile.write(previous)
        self.corefile_text = previous
        self.retry_render_at = time.monotonic() + self.timing.reload_retry
        log.error("coredns reload failed", cause=why, keeping="the previous Corefile",
                  retry_in=self.timing.reload_retry)  # fmt: skip

    # Networking -------------------------------------------------------------------------------------
    def _reconcile(self, cause: str) -> None:
        changes = self.network.reconcile()
        if changes:  # the packet filter and the interface count what they restored
            log.warning("network restored", cause=cause, changes=changes)

    # Status -----------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._write_status()
        self.notifier.watchdog()
        memory = self.child.memory() if self.child is not None else None
        if memory is not None:
            self.peak_rss = max(self.peak_rss, memory[1])
            self.metrics.coredns_rss.set(memory[0])
            self.metrics.coredns_peak_rss.set(self.peak_rss)

    def _healthy_for(self) -> float:
        """Seconds since CoreDNS last became healthy, at scrape time; 0 while it is not."""
        since = self.healthy_since
        return time.monotonic() - since if since is not None and self.state.serving else 0.0

    def _write_status(self) -> None:
        status = Status(
            pid=os.getpid(),
            heartbeat=time.monotonic(),
            state=str(self.state),
            serving=self.state.serving,
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
        removed: all within the budget. Removing the rules before stopping CoreDNS (not after) means no query
        is caught in a closing socket: new queries already go to kube-dns, those on their way get answered."""
        started = self.shutting_down_since = time.monotonic()
        deadline = started + self.timing.shutdown_budget
        cause = self.stop_requested or "shutdown"
        log.info("agent stopping", cause=cause)
        self.notifier.stopping()
        self._set_state(CoreDnsState.STOPPING, cause)
        self._host_rules_off()
        self._stop_prober()
        self.corefile.stop_watchers()
        self.network.stop_watchers()
        teardown = not self.settings.skip_teardown
        if teardown:
            self.network.remove_rules(deadline)
            time.sleep(min(self.timing.drain, max(0.0, deadline - time.monotonic())))
        else:
            log.info("networking left in place", cause="-skipteardown")
        if self.child is not None:
            self.child.signal(signal.SIGTERM)
            grace = min(self.timing.stop_grace, max(0.0, deadline - time.monotonic()))
            if self.child.wait(timeout=grace) is None:
                log.warning("coredns did not stop in time, killing it", grace=self.timing.stop_grace)
                self.child.kill_group()
                self.child.wait(timeout=1.0)
        if teardown:
            self.network.remove_interface()
        self.state, self.cause = CoreDnsState.STOPPED, cause
        log.info("agent stopped", seconds=round(time.monotonic() - started, 3))
        return 0
