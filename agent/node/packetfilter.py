"""The agent's packet-filter rules in the host's iptables backend: install, host rules on/off, reconcile,
remove. One owner (the supervisor) calls these from one thread; only :meth:`PacketFilter.interrupt` may be
called from elsewhere (a signal handler).

Every change is read → planned → applied as one ``iptables-restore --noflush`` transaction per table →
read again to verify. A change that fails because the rules moved underneath (another program deleted a
rule first) is planned again from a fresh read; a busy xtables lock is waited for within a bound, retried
after a short back-off, counted, and reported as :class:`XtablesLockError`.

What the facade wants and what it last verified is one frozen record, :class:`FilterState`, replaced as a
whole by each operation and readable as :attr:`PacketFilter.state`. Removing every rule at teardown is
:mod:`agent.node.teardown`'s, through the same :meth:`Converger.remove`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from agent.node.fingerprint import Fingerprint, LegacyFingerprint, NftGeneration
from agent.node.rules import (
    FAMILIES,
    TABLES,
    Family,
    Plan,
    Rule,
    family_of,
    plan,
    tagged_rules,
    wanted_rules,
)
from agent.node.xtables import (
    Mode,
    PacketFilterError,
    PacketFilterInterruptError,
    Xtables,
    XtablesLockError,
    detect_mode,
)
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.settings import Settings
from agent.stopflag import Abort, StopFlag

# A full read even when the fingerprint says nothing changed: the safety net under the cheap check, at
# node-cache's own sync interval.
FULL_CHECK_INTERVAL = 60.0
# How often one change is re-planned after iptables-restore failed for a reason other than the lock.
_MAX_APPLY_ATTEMPTS = 3
_LOCK_WAITS = 2  # bounded lock waits per operation and family, a short pause between them
LOCK_RETRY_PAUSE = 0.2  # seconds
_RECONCILE_BACKOFF = (1.0, 30.0)  # first and longest pause of reconcile after a failed change, seconds
RETRY = "retry of a failed change"  # the cause of a reconcile that applies the agent's own pending change

log = get_logger("packetfilter")


# Which rules of ``iptables-save`` output a converger owns: the agent's tagged rules, or node-cache's.
Owned = Callable[[str, Family], list[Rule]]


def read_tagged(
    xtables: Xtables, family: Family, *, deadline: float | None = None, owned: Owned = tagged_rules
) -> list[Rule]:
    """The agent's rules (or those ``owned`` selects) now present for ``family``, duplicates included."""
    found: list[Rule] = []
    for table in TABLES:
        found += owned(xtables.save(family, table, deadline=deadline), family)
    return found


@dataclass(frozen=True)
class Converged:
    """What one convergence did, and the fingerprint taken just before the read that found nothing to do."""

    plans: tuple[Plan, ...]
    fingerprint: Hashable | None


