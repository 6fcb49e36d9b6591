"""The node's networking as the supervisor drives it: the interface, the packet filter, their watchers.

Errors are reported and counted here (the interface and the packet filter count their own setup errors),
never raised into the supervisor's loop: a failed step is retried by the next reconcile, and DNS stays on
the kube-dns path meanwhile. What is installed is the packet filter's to know; the supervisor asks
:meth:`NodeNetwork.rules_in_place` rather than remembering what it asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from agent.events import Event, NetworkChanged
from agent.node import teardown
from agent.node.interface import Interface, InterfaceError
from agent.node.netwatch import Watchers, watchers_for
from agent.node.nodelock import NodeLock, NodeLockError
from agent.node.packetfilter import PacketFilter
from agent.node.reconcile import NetworkReconciler
from agent.node.xtables import PacketFilterError, PacketFilterInterruptError, Xtables
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.settings import Settings
from agent.stopflag import StopFlag

log = get_logger("network")

# How long a starting agent waits for another agent's decision (its teardown is bounded at 10 s).
JOIN_WAIT = 15.0


class NodeNetwork:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        stop: StopFlag | None = None,
        *,
        interface: Interface | None = None,
        packet_filter: PacketFilter | None = None,
        leftover_backends: Sequence[Xtables] | None = None,
        node_lock: NodeLock | None = None,
    ) -> None:
        """The parts are built from ``settings`` unless given (tests give them fakes of the OS beneath)."""
        self.settings = settings
        self.metrics = metrics
        self.stop = stop or StopFlag()
        self.node_lock = node_lock or NodeLock(settings.agents_lock)
        if interface is None and settings.setup_interface:
            interface = Interface(settings.interface_name, settings.local_ips, metrics)
        self.interface = interface
        if packet_filter is None and settings.setup_iptables:
            packet_filter = PacketFilter(
                settings, metrics, stop=self.stop, others=self.node_lock.others_alive
            )
        self.packet_filter = packet_filter
        self.leftover_backends = leftover_backends
        self.reconciler = NetworkReconciler(self.interface, self.packet_filter, metrics)
        self._watchers: Watchers | None = None

    def join_node(self) -> None:
        """Join the node's agents (take the agents lock for this agent's life). An earlier run's leftovers
        (and node-cache's rules) are removed only when no other agent is alive: a live agent's rules look
        just like leftovers, so with another agent here they are kept."""
        try:
            self.node_lock.join()
        except NodeLockError as exc:
            log.error("agents lock not taken", error=str(exc), cause="acting as if no other agent were here")
        with self.node_lock.turn(JOIN_WAIT, abort=self.stop):
            if self.node_lock.others_alive():
                log.info("joining another agent on this node", cause="the agents lock is held",
                         leftovers="kept: they are its rules")  # fmt: skip
                return
            try:
                teardown.remove_leftover_rules(self.settings, self.metrics, backends=self.leftover_backends)
            except PacketFilterError as exc:
                log.error("leftover rules not removed", error=str(exc), cause="retried by the next install")

    @contextlib.contextmanager
    def leave_node(self, timeout: float) -> Iterator[bool]:
        """Leave the node's agents; the shutdown runs inside. Yields True when this agent is the node's last
        and removes what it installed; False when another agent stays, relying on the rules and the
        interface (only CoreDNS is stopped). The agents lock is released on the way out."""
        with self.node_lock.turn(timeout):
            last = not self.node_lock.others_alive()
            if not last:
                log.info("leaving the node to another agent", cause="another agent holds the agents lock",
                         kept="rules and interface")  # fmt: skip
            try:
                yield last
            finally:
                self.node_lock.leave()
        self.node_lock.close()

    def setup_interface(self) -> list[str]:
        if self.interface is None:
            return []
        try:
            return self.interface.ensure()
        except InterfaceError as exc:
            log.error("interface not set up", error=str(exc), cause="retried by the reconcile")
            return []

    def prepare_rules(self) -> None:
        """Only the health-probe rules, before CoreDNS starts: nothing is sent its way yet."""
        if self.packet_filter is None:
            return
        try:
            self.packet_filter.prepare()
        except PacketFilterError as exc:
            log.error("probe rules not installed", error=str(exc), cause="retried by the reconcile")

    def install_rules(self, host_rules: bool) -> None:
        """The whole rule set in place, host rules as given. Cheap when it is in place already (only the
        host rules may change); a failure is retried with back-off by :meth:`reconcile`."""
        pf = self.packet_filter
        if pf is None:
            return
        if pf.installed:
            self.set_host_rules(host_rules)
            return
        try:
            changes = pf.install(host_rules)
        except PacketFilterInterruptError:
            log.info("rules left out", cause="shutting down")
            return
        except PacketFilterError as exc:
            log.error("rules not installed", error=str(exc), cause="retried by the reconcile")
            return
        log.info("rules installed", host_rules=host_rules, mode=pf.mode, changes=len(changes))

    def set_host_rules(self, enabled: bool) -> None:
        if self.packet_filter is None:
            return
        try:
            if self.packet_filter.set_host_rules(enabled):
                log.info("host rules " + ("added" if enabled else "removed"),
                         cause="coredns healthy" if enabled else "coredns not healthy")  # fmt: skip
        except PacketFilterInterruptError:
            log.info("host rules left to the shutdown", cause="shutting down")
        except PacketFilterError as exc:
            log.error(
                "host rules not changed", enabled=enabled, error=str(exc), cause="retried by the reconcile"
            )

    def rules_in_place(self) -> bool:
        """The pod rules are verified in place (always true when the agent does not manage rules)."""
        return self.packet_filter is None or self.packet_filter.installed

    def reconcile(self) -> list[str]:
        try:
            return self.reconciler.reconcile()
        except (PacketFilterError, InterfaceError) as exc:
            log.error("reconcile failed", error=str(exc), cause="retried at the next tick")
            return []

    # The shutdown's steps: the removal is agent.node.teardown's ---------------------------------------------
    def remove_rules(self, deadline: float) -> None:
        """Every tagged rule, within ``deadline`` even when the xtables lock is held."""
        teardown.remove_rules(self.packet_filter, deadline=deadline)

    def remove_host_rules(self, deadline: float) -> None:
        """At a shutdown that leaves the rest in place: host queries must not follow a stopping CoreDNS."""
        teardown.remove_host_rules(self.packet_filter, deadline=deadline)

    def remove_interface(self) -> None:
        """The addresses and the interface: after the rules (the other order would, for a moment, send host
        queries to an address nobody holds) and after CoreDNS let go of the addresses."""
        teardown.remove_interface(self.interface)

    def start_watchers(self, post: Callable[[Event], None]) -> None:
        def changed(source: str) -> None:
            self.reconciler.note_change(source)
            post(NetworkChanged(source))

        nft = self.packet_filter is not None and self.packet_filter.mode == "nft"
        iface = self.settings.interface_name if self.interface is not None else None
        self._watchers = watchers_for(interface_name=iface, nftables=nft, callback=changed)
        self._watchers.start()

    def watchers_alive(self) -> bool:
        return self._watchers is None or self._watchers.alive

    def stop_watchers(self, timeout: float) -> None:
        if self._watchers is not None:
            self._watchers.stop(timeout)
            self._watchers = None
