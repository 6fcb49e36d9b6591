"""Just enough raw netlink to write requests and walk replies: the one message walker of the agent.

The rtnetlink requests, the change watchers, the nf_tables generation check and the sock_diag reader all
walk netlink messages and attributes through :func:`messages` and :func:`attributes`; none parses headers
or alignment on its own. A raw socket and ``struct`` do that without a library's parsing cost per message.
Formats: ``linux/netlink.h`` (``struct nlmsghdr``, ``struct nlattr``, ``NLMSG_ALIGN``, ``NLA_ALIGN``).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")  # struct nlmsgerr starts with the negated errno (0: an acknowledgement)
_NLA_TYPE_MASK = 0x3FFF  # without the NESTED and NET_BYTEORDER flags


def align(n: int) -> int:
    """Messages and attributes start on 4-byte boundaries (NLMSG_ALIGN and NLA_ALIGN are the same)."""
    return (n + 3) & ~3


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: its header's fields and its payload (what follows the 16-byte header)."""

    type: int
    flags: int
    seq: int
    payload: bytes

    @property
    def error(self) -> int:
        """The errno an ``NLMSG_ERROR`` message carries, positive; 0 for an acknowledgement. One too short
        to carry a code is EBADMSG, never taken for an acknowledgement."""
        if len(self.payload) < _ERRNO.size:
            return errno.EBADMSG
        return -int(_ERRNO.unpack_from(self.payload)[0])


def messages(data: bytes) -> Iterator[Message]:
    """Each message of one datagram, in order. A message whose length is shorter than its header or runs
    past the end of ``data`` ends the walk: a truncated tail is ignored, never read as another message."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield Message(mtype, flags, seq, data[offset + NLMSGHDR.size : offset + length])
        offset += align(length)


def attributes(payload: bytes, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute after a fixed header of ``start`` bytes; the type without its NESTED
    and byte-order flags. A nested attribute's value is walked with ``attributes(value)``."""
    offset = start
    while offset + NLATTR.size <= len(payload):
        length, atype = NLATTR.unpack_from(payload, offset)
        if length < NLATTR.size or offset + length > len(payload):
            return
        yield atype & _NLA_TYPE_MASK, payload[offset + NLATTR.size : offset + length]
        offset += align(length)


def attribute_string(payload: bytes, start: int, wanted: int) -> str | None:
    """The first attribute of type ``wanted`` as a NUL-terminated string; None when there is none."""
    for atype, value in attributes(payload, start):
        if atype == wanted:
            return value.split(b"\0", 1)[0].decode(errors="replace")
    return None


def attribute(atype: int, value: bytes) -> bytes:
    """One attribute, padded to the next 4-byte boundary (its length field excludes the padding)."""
    header = NLATTR.pack(NLATTR.size + len(value), atype)
    return (header + value).ljust(align(len(header) + len(value)), b"\0")


def request(mtype: int, payload: bytes, seq: int, flags: int = 0) -> bytes:
    """One request message (``NLM_F_REQUEST`` always set, plus ``flags``), port id 0: to the kernel."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), mtype, NLM_F_REQUEST | flags, seq, 0) + payload


def subscribe(protocol: int, groups: tuple[int, ...]) -> socket.socket:
    """A non-blocking netlink socket receiving the given multicast groups (group numbers, not masks)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, group)
    except OSError:
        sock.close()
        raise
    return sock


_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