@dataclass
class Converger:
    """Brings one backend's tagged rules of one family to a wanted set: read, plan, apply, verify."""

    xtables: Xtables
    metrics: Metrics
    fingerprint: Fingerprint | None = None
    owned: Owned = tagged_rules
    lock_retry_pause: float = LOCK_RETRY_PAUSE  # seconds between the bounded lock waits

    def converge(
        self,
        family: Family,
        wanted: Sequence[Rule],
        *,
        deadline: float,
        abort: Abort | None = None,
        keep_others: bool = False,
    ) -> Converged:
        """``keep_others``: add what is missing and remove duplicates, but keep rules not in ``wanted``.
        Raises PacketFilterError (XtablesLockError, PacketFilterInterruptError) when it cannot."""
        applied: list[Plan] = []
        failures = lock_waits = 0
        while True:
            if abort is not None and abort.is_set():
                raise PacketFilterInterruptError(f"IPv{family} rules: interrupted before a change")
            seen = self.fingerprint(family) if self.fingerprint is not None else None
            try:
                observed = read_tagged(self.xtables, family, deadline=deadline, owned=self.owned)
            except PacketFilterInterruptError:
                raise
            except PacketFilterError:
                self.metrics.setup_errors.labels("iptables").inc()
                raise
            todo = plan(family, observed, wanted, keep_others=keep_others)
            if not todo:
                return Converged(tuple(applied), seen)
            if len(applied) >= _MAX_APPLY_ATTEMPTS:
                self.metrics.setup_errors.labels("iptables").inc()
                raise PacketFilterError(
                    f"IPv{family} rules in {self.xtables.mode} did not converge after "
                    f"{len(applied)} changes; still to do: {'; '.join(todo.describe())}"
                )
            try:
                self.xtables.restore(family, todo.restore_input(), deadline=deadline, abort=abort)
                applied.append(todo)
            except XtablesLockError:
                self.metrics.setup_errors.labels("iptables_lock").inc()
                lock_waits += 1
                pause = self.lock_retry_pause
                if lock_waits >= _LOCK_WAITS or time.monotonic() + pause >= deadline:
                    raise
                log.warning("xtables lock busy, retrying", family=family, pause=pause)
                if abort is None:
                    time.sleep(pause)
                elif abort.wait(pause):
                    raise PacketFilterInterruptError(
                        f"IPv{family} rules: interrupted in a lock wait"
                    ) from None
            except PacketFilterInterruptError:
                raise
            except PacketFilterError as exc:
                self.metrics.setup_errors.labels("iptables").inc()
                failures += 1
                if failures >= _MAX_APPLY_ATTEMPTS or time.monotonic() >= deadline:
                    raise
                log.warning("rule change failed, planning again", family=family, error=str(exc))

    def remove(self, families: Iterable[Family], *, deadline: float, abort: Abort | None = None) -> list[str]:
        """Converge the rules this converger owns to none, family by family; what was removed."""
        changes: list[str] = []
        for family in families:
            for done in self.converge(family, (), deadline=deadline, abort=abort).plans:
                changes += done.describe()
        return changes


@dataclass(frozen=True)
class FilterState:
    """What the packet filter wants and what it last verified: one record, replaced as a whole by each
    operation (never changed in place), so a reader sees one consistent moment. Times are the filter's
    clock (monotonic seconds)."""

    # Rules are wanted at all: from prepare() or install() until remove_all().
    wanted: bool = False
    # The pod-query rules are part of what is wanted (False while only the health-probe rules are, after
    # prepare()).
    pod_rules: bool = False
    # The host-query rules are part of what is wanted (kept when set before install, applied with it).
    host_rules: bool = False
    # The last convergence verified the wanted rules in place; False after a failed or interrupted one.
    converged: bool = False
    # Per family, the fingerprint taken just before the last read that found nothing to do (None: the
    # kernel's tables could not be fingerprinted, so every reconcile reads them).
    fingerprints: Mapping[Family, Hashable | None] = field(default_factory=lambda: MappingProxyType({}))
    # When reconcile next reads the rules even though the fingerprint did not move (the safety net).
    next_full_check: float = 0.0
    # After a failed change: the pause before the next try (0: no change pending), and when it is due.
    backoff: float = 0.0
    retry_at: float = 0.0
    # The last convergence kept another agent's rules (another agent was alive): once it is gone,
    # reconcile converges to this agent's rules alone.
    shared: bool = False

    @property
    def installed(self) -> bool:
        """The whole rule set (pod rules included) verified in place."""
        return self.wanted and self.pod_rules and self.converged

    def with_fingerprint(self, family: Family, fingerprint: Hashable | None) -> FilterState:
        return replace(self, fingerprints=MappingProxyType({**self.fingerprints, family: fingerprint}))


