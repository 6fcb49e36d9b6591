"""Teardown in one place: leftover removal at start (both backends, both families, only tagged rules, missing
binaries skipped), the shutdown's steps, and the cheap ``--teardown`` command."""

from __future__ import annotations

import errno
import ipaddress
import subprocess
import sys
import time
from pathlib import Path

from agent.node import teardown
from agent.node.interface import Interface
from agent.node.packetfilter import PacketFilter
from agent.node.teardown import remove_leftover_rules
from agent.node.xtables import Xtables, XtablesUnavailableError
from agent.observe.metrics import Metrics
from agent.settings import Settings
from tests.unit.fakes import FakeIptables, FakeNetlink, sample

REPO = Path(__file__).resolve().parents[2]

TAGGED = '-d 10.96.0.10/32 -p udp -m comment --comment "NodeLocal DNS agent: host queries" -j CT --notrack'
FOREIGN = "-p udp -m udp --dport 53 -j DROP"


def backends(fake: FakeIptables, proc_net: Path) -> list[Xtables]:
    for names in ("ip_tables_names", "ip6_tables_names"):
        (proc_net / names).write_text("raw\n")
    return [
        Xtables("legacy", proc_net / "lock", 1.0, run=fake, proc_net=proc_net),
        Xtables("nft", proc_net / "lock", 1.0, run=fake),
    ]


def test_leftovers_are_removed_from_both_backends_and_families_and_foreign_rules_stay(tmp_path: Path) -> None:
    fake = FakeIptables()
    for mode, family in (("legacy", 4), ("nft", 6), ("nft", 4)):
        fake.add_foreign(mode, family, "raw", "OUTPUT", FOREIGN)
        fake.add_foreign(mode, family, "raw", "OUTPUT", TAGGED)
    changes = remove_leftover_rules(Settings(), Metrics(), backends=backends(fake, tmp_path))
    assert len(changes) == 3
    for key, chains in fake.tables.items():
        assert chains["OUTPUT"] == [FOREIGN], key
    assert remove_leftover_rules(Settings(), Metrics(), backends=backends(fake, tmp_path)) == []


def test_nothing_is_written_where_nothing_of_ours_is(tmp_path: Path) -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "filter", "INPUT", FOREIGN)
    remove_leftover_rules(Settings(), Metrics(), backends=backends(fake, tmp_path))
    assert not [c for c in fake.calls if c[0].endswith("-restore")]


def test_a_backend_without_binaries_is_skipped(tmp_path: Path) -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "raw", "OUTPUT", TAGGED)

    def no_legacy(argv, **kw):  # type: ignore[no-untyped-def]
        if "legacy" in argv[0]:
            raise XtablesUnavailableError(f"cannot run {argv[0]}: not installed")
        return fake(argv, **kw)

    found = backends(fake, tmp_path)
    found[0].run = no_legacy
    assert len(remove_leftover_rules(Settings(), Metrics(), backends=found)) == 1


def test_nothing_is_touched_when_the_agent_does_not_manage_rules(tmp_path: Path) -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "raw", "OUTPUT", TAGGED)
    assert (
        remove_leftover_rules(Settings(setup_iptables=False), Metrics(), backends=backends(fake, tmp_path))
        == []
    )
    assert fake.calls == []


NODE_CACHE_V4 = [
    # As iptables-save prints what node-cache writes (checked against both backends), for 169.254.20.10.
    ("raw", "PREROUTING", "-d 169.254.20.10/32 -p udp -m udp --dport 53", "skip conntrack", "NOTRACK"),
    ("raw", "PREROUTING", "-d 169.254.20.10/32 -p tcp -m tcp --dport 53", "skip conntrack", "NOTRACK"),
    ("filter", "INPUT", "-d 169.254.20.10/32 -p udp -m udp --dport 53", "allow DNS traffic", "ACCEPT"),
    ("raw", "OUTPUT", "-s 169.254.20.10/32 -p tcp -m tcp --sport 53", "skip conntrack", "NOTRACK"),
    ("filter", "OUTPUT", "-s 169.254.20.10/32 -p tcp -m tcp --sport 53", "allow DNS traffic", "ACCEPT"),
    ("raw", "OUTPUT", "-d 169.254.20.10/32 -p udp -m udp --dport 53", "skip conntrack", "NOTRACK"),
    ("raw", "OUTPUT", "-d 169.254.20.10/32 -p tcp -m tcp --dport 8080", "skip conntrack", "NOTRACK"),
    ("raw", "OUTPUT", "-s 169.254.20.10/32 -p tcp -m tcp --sport 8080", "skip conntrack", "NOTRACK"),
]
NEAR_MISSES = [
    # Another address, another port, an extra match, another comment: not node-cache's rules for this node.
    ("raw", "PREROUTING", "-d 169.254.20.11/32 -p udp -m udp --dport 53", "skip conntrack", "NOTRACK"),
    ("raw", "PREROUTING", "-d 169.254.20.10/32 -p udp -m udp --dport 5353", "skip conntrack", "NOTRACK"),
    (
        "raw",
        "PREROUTING",
        "-d 169.254.20.10/32 -p udp -m udp --dport 53 -m socket",
        "skip conntrack",
        "NOTRACK",
    ),
    ("filter", "INPUT", "-d 169.254.20.10/32 -p udp -m udp --dport 53", "allow DNS", "ACCEPT"),
]


