"""The ``nodelocaldns`` interface: a link holding the local addresses CoreDNS binds to.

A dummy link where the kernel has the dummy driver; otherwise an empty bridge (no ports, so it forwards
nothing), with one warning. Only a link of that name and of one of those kinds, with no ports, is ever
changed: an interface of another kind, or a bridge with ports, is another program's and is refused.
IPv6 addresses are added with ``IFA_F_NODAD`` so CoreDNS can bind them at once.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.node.links import Address, Link, Netlink
from agent.node.rtnetlink import RtNetlink
from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.settings import IPAddress

# Link and Address are read here by the tests' fakes too; they live in agent.node.links.
__all__ = ["IFA_F_NODAD", "Address", "Interface", "InterfaceError", "Link", "Netlink"]

IFA_F_NODAD = 0x02
_T = TypeVar("_T")
_OUR_KINDS = ("dummy", "bridge")

log = get_logger("interface")


class InterfaceError(RuntimeError):
    """The interface or an address could not be read or changed; the message says which and why."""


def _rtnetlink() -> Netlink:
    return RtNetlink()


def _explain(exc: OSError, action: str) -> InterfaceError:
    hints = {
        errno.EPERM: "not permitted: the agent needs CAP_NET_ADMIN",
        errno.EACCES: "not permitted: the agent needs CAP_NET_ADMIN",
        errno.ENODEV: "the interface disappeared meanwhile (another program deleted it)",
        errno.EEXIST: "it exists already",
        errno.EADDRNOTAVAIL: "the address is not there",
        errno.EOPNOTSUPP: "the kernel does not support it",
        errno.EADDRINUSE: "the address is in use",
    }
    code = exc.errno or 0
    reason = hints.get(code, exc.strerror or str(exc))
    return InterfaceError(f"{action}: {reason} ({errno.errorcode.get(code, code)})")


@dataclass
class Interface:
    """The agent's interface ``name`` holding ``addresses`` (host routes: /32 and /128)."""

    name: str
    addresses: Sequence[IPAddress]
    metrics: Metrics | None = None
    netlink: Netlink = field(default_factory=_rtnetlink)

    # Once the kernel refused a dummy link, later creations go straight to the bridge (warned once).
    _dummy_unsupported: bool = field(default=False, init=False)

    def __enter__(self) -> Interface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.netlink.close()

    def _wanted(self) -> list[Address]:
        return [Address(ip, 32 if ip.version == 4 else 128) for ip in self.addresses]

    def _owned(self, link: Link) -> Link:
        if link.kind not in _OUR_KINDS:
            raise InterfaceError(
                f"interface {self.name} exists and is a {link.kind or 'device of unknown kind'}, not a dummy "
                "or bridge: it belongs to another program; choose another -interfacename"
            )
        if link.ports:
            raise InterfaceError(
                f"interface {self.name} is a bridge with {link.ports} ports: it belongs to another program; "
                "choose another -interfacename"
            )
        return link

    def _stale(self, have: Sequence[Address]) -> list[Address]:
        wanted = self._wanted()
        return [a for a in have if a not in wanted and not (a.ip.version == 6 and a.ip.is_link_local)]

    def _count(self, errortype: str) -> None:
        if self.metrics is not None:
            self.metrics.setup_errors.labels(errortype).inc()

    def ensure(self) -> list[str]:
        """Create the link if missing, set it up, add missing addresses and remove ones not wanted (an
        earlier run's); IPv6 link-local addresses are left alone. Returns the changes made."""
        try:
            return self._ensure()
        except InterfaceError:
            self._count("interface_add")
            raise

    def _ensure(self) -> list[str]:
        changes: list[str] = []
        link = self._find()
        if link is None:
            kind = self._create()
            changes.append(f"created interface {self.name} ({kind})")
            link = self._find()
            if link is None:
                raise InterfaceError(f"interface {self.name} vanished right after it was created")
        link = self._owned(link)
        if not link.up:
            self._do(self.netlink.set_up, link.index, action=f"set {self.name} up")
            changes.append(f"set interface {self.name} up")
        have = self._do(self.netlink.addresses, link.index, action=f"list addresses of {self.name}")
        for address in self._wanted():
            if address in have:
                continue
            flags = IFA_F_NODAD if address.ip.version == 6 else 0
            try:
                self.netlink.add_address(link.index, address, flags)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise _explain(exc, f"add {address.ip} to {self.name}") from None
            changes.append(f"added address {address.ip}/{address.prefixlen} to {self.name}")
        for address in self._stale(have):
            self._delete_address(link.index, address)
            changes.append(f"removed stale address {address.ip}/{address.prefixlen} from {self.name}")
        if changes:
            log.info("interface changed", interface=self.name, changes=changes)
        return changes

    def check(self) -> list[str]:
        """What differs from the wanted state (empty when all is in place); changes nothing."""
        try:
            link = self._find()
            if link is None:
                return [f"interface {self.name} is missing"]
            link = self._owned(link)
            missing = [] if link.up else [f"interface {self.name} is down"]
            have = self._do(self.netlink.addresses, link.index, action=f"list addresses of {self.name}")
        except InterfaceError:
            self._count("interface_check")
            raise
        missing += [f"address {a.ip}/{a.prefixlen} is missing" for a in self._wanted() if a not in have]
        missing += [f"stale address {a.ip}/{a.prefixlen}" for a in self._stale(have)]
        return missing

    def remove(self) -> list[str]:
        """Remove the addresses, then the link; nothing to do when it is gone. Idempotent."""
        link = self._find()
        if link is None:
            return []
        link = self._owned(link)
        changes: list[str] = []
        try:
            have = self.netlink.addresses(link.index)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return []
            raise _explain(exc, f"list addresses of {self.name}") from None
        for address in have:
            if address.ip.version == 6 and address.ip.is_link_local:
                continue
            self._delete_address(link.index, address)
            changes.append(f"removed address {address.ip}/{address.prefixlen} from {self.name}")
        try:
            self.netlink.delete_link(link.index)
            changes.append(f"deleted interface {self.name}")
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise _explain(exc, f"delete {self.name}") from None
        log.info("interface removed", interface=self.name, cause="teardown", changes=changes)
        return changes

    # Internals -------------------------------------------------------------------------------------------
    def _find(self) -> Link | None:
        return self._do(self.netlink.find_link, self.name, action=f"look up {self.name}")

    def _do(self, call: Callable[..., _T], *args: Any, action: str) -> _T:
        try:
            return call(*args)
        except OSError as exc:
            raise _explain(exc, action) from None

    def _delete_address(self, index: int, address: Address) -> None:
        try:
            self.netlink.delete_address(index, address)
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                raise _explain(exc, f"remove {address.ip} from {self.name}") from None

    def _create(self) -> str:
        kinds = ("bridge",) if self._dummy_unsupported else _OUR_KINDS
        for kind in kinds:
            try:
                self.netlink.add_link(self.name, kind)
                return kind
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    return "created by another program meanwhile"
                if kind == "dummy" and exc.errno == errno.EOPNOTSUPP:
                    self._dummy_unsupported = True
                    log.warning(
                        "kernel has no dummy link driver; using an empty bridge instead",
                        interface=self.name,
                        cause="EOPNOTSUPP from the kernel",
                    )
                    continue
                raise _explain(exc, f"create {kind} interface {self.name}") from None
        raise InterfaceError(f"create interface {self.name}: no link kind could be created")
