"""Which process holds the DNS listeners, read from /proc (no process started, a few files read).

CoreDNS binds its listeners with SO_REUSEPORT, so two CoreDNS processes on one node (a surge upgrade) share
the addresses: a probe answered on an address says that someone serves it, not that this agent's CoreDNS
does. These functions tell the two apart by socket inode: a process's sockets are the ``socket:[INODE]``
links among its open files; the network namespace's UDP and TCP tables list each socket's address, state and
inode.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.node import netlink
from agent.settings import IPAddress

_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    proto: str  # "udp" or "tcp"
    ip: IPAddress
    port: int
    inode: int


def _address(hex_address: str) -> tuple[IPAddress, int]:
    """``0A14FEA9:0035`` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
    return ipaddress.ip_address(words), int(port, 16)


def _sockets(proc: Path, proto: str) -> Iterator[list[str]]:
    """The fields of each ``proto`` socket (IPv4 and IPv6) in the network namespace of ``proc``."""
    for table in (proto, proto + "6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this namespace
        for line in lines:
            yield line.split()


def listeners(proc: Path = Path("/proc/self")) -> list[Listener]:
    """Bound UDP sockets and listening TCP sockets in the network namespace of ``proc``."""
    found: list[Listener] = []
    for proto in ("udp", "tcp"):
        for fields in _sockets(proc, proto):
            if proto == "tcp" and fields[3] != _TCP_LISTEN:
                continue
            ip, port = _address(fields[1])
            found.append(Listener(proto, ip, port, int(fields[9])))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` has open (empty when it is gone)."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def serves(
    found: Iterable[Listener], inodes: set[int], ips: Iterable[IPAddress], port: int, *, ours: bool
) -> bool:
    """Every address has a UDP and a TCP listener on ``port`` (the address itself or the wildcard) whose
    socket is among ``inodes`` (``ours``) or is not (another process's)."""
    found = list(found)
    for ip in ips:
        wildcard = ipaddress.ip_address("::" if ip.version == 6 else "0.0.0.0")
        for proto in ("udp", "tcp"):
            if not any(
                s.proto == proto and s.port == port and s.ip in (ip, wildcard) and (s.inode in inodes) == ours
                for s in found
            ):
                return False
    return True


def udp_receive_queues(proc: Path = Path("/proc/self")) -> dict[int, int]:
    """Bytes waiting to be read in each UDP socket of the network namespace of ``proc``, by inode."""
    # tx_queue:rx_queue, then the inode
    return {int(fields[9]): int(fields[4].split(":")[1], 16) for fields in _sockets(proc, "udp")}


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): the kernel's socket tables over netlink, filtered in the
# kernel, for the receive queues of the DNS sockets every 0.1 s at a few tens of microseconds a look.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_DUMP = 0x300
_INET_DIAG_REQ_BYTECODE = 1
_BC_S_GE, _BC_S_LE = 2, 3  # the local port >= / <= the operand


class UdpQueues:
    """Bytes waiting to be read in the UDP sockets bound to one port, by local address, from sock_diag: the
    kernel walks its UDP table and returns only that port's sockets. One netlink socket for the watcher's
    life; OSError when the kernel has no UDP sock_diag (``CONFIG_INET_UDP_DIAG``)."""

    def __init__(self, port: int, families: Iterable[int]) -> None:
        # The filter: sport >= port (else jump past the end: no match), then sport <= port (else no match).
        ops = struct.pack("=BBHBBHBBHBBH", _BC_S_GE, 8, 20, 0, 0, port, _BC_S_LE, 8, 12, 0, 0, port)
        bytecode = netlink.attribute(_INET_DIAG_REQ_BYTECODE, ops)
        self._requests = []
        for family in sorted(set(families)):
            # inet_diag_req_v2: family, protocol, extensions, pad, every state; the socket id left empty.
            body = struct.pack("=BBBBI", family, socket.IPPROTO_UDP, 0, 0, 0xFFFFFFFF) + bytes(48) + bytecode
            self._requests.append(netlink.request(_SOCK_DIAG_BY_FAMILY, body, 1, _NLM_F_DUMP))
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink.NETLINK_SOCK_DIAG)
        self._sock.settimeout(1.0)

    def close(self) -> None:
        self._sock.close()

    def read(self) -> dict[IPAddress, int]:
        """Bytes queued per local address, summed over the sockets bound to it (SO_REUSEPORT: several)."""
        queued: dict[IPAddress, int] = {}
        for request in self._requests:
            self._sock.send(request)
            while not self._take(self._sock.recv(65536), queued):
                pass
        return queued

    @staticmethod
    def _take(data: bytes, queued: dict[IPAddress, int]) -> bool:
        """Adds one read's messages (inet_diag_msg) to ``queued``; True at the end of the dump."""
        for message in netlink.messages(data):
            if message.type == netlink.NLMSG_DONE:
                return True
            if message.type == netlink.NLMSG_ERROR:
                raise OSError(message.error, f"sock_diag: {os.strerror(message.error)}")
            msg = message.payload
            size = 4 if msg[0] == socket.AF_INET else 16
            ip = ipaddress.ip_address(msg[8 : 8 + size])  # idiag_src
            rqueue = struct.unpack_from("=I", msg, 56)[0]  # after the id, idiag_expires
            queued[ip] = queued.get(ip, 0) + rqueue
        return False
