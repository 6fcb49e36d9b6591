"""Removing the agent's networking, in one place: the shutdown's steps (through :class:`NodeNetwork`),
``agent --teardown``, and an earlier run's leftovers at start.

- the agent's tagged rules: of the running packet filter's backend at shutdown; of both backends and both
  families for ``--teardown`` and at start (an earlier run may have chosen the other backend: the kubelet's
  canary chain appeared later, or the mode was forced differently). Reading a backend creates nothing, and
  a backend holding none of the agent's rules is not written to;
- node-cache's rules for the configured addresses and ports (a takeover: node-cache leaves them behind when
  killed, OOM-killed, with a 0 s grace period or -skipteardown);
- the host-query rules alone, at a shutdown that leaves the rest to another agent or to ``-skipteardown``;
- the interface and its addresses.

Order matters: rules first, then addresses and the interface. The other way round, the host-query rules
would for a moment send the node's own queries to an address nobody holds any more. The rules are removed
by the same read, plan, apply, verify as every other change (:meth:`Converger.remove`).

The ``remove_*`` steps for the running agent report a failure in the log and return False, never raise:
a shutdown goes on with its next step, and the next start removes what is left.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from agent.node.interface import Interface, InterfaceError
from agent.node.packetfilter import Converger, PacketFilter
from agent.node.rules import FAMILIES, Family, Rule, node_cache_rules, saved_rules
from agent.node.xtables import MODES, PacketFilterError, Xtables, XtablesUnavailableError
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.settings import Settings
from agent.stopflag import Abort

log = get_logger("teardown")


# The running agent's steps ------------------------------------------------------------------------------
def remove_rules(packet_filter: PacketFilter | None, *, deadline: float) -> bool:
    """Every tagged rule of the packet filter's backend, within ``deadline`` even when the xtables lock is
    held; the packet filter wants no rule afterwards. False (logged) when some could not be removed."""
    if packet_filter is None:
        return True
    try:
        packet_filter.remove_all(deadline=deadline)
    except PacketFilterError as exc:
        log.error("rules not removed", error=str(exc), cause="the next start removes them")
        return False
    return True


def remove_host_rules(packet_filter: PacketFilter | None, *, deadline: float) -> bool:
    """Only the host-query rules, at a shutdown that leaves the rest in place: host queries must not follow
    a stopping CoreDNS. False (logged) when they could not be removed."""
    if packet_filter is None:
        return True
    try:
        packet_filter.remove_host_rules(deadline=deadline)
    except PacketFilterError as exc:
        log.error("host rules not removed", error=str(exc), cause="the next start removes them")
        return False
    return True


def remove_interface(interface: Interface | None) -> bool:
    """The addresses, then the link; the netlink socket is closed either way. Call after the rules and
    after CoreDNS let go of the addresses. False (logged) when something could not be removed."""
    if interface is None:
        return True
    try:
        interface.remove()
    except InterfaceError as exc:
        log.error("interface not removed", error=str(exc))
        return False
    finally:
        interface.close()
    return True


# Both backends: leftovers and --teardown ------------------------------------------------------------------
def remove_tagged_rules(
    xtables: Xtables,
    metrics: Metrics,
    *,
    families: Iterable[Family] = FAMILIES,
    deadline: float,
    abort: Abort | None = None,
) -> list[str]:
    """Remove every rule carrying the agent's tag from one backend; nothing else is touched."""
    return Converger(xtables, metrics).remove(families, deadline=deadline, abort=abort)


def remove_node_cache_rules(
    xtables: Xtables,
    metrics: Metrics,
    rules: Sequence[Rule],
    *,
    deadline: float,
    abort: Abort | None = None,
) -> list[str]:
    """Remove node-cache's leftover rules (exactly ``rules``, every copy) from one backend; nothing else."""
    wanted = set(rules)

    def node_cache(save_output: str, family: Family) -> list[Rule]:
        return [rule for rule in saved_rules(save_output, family) if rule in wanted]

    converger = Converger(xtables, metrics, owned=node_cache)
    families = sorted({rule.family for rule in rules})
    return converger.remove(families, deadline=deadline, abort=abort)


def remove_leftover_rules(
    settings: Settings,
    metrics: Metrics,
    *,
    deadline: float | None = None,
    abort: Abort | None = None,
    backends: Sequence[Xtables] | None = None,
) -> list[str]:
    """Remove every rule carrying the agent's tag, in both backends and both families, e.g. those of a run
    that was killed (SIGKILL, OOM) before it could clean up; and node-cache's rule set for the configured
    addresses and ports, which node-cache leaves behind in the same cases (and with a 0 s grace period or
    -skipteardown): ungated, those rules would defeat the kernel gate. Call at start, before installing.

    Raises PacketFilterError (XtablesLockError when the lock stayed busy past ``deadline``)."""
    if not settings.setup_iptables:
        return []
    if deadline is None:
        deadline = time.monotonic() + 2 * (2 * max(1.0, settings.xtables_wait) + 1.0)
    if backends is None:
        backends = [Xtables(mode, settings.xtables_lock, settings.xtables_wait) for mode in MODES]
    node_cache = node_cache_rules(
        settings.local_ips, dns_port=settings.dns_port, health_port=settings.health_port
    )
    changes: list[str] = []
    for xtables in backends:
        mode = xtables.mode
        try:
            ours = remove_tagged_rules(xtables, metrics, deadline=deadline, abort=abort)
            if ours:
                log.warning("removed leftover rules", cause="an earlier run did not clean up", mode=mode,
                            changes=ours)  # fmt: skip
            theirs = remove_node_cache_rules(xtables, metrics, node_cache, deadline=deadline, abort=abort)
        except XtablesUnavailableError as exc:
            log.debug("backend not available, nothing to clean there", mode=mode, error=str(exc))
            continue
        if theirs:
            metrics.node_cache_rules_removed.inc(len(theirs))
            log.warning(
                "node-cache rules removed",
                cause="left behind by node-cache (killed, OOM-killed, a 0 s grace period or -skipteardown); "
                "ungated, they would send pod queries to a dead cache",
                mode=mode,
                removed=len(theirs),
                changes=theirs,
            )
        changes += ours + theirs
    return changes


def teardown(settings: Settings, metrics: Metrics) -> bool:
    """Everything the agent (or node-cache before it) set up: the rules of both backends, then the
    addresses and the interface. Idempotent; True when all is gone."""
    ok = True
    if settings.setup_iptables:
        try:
            remove_leftover_rules(settings, metrics)
        except PacketFilterError as exc:
            log.error("rules not removed", error=str(exc))
            ok = False
    if settings.setup_interface:
        ok = remove_interface(Interface(settings.interface_name, settings.local_ips, metrics)) and ok
    log.info("teardown done" if ok else "teardown incomplete", interface=settings.interface_name)
    return ok
