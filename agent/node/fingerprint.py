"""Cheap in-process answers to "did the rules change since I last looked?", so reconcile forks nothing
while nothing changed.

- legacy (x_tables): no change notifications exist, so the chains the agent writes to are read straight
  from the kernel with two ``getsockopt`` calls per table (what libiptc does) and hashed without their
  packet counters and jump offsets: about 35 µs a table, no process started.
- nft (nf_tables): the kernel numbers every ruleset transaction; one netlink request reads that generation
  (about 5 µs). Any change, even in another table, moves it; reconcile then reads and finds nothing to do.

A fingerprint is compared only with an earlier one of the same kind; None means "cannot tell", which
reconcile treats as "changed".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import socket
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.node import netlink
from agent.node.rules import CHAINS, TABLES, Family

_HOOKS = {"PREROUTING": 0, "INPUT": 1, "FORWARD": 2, "OUTPUT": 3, "POSTROUTING": 4}
_SO_GET_INFO = 64  # IPT_SO_GET_INFO / IP6T_SO_GET_INFO
_SO_GET_ENTRIES = 65
_GETINFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GET_ENTRIES_HEADER = 40  # char name[32]; unsigned int size; padded to the entries' 8-byte alignment


@dataclass(frozen=True)
class _EntryLayout:
    """Offsets inside ``struct ipt_entry`` / ``struct ip6t_entry`` (x86-64 and arm64 alike)."""

    target_offset: int
    next_offset: int
    comefrom: int
    counters: int


_LAYOUT = {4: _EntryLayout(88, 90, 92, 96), 6: _EntryLayout(140, 142, 144, 152)}
_STANDARD_TARGET_NAME = 2  # struct xt_entry_target: __u16 target_size; char name[29]; __u8 revision
_STANDARD_VERDICT = 32


class Fingerprint(Protocol):
    def __call__(self, family: Family) -> Hashable | None: ...


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@dataclass
class LegacyFingerprint:
    """Hash of the built-in chains the agent uses (raw PREROUTING/OUTPUT, filter INPUT/OUTPUT).

    Only tables listed in /proc/net/ip{,6}_tables_names are read: asking the kernel for a table that does
    not exist yet would create it. A legacy table, once there, stays until its namespace goes, so the list
    is read only until both tables were seen."""

    proc_net: Path = Path("/proc/net")
    _libc: ctypes.CDLL = field(default_factory=_libc, repr=False)
    _seen: dict[Family, set[str]] = field(default_factory=dict, repr=False)

    def _existing(self, family: Family) -> set[str]:
        seen = self._seen.setdefault(family, set())
        if not seen.issuperset(TABLES):
            names = self.proc_net / ("ip_tables_names" if family == 4 else "ip6_tables_names")
            with contextlib.suppress(FileNotFoundError):
                seen |= set(names.read_text().split())
        return seen

    def __call__(self, family: Family) -> Hashable | None:
        try:
            existing = self._existing(family)
        except OSError:
            return None
        af, level = (
            (socket.AF_INET, socket.IPPROTO_IP) if family == 4 else (socket.AF_INET6, socket.IPPROTO_IPV6)
        )
        digest = hashlib.blake2b(digest_size=16)
        try:
            with socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
                for table in TABLES:
                    digest.update(table.encode() + b"\0")
                    if table in existing:
                        digest.update(self._table_bytes(sock.fileno(), level, family, table))
        except OSError:
            return None
        return digest.digest()

    def _getsockopt(self, fd: int, level: int, option: int, buf: ctypes.Array[ctypes.c_char]) -> None:
        size = ctypes.c_uint32(len(buf))
        if self._libc.getsockopt(fd, level, option, buf, ctypes.byref(size)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"getsockopt: {errno.errorcode.get(code, code)}")

    def _table_bytes(self, fd: int, level: int, family: Family, table: str) -> bytes:
        info = ctypes.create_string_buffer(table.encode(), _GETINFO.size)
        self._getsockopt(fd, level, _SO_GET_INFO, info)
        _, valid_hooks, *rest = _GETINFO.unpack(info.raw)
        hook_entry, underflow, size = rest[0:5], rest[5:10], rest[11]
        entries = ctypes.create_string_buffer(_GET_ENTRIES_HEADER + size)
        struct.pack_into("=32sI", entries, 0, table.encode(), size)
        self._getsockopt(fd, level, _SO_GET_ENTRIES, entries)
        blob = entries.raw[_GET_ENTRIES_HEADER:]
        out = b""
        for chain in CHAINS[table]:
            hook = _HOOKS[chain]
            if valid_hooks & (1 << hook):
                out += chain.encode() + b"\0" + chain_bytes(blob, family, hook_entry[hook], underflow[hook])
        return out


def chain_bytes(blob: bytes, family: Family, first: int, last: int) -> bytes:
    """The entries of one built-in chain (``first`` to its policy entry at ``last``) without what changes
    when no rule does: packet counters, the kernel's ``comefrom`` mark and jump offsets (which move when any
    user chain grows). Each entry keeps its own lengths, so the concatenation is unambiguous."""
    layout = _LAYOUT[family]
    view = memoryview(blob)
    skip_from, skip_to = layout.comefrom, layout.counters + 16
    parts: list[memoryview] = []
    offset = first
    while offset <= last and offset + skip_to <= len(blob):
        target_offset, next_offset = struct.unpack_from("=HH", blob, offset + layout.target_offset)
        if next_offset == 0:
            break
        end = offset + next_offset
        parts.append(view[offset : offset + skip_from])
        target = offset + target_offset
        verdict_at = target + _STANDARD_VERDICT
        if (
            verdict_at + 4 <= end
            and blob[target + _STANDARD_TARGET_NAME] == 0  # the standard target: a verdict or a jump
            and struct.unpack_from("=i", blob, verdict_at)[0] >= 0  # a jump: an offset, not a verdict
        ):
            parts += [view[offset + skip_to : verdict_at], view[verdict_at + 4 : end]]
        else:
            parts.append(view[offset + skip_to : end])
        offset = end
    return b"".join(parts)


_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETGEN = 16
_NFT_MSG_NEWGEN = 15
_NFTA_GEN_ID = 1


@dataclass
class NftGeneration:
    """The nf_tables ruleset generation of this network namespace (moves on every nf_tables transaction)."""

    _seq: int = 0

    def __call__(self, family: Family) -> Hashable | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        nfgenmsg = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        msg = netlink.request((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN, nfgenmsg, self._seq)
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink.NETLINK_NETFILTER) as sock:
                sock.settimeout(1.0)
                sock.bind((0, 0))
                sock.send(msg)
                data = sock.recv(4096)
        except OSError:
            return None
        for message in netlink.messages(data):
            if message.type == (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWGEN:
                for atype, value in netlink.attributes(message.payload, 4):
                    if atype == _NFTA_GEN_ID and len(value) >= 4:
                        return int(struct.unpack(">I", value[:4])[0])
        return None
