"""The interface's few rtnetlink requests on a raw socket: find, create and bring up a link, list, add and
delete addresses, delete a link.

Seven requests do not need a netlink library: pyroute2, which did this before, costs about 20 MiB of memory
at import on every node for the whole life of the agent, which is most of the agent's footprint. Each request
waits for the kernel's acknowledgement; a refusal is raised as ``OSError`` with the kernel's errno, as the
:class:`agent.node.links.Netlink` seam expects. Replies are walked by :mod:`agent.node.netlink`. Formats:
``linux/rtnetlink.h``, ``linux/if_link.h``, ``linux/if_addr.h``.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from agent.node import netlink
from agent.node.links import Address, Link
from agent.node.netlink import attribute

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 3, 10, 18
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFF_UP = 0x1
NLA_F_NESTED = 0x8000

_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_U32 = struct.Struct("=I")
_RECV = 1 << 16
_TIMEOUT = 5.0  # seconds: the kernel answers at once; a bound, not an expected wait


def _string(value: str) -> bytes:
    return value.encode() + b"\0"


class RtNetlink:
    """:class:`agent.node.links.Netlink` over one NETLINK_ROUTE socket, opened on first use."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    # The seam --------------------------------------------------------------------------------------------
    def find_link(self, name: str) -> Link | None:
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attribute(IFLA_IFNAME, _string(name))
        try:
            (payload,) = list(self._request(RTM_GETLINK, request, 0))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        index, flags, attrs = _link(payload)
        kind = _kind(attrs.get(IFLA_LINKINFO, b""))
        ports = 0
        if kind == "bridge":
            dump = self._request(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), NLM_F_DUMP)
            for other in dump:
                master = _link(other)[2].get(IFLA_MASTER)
                ports += master is not None and _U32.unpack_from(master)[0] == index
        return Link(index=index, kind=kind, up=bool(flags & IFF_UP), ports=ports)

    def add_link(self, name: str, kind: str) -> None:
        info = attribute(IFLA_LINKINFO | NLA_F_NESTED, attribute(IFLA_INFO_KIND, kind.encode()))
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attribute(IFLA_IFNAME, _string(name)) + info
        self._command(RTM_NEWLINK, request, NLM_F_CREATE | NLM_F_EXCL)

    def set_up(self, index: int) -> None:
        self._command(RTM_NEWLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP), 0)

    def addresses(self, index: int) -> list[Address]:
        found: list[Address] = []
        dump = self._request(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), NLM_F_DUMP)
        for payload in dump:
            family, prefixlen, _flags, _scope, owner = _IFADDRMSG.unpack_from(payload)
            raw = dict(netlink.attributes(payload, _IFADDRMSG.size)).get(IFA_ADDRESS)
            if owner == index and raw is not None and family in (socket.AF_INET, socket.AF_INET6):
                found.append(Address(ipaddress.ip_address(raw), prefixlen))
        return found

    def add_address(self, index: int, address: Address, flags: int) -> None:
        self._command(RTM_NEWADDR, _address(index, address, flags), NLM_F_CREATE | NLM_F_EXCL)

    def delete_address(self, index: int, address: Address) -> None:
        self._command(RTM_DELADDR, _address(index, address, 0), 0)

    def delete_link(self, index: int) -> None:
        self._command(RTM_DELLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0), 0)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # The wire --------------------------------------------------------------------------------------------
    def _command(self, mtype: int, payload: bytes, flags: int) -> None:
        for _ in self._request(mtype, payload, flags | NLM_F_ACK):
            pass

    def _request(self, mtype: int, payload: bytes, flags: int) -> Iterator[bytes]:
        """Send one request; yield the payload of every reply until the kernel says it is done (an ack, an
        error, NLMSG_DONE, or the one reply to a plain GET). Raises OSError with the kernel's errno."""
        sock = self._socket()
        self._seq += 1
        seq = self._seq
        sock.send(netlink.request(mtype, payload, seq, flags))
        replies: list[bytes] = []
        while True:
            for message in netlink.messages(sock.recv(_RECV)):
                if message.seq != seq:
                    continue  # an answer to an earlier request that timed out
                if message.type == netlink.NLMSG_ERROR:
                    if message.error:
                        raise OSError(message.error, os.strerror(message.error))
                    return  # the acknowledgement
                if message.type == netlink.NLMSG_DONE:
                    yield from replies
                    return
                replies.append(message.payload)
                if not flags & NLM_F_DUMP and not flags & NLM_F_ACK:
                    yield from replies
                    return

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, netlink.NETLINK_ROUTE
            )
            sock.settimeout(_TIMEOUT)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock


def _link(payload: bytes) -> tuple[int, int, dict[int, bytes]]:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    return index, flags, dict(netlink.attributes(payload, _IFINFOMSG.size))


def _kind(linkinfo: bytes) -> str | None:
    return netlink.attribute_string(linkinfo, 0, IFLA_INFO_KIND)


def _address(index: int, address: Address, flags: int) -> bytes:
    family = socket.AF_INET if address.ip.version == 4 else socket.AF_INET6
    packed = address.ip.packed
    body = _IFADDRMSG.pack(family, address.prefixlen, flags & 0xFF, 0, index) + attribute(IFA_LOCAL, packed)
    return body + attribute(IFA_ADDRESS, packed) + attribute(IFA_FLAGS, _U32.pack(flags))
