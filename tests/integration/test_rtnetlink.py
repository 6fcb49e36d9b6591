"""The interface's raw rtnetlink requests against the real kernel, in a network namespace of their own,
checked with iproute2's own view of the result."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from harness import sandbox as sb
from harness.agentproc import REPO

# Runs inside the namespace: every request of the seam, printing what it saw as JSON lines.
SCRIPT = r"""
import errno, ipaddress, json, subprocess
from agent.node.interface import IFA_F_NODAD
from agent.node.links import Address
from agent.node.rtnetlink import RtNetlink

nl = RtNetlink()
def say(**kw): print(json.dumps(kw), flush=True)
def errno_of(call, *args):
    try:
        call(*args)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return None

say(missing=nl.find_link("nld0") is None)
say(dummy=errno_of(nl.add_link, "nld0", "dummy") or "created")
if nl.find_link("nld0") is None:
    nl.add_link("nld0", "bridge")
link = nl.find_link("nld0")
say(kind=link.kind, up=link.up, ports=link.ports)
say(again=errno_of(nl.add_link, "nld0", link.kind))
nl.set_up(link.index)
v4 = Address(ipaddress.ip_address("169.254.20.10"), 32)
v6 = Address(ipaddress.ip_address("fd00::10"), 128)
nl.add_address(link.index, v4, 0)
nl.add_address(link.index, v6, IFA_F_NODAD)
say(duplicate=errno_of(nl.add_address, link.index, v4, 0))
def kernels(a): return a.ip.version == 6 and a.ip.is_link_local  # fe80:: of an up link
def ours(): return sorted(f"{a.ip}/{a.prefixlen}" for a in nl.addresses(link.index) if not kernels(a))
say(addresses=ours(), linklocal=any(kernels(a) for a in nl.addresses(link.index)))
subprocess.run(["ip", "link", "add", "nldport", "type", "veth", "peer", "name", "nldpeer"], check=True)
subprocess.run(["ip", "link", "set", "nldport", "master", "nld0"], check=True)
say(up=nl.find_link("nld0").up, ports=nl.find_link("nld0").ports)
subprocess.run(["ip", "link", "del", "nldport"], check=True)
nl.delete_address(link.index, v4)
say(absent=errno_of(nl.delete_address, link.index, v4))
say(left=ours())
nl.delete_link(link.index)
say(gone=nl.find_link("nld0") is None, twice=errno_of(nl.delete_link, link.index))
nl.close()
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"{sb.PREFIX}-{secrets.token_hex(3)}-rtnl"
    sb.run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        sb.remove_namespace(name)


def test_every_request_the_interface_needs_works_on_the_real_kernel(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    seen = {k: v for line in out.splitlines() for k, v in json.loads(line).items()}
    assert seen["missing"] is True
    # This machine's kernel has no dummy driver; where it has one, the link is a dummy.
    assert seen["dummy"] in ("created", "EOPNOTSUPP", "ENOTSUP")  # one errno, two names
    assert seen["kind"] == ("dummy" if seen["dummy"] == "created" else "bridge")
    assert seen["again"] == "EEXIST"
    assert seen["duplicate"] == "EEXIST"
    assert seen["addresses"] == ["169.254.20.10/32", "fd00::10/128"]
    assert seen["linklocal"] is True  # the kernel's own fe80:: address of an up link, listed like the rest
    assert seen["up"] is True
    assert seen["ports"] == (1 if seen["kind"] == "bridge" else 0)
    assert seen["absent"] == "EADDRNOTAVAIL"
    assert seen["left"] == ["fd00::10/128"]
    assert seen["gone"] is True and seen["twice"] == "ENODEV"


def test_an_ipv6_address_added_without_dad_is_usable_at_once(netns: str) -> None:
    script = (
        "import ipaddress, socket\n"
        "from agent.node.interface import IFA_F_NODAD\n"
        "from agent.node.links import Address\n"
        "from agent.node.rtnetlink import RtNetlink\n"
        "nl = RtNetlink()\n"
        "nl.add_link('nld1', 'bridge'); i = nl.find_link('nld1').index; nl.set_up(i)\n"
        "nl.add_address(i, Address(ipaddress.ip_address('fd00::10'), 128), IFA_F_NODAD)\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('fd00::10', 53)); print('bound')\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "bound"
    flags = json.loads(sb.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "nld1"]))
    info = [a for a in flags[0]["addr_info"] if a["local"] == "fd00::10"]
    assert info and not info[0].get("tentative") and info[0].get("nodad") is True
