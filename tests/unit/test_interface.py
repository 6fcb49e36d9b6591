"""The interface against a recording netlink fake: create, fall back to a bridge, never touch others."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from agent.node.interface import IFA_F_NODAD, Interface, InterfaceError
from agent.node.links import Address, Link
from agent.observe.metrics import Metrics
from tests.unit.fakes import FakeNetlink, sample

IPS = [ipaddress.ip_address(i) for i in ("169.254.20.10", "fd00::10")]


def make(nl: FakeNetlink, metrics: Metrics | None = None) -> Interface:
    return Interface("nodelocaldns", IPS, metrics, netlink=nl)


def test_ensure_creates_a_dummy_sets_it_up_and_adds_ipv6_without_dad() -> None:
    nl = FakeNetlink()
    changes = make(nl).ensure()
    assert changes == [
        "created interface nodelocaldns (dummy)",
        "set interface nodelocaldns up",
        "added address 169.254.20.10/32 to nodelocaldns",
        "added address fd00::10/128 to nodelocaldns",
    ]
    index = nl.links["nodelocaldns"].index
    assert ("add_address", index, "169.254.20.10", 32, 0) in nl.calls
    assert ("add_address", index, "fd00::10", 128, IFA_F_NODAD) in nl.calls


def test_ensure_is_idempotent_and_check_reports_nothing_missing() -> None:
    nl = FakeNetlink()
    iface = make(nl)
    iface.ensure()
    calls = len(nl.calls)
    assert iface.ensure() == []
    assert iface.check() == []
    assert not [c for c in nl.calls[calls:] if c[0] not in ("find_link", "addresses")]


def test_without_a_dummy_driver_an_empty_bridge_is_used_with_one_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nl = FakeNetlink(unsupported_kinds={"dummy"})
    iface = make(nl)
    assert iface.ensure()[0] == "created interface nodelocaldns (bridge)"
    nl.delete_link(nl.links["nodelocaldns"].index)
    assert iface.ensure()[0] == "created interface nodelocaldns (bridge)"
    assert [c for c in nl.calls if c[0] == "add_link"] == [
        ("add_link", "nodelocaldns", "dummy"),
        ("add_link", "nodelocaldns", "bridge"),
        ("add_link", "nodelocaldns", "bridge"),
    ]
    assert capsys.readouterr().out.count("no dummy link driver") == 1


def test_check_names_what_is_missing_and_ensure_restores_it() -> None:
    nl = FakeNetlink()
    iface = make(nl)
    iface.ensure()
    index = nl.links["nodelocaldns"].index
    nl.addrs[index].remove(Address(IPS[1], 128))
    nl.links["nodelocaldns"] = Link(index, "dummy", up=False, ports=0)
    assert iface.check() == ["interface nodelocaldns is down", "address fd00::10/128 is missing"]
    assert iface.ensure() == ["set interface nodelocaldns up", "added address fd00::10/128 to nodelocaldns"]
    nl.links.clear()
    assert iface.check() == ["interface nodelocaldns is missing"]


def test_stale_addresses_are_removed_but_link_local_ones_are_kept() -> None:
    nl = FakeNetlink()
    nl.links["nodelocaldns"] = Link(3, "bridge", up=True, ports=0)
    old = Address(ipaddress.ip_address("10.96.0.99"), 32)
    link_local = Address(ipaddress.ip_address("fe80::1"), 64)
    nl.addrs[3] = [old, link_local]
    iface = make(nl)
    assert iface.check()[-1] == "stale address 10.96.0.99/32"
    assert "removed stale address 10.96.0.99/32 from nodelocaldns" in iface.ensure()
    assert link_local in nl.addrs[3]


@pytest.mark.parametrize(
    ("link", "message"),
    [
        (Link(3, "veth", up=True, ports=0), "is a veth, not a dummy or bridge"),
        (Link(3, None, up=True, ports=0), "is a device of unknown kind"),
        (Link(3, "bridge", up=True, ports=2), "is a bridge with 2 ports"),
    ],
)
def test_another_programs_interface_of_that_name_is_never_touched(link: Link, message: str) -> None:
    nl = FakeNetlink(links={"nodelocaldns": link})
    metrics = Metrics()
    iface = make(nl, metrics)
    for action in (iface.ensure, iface.remove):
        with pytest.raises(InterfaceError, match=message):
            action()
    assert [c[0] for c in nl.calls] == ["find_link", "find_link"]
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="interface_add") == 1


def test_errors_name_the_action_and_the_errno() -> None:
    nl = FakeNetlink(refuse={"add_link": errno.EPERM})
    with pytest.raises(
        InterfaceError, match=r"create dummy interface nodelocaldns: .*CAP_NET_ADMIN \(EPERM\)"
    ):
        make(nl).ensure()
    nl = FakeNetlink(refuse={"addresses": errno.ENODEV}, links={"nodelocaldns": Link(3, "dummy", True, 0)})
    metrics = Metrics()
    with pytest.raises(InterfaceError, match=r"list addresses of nodelocaldns: .*deleted it\) \(ENODEV\)"):
        make(nl, metrics).check()
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="interface_check") == 1


def test_an_address_that_appeared_meanwhile_is_not_an_error() -> None:
    nl = FakeNetlink(refuse={"add_address": errno.EEXIST})
    assert len(make(nl).ensure()) == 4


def test_remove_deletes_addresses_then_the_link_and_is_idempotent() -> None:
    nl = FakeNetlink()
    iface = make(nl)
    iface.ensure()
    index = nl.links["nodelocaldns"].index
    nl.calls.clear()
    assert iface.remove() == [
        "removed address 169.254.20.10/32 from nodelocaldns",
        "removed address fd00::10/128 from nodelocaldns",
        "deleted interface nodelocaldns",
    ]
    assert [c[0] for c in nl.calls] == [
        "find_link",
        "addresses",
        "delete_address",
        "delete_address",
        "delete_link",
    ]
    assert nl.links == {} and index not in nl.addrs
    assert iface.remove() == []


def test_close_closes_the_netlink_seam() -> None:
    nl = FakeNetlink()
    with make(nl):
        pass
    assert nl.closed
