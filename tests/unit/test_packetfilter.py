"""The packet-filter facade against a recording model of iptables: converge, cheap reconcile, the lock."""

from __future__ import annotations

import dataclasses
import ipaddress
import threading
import time
from pathlib import Path

import pytest

from agent.node.packetfilter import PacketFilter
from agent.node.rules import wanted_rules
from agent.node.xtables import (
    Mode,
    PacketFilterError,
    PacketFilterInterruptError,
    Result,
    Xtables,
    XtablesLockError,
)
from agent.observe.metrics import Metrics
from agent.settings import Settings
from tests.unit.fakes import FakeIptables, sample

IPS = ("169.254.20.10", "10.96.0.10", "fd00::10")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(*ips: str, **kw: object) -> Settings:
    return Settings(local_ips=tuple(ipaddress.ip_address(i) for i in ips or IPS), **kw)  # type: ignore[arg-type]


def make(
    fake: FakeIptables, *, proc_net: Path | None = None, clock: Clock | None = None, **kw: object
) -> tuple[PacketFilter, Metrics]:
    """nft unless ``proc_net`` (where the legacy table names are listed) is given."""
    s = settings(**kw)
    metrics = Metrics()
    mode: Mode = "nft" if proc_net is None else "legacy"
    xtables = Xtables(mode, Path("/nonexistent/xtables.lock"), s.xtables_wait, run=fake)
    if proc_net is not None:
        for names in ("ip_tables_names", "ip6_tables_names"):
            (proc_net / names).write_text("raw\nfilter\n")
        xtables.proc_net = proc_net
    pf = PacketFilter(
        s,
        metrics,
        xtables=xtables,
        fingerprint=fake.fingerprint,
        clock=clock or Clock(),
    )
    return pf, metrics


def ours(fake: FakeIptables, mode: str = "nft") -> list[tuple[int, str, str, str]]:
    return sorted(
        (family, table, chain, spec)
        for (m, family, table), chains in fake.tables.items()
        if m == mode
        for chain, specs in chains.items()
        for spec in specs
        if "NodeLocal DNS agent:" in spec
    )


def expected(host: bool, *ips: str) -> list[tuple[int, str, str, str]]:
    rules = wanted_rules(
        [ipaddress.ip_address(i) for i in ips or IPS], dns_port=53, health_port=8080, host_rules=host
    )
    return sorted((r.family, r.table, r.chain, r.spec) for r in rules)


def test_install_puts_every_rule_once_at_the_top_and_verifies() -> None:
    fake = FakeIptables()
    fake.add_foreign("nft", 4, "filter", "INPUT", "-p udp -m udp --dport 53 -j DROP")
    pf, metrics = make(fake)
    changes = pf.install(host_rules=True)
    assert ours(fake) == expected(True)
    assert len(changes) == len(expected(True))
    assert fake.tables[("nft", 4, "filter")]["INPUT"][-1] == "-p udp -m udp --dport 53 -j DROP"
    assert pf.installed and pf.host_rules
    assert sample(metrics, "nodelocaldns_agent_rules_installed", kind="host") == 1
    assert pf.install(host_rules=True) == []


def test_one_transaction_per_family_and_no_restore_when_nothing_changes() -> None:
    fake = FakeIptables()
    pf, _ = make(fake)
    pf.install(host_rules=False)
    restores = [c for c in fake.calls if c[0].endswith("-restore")]
    assert [c[0] for c in restores] == ["iptables-nft-restore", "ip6tables-nft-restore"]
    fake.calls.clear()
    pf.install(host_rules=False)
    assert not [c for c in fake.calls if c[0].endswith("-restore")]


def test_host_rules_switch_on_and_off_without_touching_the_rest() -> None:
    fake = FakeIptables()
    pf, metrics = make(fake)
    pf.install(host_rules=False)
    assert ours(fake) == expected(False)
    added = pf.set_host_rules(True)
    assert ours(fake) == expected(True) and len(added) == 6
    assert sample(metrics, "nodelocaldns_agent_rules_installed", kind="host") == 1
    assert pf.set_host_rules(True) == []
    removed = pf.set_host_rules(False)
    assert ours(fake) == expected(False) and all(c.startswith("removed") for c in removed)
    assert sample(metrics, "nodelocaldns_agent_rules_installed", kind="host") == 0