def spec(match: str, comment: str, target: str) -> str:
    return f'{match} -m comment --comment "NodeLocal DNS Cache: {comment}" -j {target}'


def test_node_cache_rules_are_removed_in_both_backends_and_families_counted_and_nothing_else(
    tmp_path: Path,
) -> None:
    fake = FakeIptables()
    settings = Settings(local_ips=(ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("fd00::10")))
    v6 = [(t, c, m.replace("169.254.20.10/32", "fd00::10/128"), k, g) for t, c, m, k, g in NODE_CACHE_V4]
    for mode in ("legacy", "nft"):
        for family, rules in ((4, NODE_CACHE_V4), (6, v6)):
            for table, chain, match, comment, target in [*rules, *NEAR_MISSES]:
                fake.add_foreign(mode, family, table, chain, spec(match, comment, target))
    fake.add_foreign("nft", 4, "raw", "PREROUTING", spec(*NODE_CACHE_V4[0][2:]))  # node-cache's duplicates
    metrics = Metrics()
    found = backends(fake, tmp_path)
    for names in ("ip_tables_names", "ip6_tables_names"):
        (tmp_path / names).write_text("raw\nfilter\n")
    changes = remove_leftover_rules(settings, metrics, backends=found)
    assert len(changes) == 2 * 2 * len(NODE_CACHE_V4) + 1
    assert sample(metrics, "nodelocaldns_agent_node_cache_rules_removed_total") == len(changes)
    for (mode, family, table), chains in fake.tables.items():
        left = sorted(s for specs in chains.values() for s in specs)
        assert left == sorted(spec(m, k, g) for t, _c, m, k, g in NEAR_MISSES if t == table), (mode, family)


def test_node_cache_rules_of_other_ports_follow_the_flags(tmp_path: Path) -> None:
    fake = FakeIptables()
    settings = Settings(local_ips=(ipaddress.ip_address("169.254.20.10"),), dns_port=5353, health_port=9090)
    moved = spec("-d 169.254.20.10/32 -p udp -m udp --dport 5353", "skip conntrack", "NOTRACK")
    health = spec("-s 169.254.20.10/32 -p tcp -m tcp --sport 9090", "skip conntrack", "NOTRACK")
    default = spec("-d 169.254.20.10/32 -p udp -m udp --dport 53", "skip conntrack", "NOTRACK")
    for rule in (moved, health, default):
        fake.add_foreign("nft", 4, "raw", "PREROUTING" if "--dport" in rule else "OUTPUT", rule)
    assert len(remove_leftover_rules(settings, Metrics(), backends=backends(fake, tmp_path))) == 2
    assert fake.chain("nft", 4, "raw", "PREROUTING") == [default]


def test_a_shutdown_step_that_fails_is_logged_and_reported_not_raised(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True)
    fake.add_foreign("legacy", 4, "raw", "OUTPUT", TAGGED)
    (xtables,) = backends(fake, tmp_path)[:1]
    pf = PacketFilter(Settings(), Metrics(), xtables=xtables, fingerprint=fake.fingerprint)
    assert teardown.remove_rules(pf, deadline=time.monotonic() + 5) is False
    assert teardown.remove_host_rules(None, deadline=time.monotonic() + 5) is True
    fake.lock_busy = False
    assert teardown.remove_rules(pf, deadline=time.monotonic() + 5) is True
    assert fake.tables[("legacy", 4, "raw")]["OUTPUT"] == []


def test_the_interface_is_closed_whether_or_not_its_removal_succeeds() -> None:
    netlink = FakeNetlink(refuse={"delete_link": errno.EPERM})
    interface = Interface("nodelocaldns", [ipaddress.ip_address("169.254.20.10")], netlink=netlink)
    interface.ensure()
    assert teardown.remove_interface(interface) is False and netlink.closed
    netlink.refuse.clear()
    assert teardown.remove_interface(interface) is True and "nodelocaldns" not in netlink.links
    assert teardown.remove_interface(None) is True


def test_the_teardown_command_stays_cheap_to_import() -> None:
    heavy = ("agent.node", "prometheus_client", "structlog")
    code = (
        f"import sys, agent.commands.teardown; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
