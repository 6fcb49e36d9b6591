"""What the interface reads and changes through netlink: the Link and Address records and the seam.

:class:`Netlink` is the interface's seam to the kernel: :class:`agent.node.rtnetlink.RtNetlink` implements
it on a raw socket, unit tests give a recording fake. Both :mod:`agent.node.interface` and
:mod:`agent.node.rtnetlink` import this module, and neither imports the other's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.settings import IPAddress


@dataclass(frozen=True)
class Link:
    index: int
    kind: str | None
    up: bool
    ports: int  # links enslaved to this one (a bridge's ports)


@dataclass(frozen=True)
class Address:
    ip: IPAddress
    prefixlen: int


class Netlink(Protocol):
    """The few netlink calls the interface needs; raises OSError with the kernel's errno."""

    def find_link(self, name: str) -> Link | None: ...
    def add_link(self, name: str, kind: str) -> None: ...
    def set_up(self, index: int) -> None: ...
    def addresses(self, index: int) -> list[Address]: ...
    def add_address(self, index: int, address: Address, flags: int) -> None: ...
    def delete_address(self, index: int, address: Address) -> None: ...
    def delete_link(self, index: int) -> None: ...
    def close(self) -> None: ...
