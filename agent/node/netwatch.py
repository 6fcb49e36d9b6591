"""Watchers of the kernel's change notifications: they only post an event (a short source name) through a
callback; the supervisor then reconciles. Nothing here changes anything.

- ``interface``: rtnetlink link and address events concerning the agent's interface (by index or name);
- ``nftables``: nf_tables events touching the ip/ip6 ``raw`` or ``filter`` tables' chains the agent uses.

iptables-legacy has no notifications: :class:`agent.node.fingerprint.LegacyFingerprint` is read in-process on
every sync tick instead. A lost notification (socket buffer overrun) is posted as a change, and the
reconcile path's periodic full check covers whatever is still missed.

Each watcher is one thread blocked in ``poll`` on its netlink socket and a wake-up pipe: no CPU while idle.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.node import netlink
from agent.node.rules import CHAINS
from agent.observe.logs import get_logger

Callback = Callable[[str], None]

log = get_logger("netwatch")

# rtnetlink
_RTNLGRP_LINK, _RTNLGRP_IPV4_IFADDR, _RTNLGRP_IPV6_IFADDR = 1, 5, 9
_RTM_NEWLINK, _RTM_DELLINK, _RTM_NEWADDR, _RTM_DELADDR = 16, 17, 20, 21
_IFINFOMSG = 16  # family, pad, type, index, flags, change
_IFADDRMSG = 8  # family, prefixlen, flags, scope, index
_IFLA_IFNAME = 3
# nf_tables
_NFNLGRP_NFTABLES = 7
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE, _NFT_MSG_DELTABLE = 0, 2
_NFT_MSG_NEWCHAIN, _NFT_MSG_DELCHAIN = 3, 5
_NFT_MSG_NEWRULE, _NFT_MSG_DELRULE = 6, 8
_NFT_MSG_DESTROYTABLE, _NFT_MSG_DESTROYCHAIN, _NFT_MSG_DESTROYRULE = 26, 27, 28
_NFGENMSG = 4
_NFPROTO_IPV4, _NFPROTO_IPV6 = 2, 10
_NFTA_TABLE = 1  # NFTA_TABLE_NAME, NFTA_CHAIN_TABLE and NFTA_RULE_TABLE all are attribute 1
_NFTA_CHAIN_NAME = 3
_NFTA_RULE_CHAIN = 2


@dataclass
class Watcher:
    """Base: a thread reading one netlink socket; subclasses say which groups and which messages matter."""

    callback: Callback
    source: str = field(init=False, default="")
    _thread: threading.Thread | None = field(init=False, default=None)
    _wake: tuple[int, int] | None = field(init=False, default=None)
    _sock: socket.socket | None = field(init=False, default=None)

    def _open(self) -> socket.socket:
        raise NotImplementedError

    def relevant(self, mtype: int, payload: bytes) -> bool:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Subscribe (raises OSError when the kernel refuses) and start the thread."""
        self._sock = self._open()
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, name=f"netwatch-{self.source}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is None or self._wake is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake[1], b"x")
        self._thread.join(timeout)
        for fd in self._wake:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._sock is not None:
            self._sock.close()
        self._thread, self._wake, self._sock = None, None, None

    def _run(self) -> None:
        assert self._sock is not None and self._wake is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake[0] in ready:
                    return
                if self._drain():
                    self._post()
        except Exception as exc:  # a watcher must not die silently: post, log, end
            log.error("watcher stopped", source=self.source, error=repr(exc))
            self._post()

    def _drain(self) -> bool:
        assert self._sock is not None
        relevant = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return relevant
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                relevant = True  # notifications were lost: assume the worst
                continue
            relevant = any(self.relevant(m.type, m.payload) for m in netlink.messages(data)) or relevant

    def _post(self) -> None:
        try:
            self.callback(self.source)
        except Exception as exc:
            log.error("watcher callback failed", source=self.source, error=repr(exc))


