"""The iptables binaries: mode detection like iptables-wrappers, bounded lock waits, abortable children."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.node.xtables import (
    PacketFilterError,
    PacketFilterInterruptError,
    Result,
    Xtables,
    XtablesLockError,
    XtablesUnavailableError,
    detect_mode,
    run_command,
)
from tests.unit.fakes import FakeIptables

CANARY = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
HINT = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
FILTER = "*filter\n-A INPUT -j DROP\n"


class Outputs:
    """A runner answering each command line from a table; records what ran."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.ran: list[str] = []

    def __call__(self, argv: Sequence[str], **_: object) -> Result:
        line = " ".join(argv)
        self.ran.append(line)
        if line not in self.answers:
            return Result(1, "", "no such table")
        return Result(0, self.answers[line], "")


@pytest.mark.parametrize(
    ("answers", "mode"),
    [
        ({"iptables-nft-save -t mangle": CANARY}, "nft"),
        ({"ip6tables-nft-save -t mangle": HINT}, "nft"),
        ({"iptables-legacy-save": CANARY, "iptables-nft-save": FILTER * 5}, "legacy"),
        ({"ip6tables-legacy-save": HINT}, "legacy"),
        ({"iptables-legacy-save": "*filter\n-A INPUT -j DROP\n-A INPUT -j DROP\n"}, "legacy"),
        ({"iptables-nft-save": FILTER, "iptables-legacy-save": FILTER}, "nft"),
        ({}, "nft"),
    ],
)  # fmt: skip
def test_mode_is_detected_like_iptables_wrappers(answers: dict[str, str], mode: str) -> None:
    assert detect_mode(Outputs(answers)) == mode


def test_mode_detection_never_asks_legacy_for_a_single_table() -> None:
    runner = Outputs({})
    detect_mode(runner)
    # `iptables-legacy-save -t mangle` would create the legacy mangle table.
    assert [r for r in runner.ran if "legacy" in r and "-t" in r] == []
    assert runner.ran[0] == "iptables-nft-save -t mangle"


def test_a_missing_binary_during_detection_counts_as_no_output() -> None:
    def runner(argv: Sequence[str], **_: object) -> Result:
        if "legacy" in argv[0]:
            raise XtablesUnavailableError(f"cannot run {argv[0]}: not installed")
        return Result(0, "", "")

    assert detect_mode(runner) == "nft"


def test_restore_waits_a_bounded_whole_number_of_seconds_on_the_configured_lock_file(tmp_path: Path) -> None:
    fake = FakeIptables()
    xt = Xtables("legacy", tmp_path / "xtables.lock", lock_wait=1.5, run=fake)
    xt.restore(4, "*raw\nCOMMIT\n")
    assert fake.calls == [("iptables-legacy-restore", "--noflush", "-w", "2")]
    assert fake.envs == [{"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}]


def test_restore_never_waits_past_the_callers_deadline(tmp_path: Path) -> None:
    fake = FakeIptables()
    xt = Xtables("nft", tmp_path / "lock", lock_wait=30, run=fake)
    xt.restore(6, "*raw\nCOMMIT\n", deadline=time.monotonic() + 3.2)
    assert fake.calls == [("ip6tables-nft-restore", "--noflush", "-w", "4")]


def test_a_busy_lock_is_its_own_error_and_other_failures_quote_stderr(tmp_path: Path) -> None:
    fake = FakeIptables(lock_busy=True)
    xt = Xtables("legacy", tmp_path / "lock", lock_wait=1, run=fake)
    with pytest.raises(XtablesLockError, match="held by another program for 1s"):
        xt.restore(4, "*raw\nCOMMIT\n")
    with pytest.raises(PacketFilterError, match="line 2 failed") as failed:
        Xtables("nft", tmp_path / "lock", 1, run=FakeIptables()).restore(4, "*raw\n-D OUTPUT -j X\nCOMMIT\n")
    assert not isinstance(failed.value, XtablesLockError)


def test_legacy_tables_that_do_not_exist_are_not_read(tmp_path: Path) -> None:
    (tmp_path / "ip_tables_names").write_text("nat\nfilter\n")
    fake = FakeIptables()
    fake.chain("legacy", 4, "filter", "INPUT").append("-j ACCEPT")
    xt = Xtables("legacy", tmp_path / "lock", 1, run=fake, proc_net=tmp_path)
    assert xt.save(4, "raw") == ""
    assert xt.save(6, "filter") == ""  # no ip6_tables_names at all: no legacy IPv6 tables
    assert "-A INPUT -j ACCEPT" in xt.save(4, "filter")
    assert fake.calls == [("iptables-legacy-save", "-t", "filter")]


def test_a_child_is_killed_at_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(PacketFilterError, match="timed out"):
        run_command(["sleep", "5"], deadline=time.monotonic() + 0.2)
    assert time.monotonic() - start < 1.0


def test_a_child_is_killed_when_aborted_from_another_thread() -> None:
    abort = threading.Event()
    timer = threading.Timer(0.1, abort.set)
    timer.start()
    start = time.monotonic()
    with pytest.raises(PacketFilterInterruptError):
        run_command(["sleep", "5"], abort=abort)
    timer.join()
    assert time.monotonic() - start < 1.0


def test_a_child_gets_its_input_and_returns_its_output() -> None:
    res = run_command(["cat"], input="*raw\nCOMMIT\n", deadline=time.monotonic() + 5)
    assert res == Result(0, "*raw\nCOMMIT\n", "")
    with pytest.raises(XtablesUnavailableError, match="not installed"):
        run_command(["/nonexistent/iptables-nft-save"])


def test_a_child_is_the_oom_killers_first_choice() -> None:
    # A cgroup at its limit right after CoreDNS was OOM-killed: the agent's iptables child, not the agent,
    # is the next victim (its failure is retried; the agent's death would end the failover). The highest
    # score, not the agent's + 500: the kernel adds 500/1000 of the cgroup's limit, and in a limit near the
    # agent's own size the agent's memory still outweighs that (CI saw the agent taken with +500).
    res = run_command(["sh", "-c", "sleep 0.2; cat /proc/self/oom_score_adj"], deadline=time.monotonic() + 5)
    assert int(res.stdout) == 1000


def test_a_child_killed_by_a_signal_is_named_so(tmp_path: Path) -> None:
    def killed(argv: Sequence[str], **_: object) -> Result:
        return Result(-9, "", "")

    xt = Xtables("legacy", tmp_path / "lock", lock_wait=1, run=killed)
    with pytest.raises(PacketFilterError, match="legacy-restore --noflush -w 1 terminated by SIGKILL"):
        xt.restore(4, "*raw\nCOMMIT\n")
    with pytest.raises(PacketFilterError, match="iptables-nft-save -t raw terminated by SIGKILL"):
        Xtables("nft", tmp_path / "lock", 1, run=killed).save(4, "raw")