def test_host_rules_asked_before_install_wait_for_install() -> None:
    fake = FakeIptables()
    pf, _ = make(fake)
    assert pf.set_host_rules(True) == []
    assert fake.calls == []
    pf.install(host_rules=True)
    assert ours(fake) == expected(True)


def test_while_another_agent_is_alive_changes_only_add_and_alone_again_the_rules_converge() -> None:
    fake = FakeIptables()
    first, _ = make(fake)
    first.install(host_rules=True)  # the serving agent
    others = [True]
    second, _ = make(fake)
    second.others = lambda: others[0]
    second.prepare()  # a starting agent wants only its probe rules: the serving one's stay
    assert ours(fake) == expected(True)
    second.install(host_rules=False)
    assert second.set_host_rules(False) == [] and ours(fake) == expected(True)
    assert second.reconcile() == [] and ours(fake) == expected(True)
    others[0] = False  # the serving agent left: the next reconcile converges to this one's rules
    second.clock.now += 1  # type: ignore[attr-defined]
    removed = second.reconcile()
    assert ours(fake) == expected(False) and removed and all(c.startswith("removed") for c in removed)


def test_reconcile_forks_nothing_while_the_fingerprint_holds() -> None:
    fake = FakeIptables()
    clock = Clock()
    pf, _ = make(fake, clock=clock)
    pf.install(host_rules=True)
    fake.calls.clear()
    for _ in range(50):
        clock.now += 1
        assert pf.reconcile() == []
    assert fake.calls == []


def test_reconcile_restores_deleted_rules_and_removes_duplicates_and_counts_them() -> None:
    fake = FakeIptables()
    pf, metrics = make(fake)
    pf.install(host_rules=True)
    prerouting = fake.tables[("nft", 4, "raw")]["PREROUTING"]
    dup = prerouting[0]
    prerouting.clear()  # someone flushed the chain
    fake.add_foreign(
        "nft", 4, "filter", "INPUT", fake.tables[("nft", 4, "filter")]["INPUT"][0]
    )  # a duplicate
    changes = pf.reconcile()
    assert ours(fake) == expected(True)
    assert sum(c.startswith("added IPv4 raw PREROUTING") for c in changes) == 4
    assert sum(c.startswith("removed IPv4 filter INPUT") for c in changes) == 1
    assert sample(metrics, "nodelocaldns_agent_rules_restored_total", what="rule") == 4
    assert sample(metrics, "nodelocaldns_agent_rules_restored_total", what="duplicate") == 1
    assert dup in fake.tables[("nft", 4, "raw")]["PREROUTING"]


def test_a_full_check_runs_at_the_safety_interval_even_when_the_fingerprint_is_blind() -> None:
    fake = FakeIptables()
    clock = Clock()
    pf, _ = make(fake, clock=clock)
    pf.install(host_rules=False)
    fake.tables[("nft", 4, "raw")]["OUTPUT"].clear()  # a change the fingerprint does not see
    clock.now += 10
    assert pf.reconcile() == []
    clock.now += pf.full_check_interval
    raw_output_v4 = [e for e in expected(False) if e[:3] == (4, "raw", "OUTPUT")]
    assert len(pf.reconcile()) == len(raw_output_v4) == 12  # per address: replies, health, the probe pair
    assert ours(fake) == expected(False)


def test_stray_tagged_rules_of_an_earlier_configuration_are_removed_at_install() -> None:
    fake = FakeIptables()
    old = wanted_rules([ipaddress.ip_address("10.96.0.99")], dns_port=53, health_port=8080, host_rules=True)
    for r in old:
        fake.chain("nft", r.family, r.table, r.chain).append(r.spec)
    pf, _ = make(fake)
    pf.install(host_rules=False)
    assert ours(fake) == expected(False)


def test_remove_all_removes_exactly_the_tagged_rules_in_both_families_and_is_idempotent() -> None:
    fake = FakeIptables()
    foreign = '-p tcp -m comment --comment "NodeLocal DNS Cache: skip conntrack" -j NOTRACK'
    fake.add_foreign("nft", 6, "raw", "PREROUTING", foreign)
    fake.add_foreign("nft", 4, "filter", "OUTPUT", "-j ACCEPT")
    pf, metrics = make(fake)
    pf.install(host_rules=True)
    assert len(pf.remove_all()) == len(expected(True))
    assert ours(fake) == []
    assert fake.tables[("nft", 6, "raw")]["PREROUTING"] == [foreign]
    assert fake.tables[("nft", 4, "filter")]["OUTPUT"] == ["-j ACCEPT"]
    assert not pf.installed
    assert sample(metrics, "nodelocaldns_agent_rules_installed", kind="pod") == 0
    assert pf.remove_all() == []
    assert pf.reconcile() == []  # nothing wanted any more


