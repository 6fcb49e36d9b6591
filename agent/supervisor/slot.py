"""One CoreDNS slot (``--coredns-instances`` runs twins on the same sockets): its child, its state, its
restart schedule. A twin fails, backs off and restarts on its own; the others keep serving.

The state changes only through :meth:`Slot.change_state`, which allows exactly the transitions of
:data:`TRANSITIONS` (supervisord's ``process.py`` shape): any other is a bug and raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.coredns.process import CoreDnsProcess
from agent.supervisor.seams import ProberLike
from agent.supervisor.states import CoreDnsState
from agent.supervisor.timing import Timing

STOPPED, STARTING, RUNNING = CoreDnsState.STOPPED, CoreDnsState.STARTING, CoreDnsState.RUNNING
BACKOFF, STOPPING = CoreDnsState.BACKOFF, CoreDnsState.STOPPING

TRANSITIONS: Mapping[CoreDnsState, frozenset[CoreDnsState]] = {
    STOPPED: frozenset({
        STARTING,  # STOPPED -> STARTING: the first launch
        BACKOFF,  # STOPPED -> BACKOFF: the first launch failed (no valid Corefile yet, the binary missing)
        STOPPING,  # STOPPED -> STOPPING: the agent stops before anything was launched
    }),
    STARTING: frozenset({
        RUNNING,  # STARTING -> RUNNING: answering on every local address
        BACKOFF,  # STARTING -> BACKOFF: exited, bound but silent, stopped, or not healthy in time
        STOPPING,  # STARTING -> STOPPING: the agent stops
    }),
    RUNNING: frozenset({
        BACKOFF,  # RUNNING -> BACKOFF: exited, hung, OOM-killed, stopped by a signal
        STOPPING,  # RUNNING -> STOPPING: the agent stops
    }),
    BACKOFF: frozenset({
        STARTING,  # BACKOFF -> STARTING: the restart delay ended, relaunched
        BACKOFF,  # BACKOFF -> BACKOFF: the relaunch failed at once (a new cause, a longer delay)
        STOPPING,  # BACKOFF -> STOPPING: the agent stops
    }),
    STOPPING: frozenset({
        STOPPED,  # STOPPING -> STOPPED: the shutdown finished
    }),
}  # fmt: skip


class IllegalTransitionError(RuntimeError):
    """A state change the table does not allow: a bug in the supervisor, never a CoreDNS failure."""


@dataclass
class PendingReload:
    """A SIGUSR1 reload sent to one CoreDNS child, waiting for its confirmation."""

    pid: int
    deadline: float
    previous: str  # the Corefile that child confirmed last: written back if the reload fails


@dataclass
class Slot:
    """One CoreDNS instance: its child, its state and cause, its restart schedule."""

    index: int
    twins: bool = False  # one of several instances: its log events name it
    state: CoreDnsState = STOPPED
    cause: str = "not started"
    child: CoreDnsProcess | None = None
    prober: ProberLike | None = None
    failures: int = 0  # consecutive failures, for the backoff
    restart_at: float | None = None
    healthy_since: float | None = None
    # Per-child state: set at launch, cleared when that child exits or is replaced.
    probe_failures: int = 0
    wrong_answers: int = 0
    start_deadline: float | None = None
    oom_kills_at_start: int | None = None
    reload: PendingReload | None = None
    reload_when_healthy: str | None = None  # a change seen while starting

    def owns(self, pid: int) -> bool:
        return self.child is not None and self.child.pid == pid

    @property
    def which(self) -> dict[str, int]:
        """The slot's number for its log events, when there are twins (one instance: as ever)."""
        return {"instance": self.index} if self.twins else {}

    def change_state(self, state: CoreDnsState, cause: str) -> CoreDnsState | None:
        """Move to ``state`` for ``cause``; the state it left, or None when nothing changed (the same state
        for the same cause). Raises IllegalTransitionError for a transition not in :data:`TRANSITIONS`."""
        if state is self.state and cause == self.cause:
            return None
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(
                f"coredns instance {self.index}: {self.state} -> {state} is not an allowed transition "
                f"(cause: {cause})"
            )
        before, self.state, self.cause = self.state, state, cause
        return before

    def stopped(self, cause: str) -> None:
        """The shutdown's end: STOPPED, through STOPPING should the shutdown's announcement have failed."""
        if self.state is not STOPPING:
            self.change_state(STOPPING, cause)
        self.change_state(STOPPED, cause)

    def schedule_restart(self, now: float, timing: Timing, *, count: bool = True) -> float:
        """After a failure (``count``) or a launch that could not even try: the restart time, backing off
        exponentially with consecutive failures. Returns the delay."""
        if count:
            self.failures += 1
        delay = timing.backoff(self.failures)
        self.start_deadline = None
        self.restart_at = now + delay
        return delay

    def forgive(self, now: float, timing: Timing) -> None:
        """It failed: running healthily long enough before forgives the earlier failures."""
        if self.healthy_since is not None and now - self.healthy_since >= timing.backoff_reset_after:
            self.failures = 0
        self.healthy_since = None

    def stop_prober(self) -> None:
        if self.prober is not None:
            self.prober.stop()
            self.prober = None

    def forget_child(self) -> None:
        """Everything that belonged to the previous child goes with it (a pending reload is dropped by the
        reload protocol first, which logs it)."""
        self.stop_prober()
        self.child = None
        self.probe_failures = self.wrong_answers = 0
        self.start_deadline = None
        self.reload_when_healthy = None

    def last_output(self) -> str:
        if self.child is not None and self.child.recent_output:
            return f" (last output: {self.child.recent_output[-1]})"
        return ""