@dataclass
class PacketFilter:
    """The facade the supervisor uses. See the module docstring; docs/design.md lists the rules.

    ``installed`` is True once the wanted rules were verified in place and until :meth:`remove_all`. After
    a failed :meth:`install` the rules are still wanted: :meth:`reconcile` keeps trying, with back-off.
    What is wanted and what was verified is one record, :attr:`state`.
    """

    settings: Settings
    metrics: Metrics
    xtables: Xtables | None = None
    fingerprint: Fingerprint | None = None
    detect: Callable[[], Mode] = detect_mode
    clock: Callable[[], float] = time.monotonic  # schedules reconcile; deadlines are always real time
    full_check_interval: float = FULL_CHECK_INTERVAL
    lock_retry_pause: float = LOCK_RETRY_PAUSE  # seconds between the bounded lock waits of one change
    # The shutdown latch (the supervisor's): once set, every operation but the shutdown's own fails at once.
    stop: StopFlag = field(default_factory=StopFlag)
    # Whether another agent on the node is alive (the agents lock): while one is, changes only add rules,
    # never remove one it may rely on (it may want host rules this agent's CoreDNS is not ready for yet).
    others: Callable[[], bool] = lambda: False
    _state: FilterState = field(default_factory=FilterState, init=False)
    _blind_warned: bool = field(default=False, init=False)  # a log latch, not rule state

    def __post_init__(self) -> None:
        s = self.settings
        if self.xtables is None:
            if s.iptables_mode == "auto":
                mode, cause = self.detect(), "detected like iptables-wrappers"
            else:
                mode, cause = s.iptables_mode, "forced by --iptables-mode"
            self.xtables = Xtables(mode, s.xtables_lock, s.xtables_wait)
            log.info("iptables mode chosen", mode=mode, cause=cause)
        if self.fingerprint is None:
            self.fingerprint = LegacyFingerprint() if self.xtables.mode == "legacy" else NftGeneration()
        self._families: tuple[Family, ...] = tuple(sorted({family_of(ip) for ip in s.local_ips}))
        self._converger = Converger(
            self.xtables, self.metrics, self.fingerprint, lock_retry_pause=self.lock_retry_pause
        )

    # State -----------------------------------------------------------------------------------------------
    @property
    def state(self) -> FilterState:
        """What is wanted and what was last verified: a frozen record, replaced by every operation."""
        return self._state

    @property
    def mode(self) -> Mode:
        assert self.xtables is not None
        return self.xtables.mode

    @property
    def installed(self) -> bool:
        return self._state.installed

    @property
    def host_rules(self) -> bool:
        """True while the host-query rules are wanted (they are in place when ``installed`` too)."""
        return self._state.wanted and self._state.host_rules

    # Operations ------------------------------------------------------------------------------------------
    def prepare(self, *, deadline: float | None = None) -> list[str]:
        """Install only the health-probe rules, so the agent can probe CoreDNS on every local address before
        any pod or host traffic is sent its way; stray tagged rules go in the same transaction."""
        self._state = replace(self._state, wanted=True, pod_rules=False, host_rules=False)
        return self._converge("probe rules", deadline)

    def install(self, host_rules: bool, *, deadline: float | None = None) -> list[str]:
        """Install the rule set (with the host-query rules if ``host_rules``); stray and duplicate tagged
        rules, e.g. an earlier run's, are removed in the same transaction. Returns the changes made."""
        self._state = replace(self._state, wanted=True, pod_rules=True, host_rules=host_rules)
        return self._converge("install", deadline)

    def set_host_rules(self, enabled: bool, *, deadline: float | None = None) -> list[str]:
        """Add or remove the raw OUTPUT rules that send host-originated queries to the local server: on only
        while CoreDNS is healthy, since the kernel gate (``-m socket``) does not work in OUTPUT."""
        before = self._state
        self._state = replace(before, host_rules=enabled)
        if not before.wanted or (enabled == before.host_rules and before.converged):
            return []
        return self._converge("host rules " + ("on" if enabled else "off"), deadline)

    def reconcile(self, *, force: bool = False) -> list[str]:
        """Re-add missing rules and remove duplicates or strays; returns what it changed.

        Cheap when nothing changed: a fingerprint of the kernel's tables (no process started) is compared
        with the one taken at the last verified read; a full read runs on a change, after a failure (with
        back-off) and every ``full_check_interval`` seconds regardless."""
        state = self._state
        if not state.wanted:
            return []
        now = self.clock()
        if not force:
            if now < state.retry_at:
                return []
            alone_now = state.shared and not self.others()  # the other agent left: converge to ours
            if state.converged and now < state.next_full_check and self._unchanged() and not alone_now:
                return []
        # After a failed change (the lock was held) the agent's own change is still pending: applying it is
        # a retry, not a repair of what another program did, and is not counted as one.
        retry = state.backoff > 0
        changes = self._converge(RETRY if retry else "reconcile", None)
        if changes and not retry:
            log.warning("rules restored", cause="changed by another program", changes=changes)
        return changes

    def remove_all(self, *, deadline: float | None = None) -> list[str]:
        """Remove exactly the agent's tagged rules, both families; idempotent. Not cut short by
        the stop latch (it is the shutdown path); bounded by ``deadline`` (monotonic) instead.
        The removal itself is :func:`agent.node.teardown.remove_tagged_rules`'s, through the same
        :meth:`Converger.remove`; this method also records that no rule is wanted any more."""
        assert self.xtables is not None
        self._state = replace(self._state, wanted=False, converged=False)
        self._set_gauges()
        changes = Converger(self.xtables, self.metrics, lock_retry_pause=self.lock_retry_pause).remove(
            FAMILIES, deadline=deadline or self._default_deadline(), abort=None
        )
        log.info("rules removed", cause="teardown", removed=len(changes))
        return changes

    def remove_host_rules(self, *, deadline: float) -> list[str]:
        """The shutdown's step when the rest stays (``-skipteardown``): the host-query rules must not point
        the node at a CoreDNS that is about to stop. Like :meth:`remove_all`, not cut short by the stop
        latch; bounded by ``deadline`` instead."""
        self._state = replace(self._state, host_rules=False)
        if not self._state.wanted:
            return []
        return self._converge("host rules off (shutdown)", deadline, shutdown=True)

    # Internals -------------------------------------------------------------------------------------------
    def _default_deadline(self) -> float:
        # Two bounded lock waits and a pause: long enough to outlast kube-proxy's sync, never a hang.
        return time.monotonic() + 2 * max(1.0, self.settings.xtables_wait) + 1.0

    def _unchanged(self) -> bool:
        assert self.fingerprint is not None
        for family in self._families:
            seen = self._state.fingerprints.get(family)
            if seen is None:
                if not self._blind_warned:
                    log.warning("cannot fingerprint the rules; reading them on every check", family=family)
                    self._blind_warned = True
                return False
            if self.fingerprint(family) != seen:
                return False
        return True

    def _converge(self, cause: str, deadline: float | None, *, shutdown: bool = False) -> list[str]:
        """Cut short by the stop latch, except for the shutdown's own steps."""
        abort = None if shutdown else self.stop
        if abort is not None and abort.is_set():
            raise PacketFilterInterruptError(f"{cause}: the packet filter is shutting down")
        s = self.settings
        wanted = wanted_rules(
            s.local_ips, dns_port=s.dns_port, health_port=s.health_port, host_rules=self._state.host_rules,
            pod_rules=self._state.pod_rules, probe_mark=s.probe_mark,
        )  # fmt: skip
        deadline = deadline or self._default_deadline()
        shared = self.others()
        self._state = replace(self._state, shared=shared)
        changes: list[str] = []
        try:
            # A change to one family can move another's fingerprint (nf_tables numbers all transactions
            # together): after a change, a second pass re-reads every family to take fresh fingerprints.
            for _ in range(2):
                applied: list[Plan] = []
                for family in self._families:
                    done = self._converger.converge(family, wanted, deadline=deadline, abort=abort,
                                                    keep_others=shared)  # fmt: skip
                    self._state = self._state.with_fingerprint(family, done.fingerprint)
                    applied += done.plans
                changes += [line for p in applied for line in p.describe()]
                if cause == "reconcile":
                    self.metrics.rules_restored.labels("rule").inc(sum(len(p.insert) for p in applied))
                    self.metrics.rules_restored.labels("duplicate").inc(sum(len(p.delete) for p in applied))
                if not applied or len(self._families) == 1:
                    break
        except PacketFilterInterruptError:
            self._state = replace(self._state, converged=False)
            self._set_gauges()
            raise
        except PacketFilterError as exc:
            backoff = min(_RECONCILE_BACKOFF[1], max(_RECONCILE_BACKOFF[0], self._state.backoff * 2))
            self._state = replace(
                self._state, converged=False, backoff=backoff, retry_at=self.clock() + backoff
            )
            self._set_gauges()
            log.error("rules not in place", cause=cause, error=str(exc), retry_in=backoff)
            raise
        self._state = replace(
            self._state, converged=True, backoff=0.0, next_full_check=self.clock() + self.full_check_interval
        )
        self._set_gauges()
        if changes and cause != "reconcile":
            log.info("rules changed", cause=cause, changes=len(changes), mode=self.mode)
        return changes

    def _set_gauges(self) -> None:
        self.metrics.rules_installed.labels("pod").set(1 if self.installed else 0)
        self.metrics.rules_installed.labels("host").set(1 if self.installed and self._state.host_rules else 0)
