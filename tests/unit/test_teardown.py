"""Leftover removal at start: both backends, both families, only tagged rules, missing binaries skipped."""

from __future__ import annotations

from pathlib import Path

from agent.config import Settings
from agent.metrics import Metrics
from agent.teardown import remove_leftover_rules
from agent.xtables import Xtables, XtablesUnavailableError
from tests.unit.fakes import FakeIptables

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