def test_a_change_that_failed_because_rules_moved_is_planned_again_from_a_fresh_read() -> None:
    fake = FakeIptables()
    pf, metrics = make(fake)
    pf.install(host_rules=True)
    real = fake.__call__

    def racing(argv, **kw):  # type: ignore[no-untyped-def]
        if argv[0].endswith("-restore") and not racing.done:  # type: ignore[attr-defined]
            racing.done = True  # type: ignore[attr-defined]
            fake.tables[("nft", 4, "raw")]["OUTPUT"].clear()  # another program, just before our commit
        return real(argv, **kw)

    racing.done = False  # type: ignore[attr-defined]
    pf.xtables.run = racing  # type: ignore[union-attr]
    fake.tables[("nft", 4, "raw")]["PREROUTING"].pop()
    fake.version += 1
    pf.reconcile()
    assert ours(fake) == expected(True)
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="iptables") == 0


def test_a_busy_lock_is_retried_within_the_bound_counted_and_reported(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True)
    pf, metrics = make(fake, proc_net=tmp_path, xtables_wait=1.0)
    with pytest.raises(XtablesLockError):
        pf.install(host_rules=True)
    assert len(fake.inputs) == 2  # two bounded waits, then the error
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="iptables_lock") == 2
    assert not pf.installed


def test_after_a_failure_reconcile_backs_off_then_recovers_once_the_lock_is_free(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True)
    clock = Clock()
    pf, _ = make(fake, proc_net=tmp_path, clock=clock)
    with pytest.raises(XtablesLockError):
        pf.install(host_rules=False)
    fake.lock_busy = False
    calls = len(fake.calls)
    assert pf.reconcile() == []  # backing off: not even a read
    assert len(fake.calls) == calls
    clock.now += 1.0
    assert len(pf.reconcile()) == len(expected(False))
    assert pf.installed


def test_a_host_rule_removal_deferred_by_the_lock_is_a_retry_not_a_repair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeIptables()
    clock = Clock()
    pf, metrics = make(fake, proc_net=tmp_path, clock=clock)
    pf.install(host_rules=True)
    fake.lock_busy = True  # CoreDNS died while kube-proxy held the lock: the host rules could not come off
    with pytest.raises(XtablesLockError):
        pf.set_host_rules(False)
    fake.lock_busy = False
    clock.now += 1.0
    removed = pf.reconcile()
    assert removed and all("host queries" in change for change in removed)
    out = capsys.readouterr().out
    assert "changed by another program" not in out and "retry of a failed change" in out
    assert sample(metrics, "nodelocaldns_agent_rules_restored_total", what="duplicate") == 0
    assert sample(metrics, "nodelocaldns_agent_rules_restored_total", what="rule") == 0


def test_the_stop_latch_cuts_a_lock_wait_short_and_latches_but_remove_all_still_runs(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True, lock_wait=30.0)
    pf, _ = make(fake, proc_net=tmp_path, xtables_wait=30.0)
    timer = threading.Timer(0.1, pf.stop.request, args=("received SIGTERM",))
    timer.start()
    start = time.monotonic()
    with pytest.raises(PacketFilterInterruptError):
        pf.install(host_rules=True)  # would wait a minute without the latch
    timer.join()
    assert time.monotonic() - start < 5
    with pytest.raises(PacketFilterInterruptError):
        pf.reconcile(force=True)
    fake.lock_busy = False
    fake.chain("legacy", 4, "raw", "OUTPUT").append(
        '-m comment --comment "NodeLocal DNS agent: x" -j CT --notrack'
    )
    assert pf.remove_all() == [
        'removed IPv4 raw OUTPUT -m comment --comment "NodeLocal DNS agent: x" -j CT --notrack'
    ]


