"""Cheap change detection: the legacy chain hash, the watchers' message filters, the reconcile schedule."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from agent.node.fingerprint import chain_bytes
from agent.node.interface import Interface
from agent.node.links import Address
from agent.node.netwatch import InterfaceWatcher, NftablesWatcher
from agent.node.packetfilter import PacketFilter
from agent.node.reconcile import NetworkReconciler
from agent.node.xtables import Xtables
from agent.observe.metrics import Metrics
from agent.settings import Settings
from tests.unit.fakes import FakeIptables, FakeNetlink, sample

HEADER = {4: 112, 6: 168}  # sizeof(struct ipt_entry), sizeof(struct ip6t_entry)
OFFSETS = {4: (88, 92, 96), 6: (140, 144, 152)}  # target_offset, comefrom, counters


def entry(
    family: int, *, verdict: int, name: bytes = b"", counters: int = 0, comefrom: int = 0, dst: int = 0
) -> bytes:
    """One x_tables entry with a standard (or named) target: ip header, no matches, a 40-byte target."""
    header, target_size = HEADER[family], 40
    e = bytearray(header + target_size)
    struct.pack_into("=I", e, 4, dst)  # part of the address match
    target_offset_at, comefrom_at, counters_at = OFFSETS[family]
    struct.pack_into("=HH", e, target_offset_at, header, header + target_size)
    struct.pack_into("=I", e, comefrom_at, comefrom)
    struct.pack_into("=QQ", e, counters_at, counters, counters * 60)
    struct.pack_into("=H29s", e, header, target_size, name)
    struct.pack_into("=i", e, header + 32, verdict)
    return bytes(e)


def chain(family: int, *entries: bytes) -> tuple[bytes, int]:
    blob = b"".join(entries)
    return blob, len(blob) - len(entries[-1])  # the policy entry is the last one


def digest(family: int, *entries: bytes) -> bytes:
    blob, last = chain(family, *entries)
    return chain_bytes(blob, family, 0, last)


ACCEPT, DROP = -2, -1


def test_the_chain_hash_ignores_counters_comefrom_and_jump_offsets_in_both_families() -> None:
    for family in (4, 6):
        base = digest(family, entry(family, verdict=1024), entry(family, verdict=ACCEPT))
        busy = digest(
            family,
            entry(family, verdict=1024, counters=99, comefrom=8),
            entry(family, verdict=ACCEPT, counters=7),
        )
        moved = digest(family, entry(family, verdict=4096), entry(family, verdict=ACCEPT))
        assert base == busy == moved


def test_the_chain_hash_sees_a_changed_verdict_address_target_or_rule_count() -> None:
    for family in (4, 6):
        base = digest(family, entry(family, verdict=DROP), entry(family, verdict=ACCEPT))
        assert digest(family, entry(family, verdict=ACCEPT), entry(family, verdict=ACCEPT)) != base
        assert digest(family, entry(family, verdict=DROP, dst=7), entry(family, verdict=ACCEPT)) != base
        assert digest(family, entry(family, verdict=0, name=b"CT"), entry(family, verdict=ACCEPT)) != base
        assert digest(family, entry(family, verdict=ACCEPT)) != base


def test_the_chain_hash_reads_only_its_own_chain() -> None:
    ours = entry(4, verdict=DROP) + entry(4, verdict=ACCEPT)
    other = entry(4, verdict=DROP, dst=9)
    assert chain_bytes(ours + other, 4, 0, len(entry(4, verdict=DROP))) == chain_bytes(ours, 4, 0, 152)


def nlattr(atype: int, value: bytes) -> bytes:
    padded = value + b"\0" * (-len(value) % 4)
    return struct.pack("=HH", 4 + len(value), atype) + padded


def nft(msg: int, family: int, table: str, chain: str | None = None) -> tuple[int, bytes]:
    chain_attr = {3: 3, 5: 3, 6: 2, 8: 2}.get(msg)  # NFTA_CHAIN_NAME / NFTA_RULE_CHAIN
    payload = struct.pack("=BBH", family, 0, 0) + nlattr(1, table.encode() + b"\0")
    if chain is not None and chain_attr is not None:
        payload += nlattr(chain_attr, chain.encode() + b"\0")
    return (10 << 8) | msg, payload


def test_the_nftables_watcher_cares_only_about_our_tables_and_chains() -> None:
    w = NftablesWatcher(lambda source: None)
    ip, ip6, inet = 2, 10, 1
    assert w.relevant(*nft(8, ip, "raw", "PREROUTING"))  # a rule deleted from raw PREROUTING
    assert w.relevant(*nft(6, ip6, "filter", "INPUT"))
    assert w.relevant(*nft(2, ip, "raw"))  # the table deleted
    assert w.relevant(*nft(5, ip6, "raw", "OUTPUT"))  # the chain deleted
    assert not w.relevant(*nft(6, ip, "nat", "KUBE-SERVICES"))
    assert not w.relevant(*nft(6, ip, "filter", "KUBE-FIREWALL"))
    assert not w.relevant(*nft(6, ip, "filter", "FORWARD"))
    assert not w.relevant(*nft(6, inet, "raw", "PREROUTING"))
    assert not w.relevant((10 << 8) | 15, struct.pack("=BBH", 0, 0, 0))  # NEWGEN
    assert not w.relevant(16, b"")  # not nf_tables at all


def link_msg(mtype: int, index: int, name: str) -> tuple[int, bytes]:
    return mtype, struct.pack("=BBHiII", 0, 0, 0, index, 0, 0) + nlattr(3, name.encode() + b"\0")


def addr_msg(mtype: int, index: int) -> tuple[int, bytes]:
    return mtype, struct.pack("=BBBBI", 2, 32, 0, 0, index)


def test_the_interface_watcher_follows_its_interface_by_index_and_name() -> None:
    w = InterfaceWatcher(lambda source: None, name="nodelocaldns")
    assert not w.relevant(*addr_msg(21, 7))  # index unknown yet: no address event is ours
    assert w.relevant(*link_msg(16, 7, "nodelocaldns"))  # created
    assert w.relevant(*addr_msg(21, 7))  # an address of it deleted
    assert not w.relevant(*addr_msg(20, 8))
    assert not w.relevant(*link_msg(16, 8, "veth1234"))
    assert w.relevant(*link_msg(17, 7, "nodelocaldns"))  # deleted
    assert not w.relevant(*addr_msg(20, 7))  # the old index is not ours any more
    assert w.relevant(*link_msg(16, 9, "nodelocaldns"))  # re-created with a new index
    assert w.relevant(*addr_msg(20, 9))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_interface_is_checked_on_a_watcher_event_or_at_the_safety_interval_not_every_tick(
    tmp_path: Path,
) -> None:
    ips = [ipaddress.ip_address("169.254.20.10")]
    nl, fake, clock = FakeNetlink(), FakeIptables(), Clock()
    iface = Interface("nodelocaldns", ips, netlink=nl)
    iface.ensure()
    metrics = Metrics()
    pf = PacketFilter(
        Settings(local_ips=tuple(ips)),
        metrics,
        xtables=Xtables("nft", tmp_path / "lock", 1.0, run=fake),
        fingerprint=fake.fingerprint,
        clock=clock,
    )
    pf.install(host_rules=False)
    r = NetworkReconciler(iface, pf, metrics, full_check_interval=60.0, clock=clock)
    assert r.reconcile() == []  # the first call checks everything
    nl.calls.clear()
    nl.addrs[nl.links["nodelocaldns"].index].clear()
    clock.now = 30.0
    assert r.reconcile() == [] and nl.calls == []  # no event yet: the interface is not looked at
    r.note_change("interface")
    assert r.reconcile() == ["added address 169.254.20.10/32 to nodelocaldns"]
    assert sample(metrics, "nodelocaldns_agent_rules_restored_total", what="address") == 1
    nl.addrs[nl.links["nodelocaldns"].index].clear()
    clock.now = 30.0 + 60.0
    assert r.reconcile() == ["added address 169.254.20.10/32 to nodelocaldns"]  # the safety check
    assert Address(ips[0], 32) in nl.addrs[nl.links["nodelocaldns"].index]
