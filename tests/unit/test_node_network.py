"""NodeNetwork's honest names: ``join_node`` joins the agents lock and removes leftovers only when alone,
``leave_node`` says whether this agent is the node's last; its ``remove_*`` steps are teardown's."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from agent.node.interface import Interface
from agent.node.network import NodeNetwork
from agent.node.nodelock import NodeLock
from agent.node.packetfilter import PacketFilter
from agent.node.xtables import Xtables
from agent.observe.metrics import Metrics
from agent.settings import Settings
from tests.unit.fakes import FakeIptables, FakeNetlink

IPS = tuple(ipaddress.ip_address(i) for i in ("169.254.20.10", "10.96.0.10"))
LEFTOVER = '-d 10.96.0.10/32 -p udp -m comment --comment "NodeLocal DNS agent: host queries" -j CT --notrack'


def network(tmp_path: Path, fake: FakeIptables, netlink: FakeNetlink) -> NodeNetwork:
    settings = Settings(local_ips=IPS)
    metrics = Metrics()
    xtables = Xtables("nft", tmp_path / "xtables.lock", 1.0, run=fake)
    lock = NodeLock(tmp_path / "agents.lock")
    return NodeNetwork(
        settings,
        metrics,
        interface=Interface(settings.interface_name, IPS, metrics, netlink=netlink),
        packet_filter=PacketFilter(
            settings, metrics, xtables=xtables, fingerprint=fake.fingerprint, others=lock.others_alive
        ),
        leftover_backends=[xtables],
        node_lock=lock,
    )


def tagged(fake: FakeIptables) -> list[str]:
    return [s for chains in fake.tables.values() for specs in chains.values() for s in specs if "agent:" in s]


def test_joining_alone_removes_leftovers_and_leaving_last_releases_the_lock(tmp_path: Path) -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "raw", "OUTPUT", LEFTOVER)
    net = network(tmp_path, fake, FakeNetlink())
    net.join_node()
    assert tagged(fake) == []
    observer = NodeLock(tmp_path / "agents.lock")
    observer.join()
    assert observer.others_alive()  # the joined agent holds the lock
    observer.close()
    with net.leave_node(1.0) as last:
        assert last
    observer = NodeLock(tmp_path / "agents.lock")
    observer.join()
    assert not observer.others_alive()  # gone once it left
    observer.close()


def test_joining_next_to_a_live_agent_keeps_its_rules_and_leaving_is_not_last(tmp_path: Path) -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "raw", "OUTPUT", LEFTOVER)
    other = NodeLock(tmp_path / "agents.lock")
    other.join()
    try:
        net = network(tmp_path, fake, FakeNetlink())
        net.join_node()
        assert tagged(fake) == [LEFTOVER]  # the other agent's rule, not a leftover
        with net.leave_node(1.0) as last:
            assert not last
        assert not other.others_alive()
    finally:
        other.close()


def test_the_shutdown_steps_remove_rules_then_the_interface_and_never_raise(tmp_path: Path) -> None:
    fake = FakeIptables()
    netlink = FakeNetlink()
    net = network(tmp_path, fake, netlink)
    net.setup_interface()
    net.install_rules(host_rules=True)
    assert tagged(fake) and netlink.links
    net.remove_host_rules(5.0)
    assert not any("host queries" in spec for spec in tagged(fake)) and tagged(fake)
    net.remove_rules(5.0)
    assert tagged(fake) == [] and not net.rules_in_place()
    netlink.refuse["delete_link"] = errno.EPERM
    net.remove_interface()  # refused: logged, not raised
    assert netlink.closed and netlink.links
    del netlink.refuse["delete_link"]
    net.remove_interface()
    assert not netlink.links
