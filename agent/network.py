"""The node's networking as the supervisor drives it: the interface, the packet filter, their watchers.

Errors are reported and counted here (the interface and the packet filter count their own setup errors),
never raised into the supervisor's loop: a failed step is retried by the next reconcile, and DNS stays on
the kube-dns path meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import Settings
from agent.events import Event, NetworkChanged
from agent.interface import Interface, InterfaceError
from agent.logs import get_logger
from agent.metrics import Metrics
from agent.netreconcile import NetworkReconciler
from agent.netwatch import Watchers, watchers_for
from agent.packetfilter import PacketFilter
from agent.teardown import remove_leftover_rules
from agent.xtables import PacketFilterError, PacketFilterInterruptError

log = get_logger("network")


class NodeNetwork:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.interface = (
            Interface(settings.interface_name, settings.local_ips, metrics)
            if settings.setup_interface
            else None
        )
        self.packet_filter = PacketFilter(settings, metrics) if settings.setup_iptables else None
        self.reconciler = NetworkReconciler(self.interface, self.packet_filter, metrics)
        self._watchers: Watchers | None = None

    def remove_leftovers(self) -> None:
        try:
            remove_leftover_rules(self.settings, self.metrics)
        except PacketFilterError as exc:
            log.error("leftover rules not removed", error=str(exc), cause="retried by the next install")

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
        if self.packet_filter is None:
            return
        try:
            changes = self.packet_filter.install(host_rules)
        except PacketFilterError as exc:
            log.error("rules not installed", error=str(exc), cause="retried by the reconcile")
            return
        log.info("rules installed", host_rules=host_rules, mode=self.packet_filter.mode, changes=len(changes))

    def set_host_rules(self, enabled: bool) -> None:
        if self.packet_filter is None:
            return
        try:
            if self.packet_filter.set_host_rules(enabled):
                log.info("host rules " + ("added" if enabled else "removed"),
                         cause="coredns healthy" if enabled else "coredns not healthy")  # fmt: skip
        except PacketFilterInterruptError:
            log.info("host rules left to the teardown", cause="shutting down")
        except PacketFilterError as exc:
            log.error(
                "host rules not changed", enabled=enabled, error=str(exc), cause="retried by the reconcile"
            )

    def reconcile(self) -> list[str]:
        try:
            return self.reconciler.reconcile()
        except (PacketFilterError, InterfaceError) as exc:
            log.error("reconcile failed", error=str(exc), cause="retried at the next tick")
            return []

    def interrupt(self) -> None:
        """Cut a lock wait short (safe from a signal handler): shutdown must not wait for kube-proxy."""
        if self.packet_filter is not None:
            self.packet_filter.interrupt()

    def remove_rules(self, deadline: float) -> None:
        """Every tagged rule, within ``deadline`` even when the xtables lock is held."""
        if self.packet_filter is not None:
            try:
                self.packet_filter.remove_all(deadline=deadline)
            except PacketFilterError as exc:
                log.error("rules not removed", error=str(exc), cause="the next start removes them")

    def remove_interface(self) -> None:
        """The addresses and the interface: after the rules (the other order would, for a moment, send host
        queries to an address nobody holds) and after CoreDNS let go of the addresses."""
        if self.interface is not None:
            try:
                self.interface.remove()
            except InterfaceError as exc:
                log.error("interface not removed", error=str(exc))
            self.interface.close()

    def start_watchers(self, post: Callable[[Event], None]) -> None:
        def changed(source: str) -> None:
            self.reconciler.note_change(source)
            post(NetworkChanged(source))

        nft = self.packet_filter is not None and self.packet_filter.mode == "nft"
        iface = self.settings.interface_name if self.interface is not None else None
        self._watchers = watchers_for(interface_name=iface, nftables=nft, callback=changed)
        self._watchers.start()

    def stop_watchers(self) -> None:
        if self._watchers is not None:
            self._watchers.stop()
            self._watchers = None