def test_at_shutdown_the_host_rules_come_off_despite_the_stop_latch(tmp_path: Path) -> None:
    fake = FakeIptables()
    pf, _ = make(fake, proc_net=tmp_path)
    pf.install(host_rules=True)
    assert any("host queries" in r[3] for r in ours(fake, "legacy"))
    pf.stop.request("received SIGTERM")
    with pytest.raises(PacketFilterInterruptError):
        pf.set_host_rules(False)  # the loop's own operations stop at the latch
    pf.remove_host_rules(deadline=time.monotonic() + 5)
    left = [r[3] for r in ours(fake, "legacy")]
    assert not any("host queries" in r for r in left)
    assert any("skip conntrack" in r for r in left)  # the rest stays, as -skipteardown wants


def test_rules_that_never_read_back_as_written_are_an_error_not_a_loop() -> None:
    fake = FakeIptables()
    real = fake.__call__

    def mangling(argv, **kw):  # type: ignore[no-untyped-def]
        if argv[0].endswith("-restore"):  # inserted rules read back in another spelling
            lines = kw["input"].splitlines()
            kw["input"] = "\n".join(
                x.replace("--notrack", "--notrack --zone 0") if x[:2] == "-I" else x for x in lines
            )
        return real(argv, **kw)

    pf, metrics = make(fake)
    pf.xtables.run = mangling  # type: ignore[union-attr]
    with pytest.raises(PacketFilterError, match="did not converge"):
        pf.install(host_rules=False)
    assert len([c for c in fake.calls if c[0] == "iptables-nft-restore"]) == 3
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="iptables") == 1


def test_a_failing_read_is_counted_and_reported_with_the_command_and_its_message() -> None:
    fake = FakeIptables()
    real = fake.__call__

    def broken_save(argv, **kw):  # type: ignore[no-untyped-def]
        if argv[0].endswith("-save"):
            return Result(1, "", "iptables-nft-save: can't initialize: Permission denied")
        return real(argv, **kw)

    pf, metrics = make(fake)
    pf.xtables.run = broken_save  # type: ignore[union-attr]
    with pytest.raises(PacketFilterError, match=r"iptables-nft-save -t raw exited 1: .*Permission denied"):
        pf.install(host_rules=False)
    assert sample(metrics, "coredns_nodecache_setup_errors_total", errortype="iptables") == 1
    assert not pf.installed


def test_each_operation_replaces_the_state_record_as_a_whole() -> None:
    fake = FakeIptables()
    clock = Clock()
    pf, _ = make(fake, clock=clock)
    before = pf.state
    pf.install(host_rules=True)
    after = pf.state
    assert not before.wanted and not before.installed  # the earlier record is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.wanted = False  # type: ignore[misc]
    assert after.wanted and after.pod_rules and after.host_rules and after.converged and after.installed
    assert set(after.fingerprints) == {4, 6} and after.backoff == 0.0
    assert after.next_full_check == clock.now + pf.full_check_interval
    pf.set_host_rules(False)
    assert pf.state is not after and not pf.state.host_rules and after.host_rules


def test_prepare_wants_the_probe_rules_only() -> None:
    pf, _ = make(FakeIptables())
    pf.prepare()
    assert pf.state.wanted and pf.state.converged
    assert not pf.state.pod_rules and not pf.state.host_rules and not pf.installed


def test_a_failed_change_stays_pending_in_the_state_with_a_doubling_backoff(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True)
    clock = Clock()
    pf, _ = make(fake, proc_net=tmp_path, clock=clock)
    with pytest.raises(XtablesLockError):
        pf.install(host_rules=False)
    assert pf.state.wanted and not pf.state.converged
    assert (pf.state.backoff, pf.state.retry_at) == (1.0, clock.now + 1.0)
    clock.now += 1.0
    with pytest.raises(XtablesLockError):
        pf.reconcile()
    assert (pf.state.backoff, pf.state.retry_at) == (2.0, clock.now + 2.0)
    fake.lock_busy = False
    clock.now += 2.0
    pf.reconcile()
    assert pf.state.installed and pf.state.backoff == 0.0


def test_remove_all_leaves_a_state_that_wants_nothing() -> None:
    pf, _ = make(FakeIptables())
    pf.install(host_rules=True)
    pf.remove_all()
    assert not pf.state.wanted and not pf.state.converged and not pf.installed and not pf.host_rules


def test_the_state_says_whether_the_last_change_kept_another_agents_rules() -> None:
    fake = FakeIptables()
    others = [True]
    pf, _ = make(fake)
    pf.others = lambda: others[0]
    pf.install(host_rules=False)
    assert pf.state.shared
    others[0] = False
    pf.reconcile()
    assert not pf.state.shared
