"""Just enough raw netlink to read message headers and attributes: change notifications and one request.

The watchers and the nf_tables generation check need a message's type, an interface index or a table
name, nothing more; a raw socket and ``struct`` do that without a library's parsing cost per message.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLATTR = struct.Struct("=HH")  # length, type
_NLA_TYPE_MASK = 0x3FFF  # without the NESTED and NET_BYTEORDER flags


def align(n: int) -> int:
    return (n + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each message in one datagram; a truncated tail is ignored."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield mtype, data[offset + NLMSGHDR.size : offset + length]
        offset += align(length)


def attributes(payload: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute after a fixed header of ``start`` bytes."""
    offset = start
    while offset + NLATTR.size <= len(payload):
        length, atype = NLATTR.unpack_from(payload, offset)
        if length < NLATTR.size or offset + length > len(payload):
            return
        yield atype & _NLA_TYPE_MASK, payload[offset + NLATTR.size : offset + length]
        offset += align(length)


def attribute_string(payload: bytes, start: int, wanted: int) -> str | None:
    for atype, value in attributes(payload, start):
        if atype == wanted:
            return value.split(b"\0", 1)[0].decode(errors="replace")
    return None


def request(mtype: int, payload: bytes, seq: int) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), mtype, NLM_F_REQUEST, seq, 0) + payload


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
