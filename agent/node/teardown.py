"""Removing the agent's networking: ``agent --teardown``, and an earlier run's leftovers at start.

Order matters: rules first, then addresses and the interface. The other way round, the host-query rules
would for a moment send the node's own queries to an address nobody holds any more.

Both iptables backends are cleaned, not only the one in use: an earlier run may have chosen the other
(the kubelet's canary chain appeared later, or the mode was forced differently). Reading a backend creates
nothing, and a backend holding none of the agent's rules is not written to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from agent.node.interface import Interface, InterfaceError
from agent.node.packetfilter import remove_node_cache_rules, remove_tagged_rules
from agent.node.rules import node_cache_rules
from agent.node.xtables import MODES, PacketFilterError, Xtables, XtablesUnavailableError
from agent.observe.logs import get_logger, setup_logging
from agent.observe.metrics import Metrics
from agent.settings import Settings
from agent.stopflag import Abort

log = get_logger("teardown")


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


def teardown(settings: Settings) -> int:
    """``agent --teardown``: rules, then addresses and the interface. Idempotent; 0 when all is gone."""
    setup_logging(settings.log_format)
    metrics = Metrics()
    ok = True
    if settings.setup_iptables:
        try:
            remove_leftover_rules(settings, metrics)
        except PacketFilterError as exc:
            log.error("rules not removed", error=str(exc))
            ok = False
    if settings.setup_interface:
        with Interface(settings.interface_name, settings.local_ips, metrics) as interface:
            try:
                interface.remove()
            except InterfaceError as exc:
                log.error("interface not removed", error=str(exc))
                ok = False
    log.info("teardown done" if ok else "teardown incomplete", interface=settings.interface_name)
    return 0 if ok else 1