@dataclass
class InterfaceWatcher(Watcher):
    """Link and address events of the interface ``name`` (followed across deletion and re-creation)."""

    name: str = "nodelocaldns"
    _index: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.source = "interface"

    def _open(self) -> socket.socket:
        sock = netlink.subscribe(
            netlink.NETLINK_ROUTE, (_RTNLGRP_LINK, _RTNLGRP_IPV4_IFADDR, _RTNLGRP_IPV6_IFADDR)
        )
        try:
            self._index = socket.if_nametoindex(self.name)
        except OSError:
            self._index = None
        return sock

    def relevant(self, mtype: int, payload: bytes) -> bool:
        if mtype in (_RTM_NEWADDR, _RTM_DELADDR) and len(payload) >= _IFADDRMSG:
            (index,) = struct.unpack_from("=I", payload, 4)
            return self._index is not None and index == self._index
        if mtype in (_RTM_NEWLINK, _RTM_DELLINK) and len(payload) >= _IFINFOMSG:
            (index,) = struct.unpack_from("=i", payload, 4)
            if index == self._index:
                if mtype == _RTM_DELLINK:
                    self._index = None
                return True
            if netlink.attribute_string(payload, _IFINFOMSG, _IFLA_IFNAME) == self.name:
                self._index = index if mtype == _RTM_NEWLINK else None
                return True
        return False


@dataclass
class NftablesWatcher(Watcher):
    """nf_tables events on the built-in chains the agent writes to (ip and ip6 ``raw``/``filter``)."""

    def __post_init__(self) -> None:
        self.source = "nftables"

    def _open(self) -> socket.socket:
        return netlink.subscribe(netlink.NETLINK_NETFILTER, (_NFNLGRP_NFTABLES,))

    def relevant(self, mtype: int, payload: bytes) -> bool:
        if mtype >> 8 != _NFNL_SUBSYS_NFTABLES or len(payload) < _NFGENMSG:
            return False
        if payload[0] not in (_NFPROTO_IPV4, _NFPROTO_IPV6):
            return False
        msg = mtype & 0xFF
        table = netlink.attribute_string(payload, _NFGENMSG, _NFTA_TABLE)
        if table not in CHAINS:
            return False
        if msg in (_NFT_MSG_NEWTABLE, _NFT_MSG_DELTABLE, _NFT_MSG_DESTROYTABLE):
            return True
        if msg in (_NFT_MSG_NEWCHAIN, _NFT_MSG_DELCHAIN, _NFT_MSG_DESTROYCHAIN):
            chain = netlink.attribute_string(payload, _NFGENMSG, _NFTA_CHAIN_NAME)
        elif msg in (_NFT_MSG_NEWRULE, _NFT_MSG_DELRULE, _NFT_MSG_DESTROYRULE):
            chain = netlink.attribute_string(payload, _NFGENMSG, _NFTA_RULE_CHAIN)
        else:
            return False
        return chain in CHAINS[table]


@dataclass
class Watchers:
    """The watchers that apply to one configuration, started and stopped together."""

    watchers: list[Watcher]

    def start(self) -> None:
        started: list[Watcher] = []
        try:
            for w in self.watchers:
                w.start()
                started.append(w)
        except OSError:
            for w in started:
                w.stop()
            raise

    def stop(self, timeout: float = 2.0) -> None:
        """All of them within ``timeout`` seconds in total (a stuck one is a daemon thread: left behind)."""
        deadline = time.monotonic() + timeout
        for w in self.watchers:
            w.stop(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return all(w.alive for w in self.watchers)


def watchers_for(*, interface_name: str | None, nftables: bool, callback: Callback) -> Watchers:
    """The interface watcher when the agent manages the interface, the nf_tables one in nft mode."""
    found: list[Watcher] = []
    if interface_name is not None:
        found.append(InterfaceWatcher(callback, name=interface_name))
    if nftables:
        found.append(NftablesWatcher(callback))
    return Watchers(found)
