"""The iptables binaries: read a table (``*-save``), apply a change (``*-restore --noflush``), pick the mode.

Why binaries and not python-iptables: python-iptables drives libiptc, so it cannot see or write nf_tables
hosts at all; it takes no xtables lock, so its read-modify-commit of a whole table can overwrite
kube-proxy's concurrent change; it is not thread-safe; and its ``NOTRACK`` target is saved as a bare
``-j CT``, which tracks everything. ``iptables-restore --noflush`` is what kube-proxy itself uses: one
transaction per table, the xtables lock handled by the same code as every other user of it, one syntax for
both backends.

A lock wait is bounded (``-w SECONDS``) and can be cut short: the child is polled and killed when the
caller's deadline passes or its abort event is set (a SIGTERM during a lock wait must not delay teardown).
Killing ``iptables-restore`` is safe: a table is committed in one system call or not at all.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from agent.children import describe_returncode, rank_above_agent
from agent.node.rules import Family
from agent.stopflag import Abort

Mode = Literal["legacy", "nft"]
MODES: tuple[Mode, ...] = ("legacy", "nft")
# Chains the kubelet (>= 1.17) creates in the mangle table of the iptables flavour the host uses.
KUBELET_CANARIES = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_POLL = 0.02  # how often a running child is checked for the deadline and the abort event, in seconds
# iptables exits 4 (RESOURCE_PROBLEM) when it gave up waiting for the xtables lock.
_EXIT_RESOURCE_PROBLEM = 4


class PacketFilterError(RuntimeError):
    """The packet filter could not be read or changed; the message names the command and what it said."""


class XtablesUnavailableError(PacketFilterError):
    """The backend's binary is not installed."""


class XtablesLockError(PacketFilterError):
    """Another program held the xtables lock for longer than the bounded wait."""


class PacketFilterInterruptError(PacketFilterError):
    """The operation was cut short (shutdown); nothing of the interrupted transaction was applied."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def _failed(argv: Sequence[str], res: Result) -> str:
    """A failed command in words: its command line, how it ended, what it said."""
    return f"{' '.join(argv)} {describe_returncode(res.returncode)}: {res.stderr.strip()}"


def binary(mode: Mode, family: Family, tool: Literal["", "-save", "-restore"]) -> str:
    """``iptables-nft-save``, ``ip6tables-legacy-restore``, … (the Debian/alternatives names)."""
    return f"{'iptables' if family == 4 else 'ip6tables'}-{mode}{tool}"


class Runner(Protocol):
    """Runs one command to completion or to the deadline; the seam unit tests replace."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        deadline: float | None = None,
        abort: Abort | None = None,
        env: dict[str, str] | None = None,
    ) -> Result: ...


def run_command(
    argv: Sequence[str],
    *,
    input: str | None = None,
    deadline: float | None = None,
    abort: Abort | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``argv``; kill it when ``deadline`` (monotonic) passes or ``abort`` is set.

    Raises PacketFilterInterruptError on abort, PacketFilterError on a timeout or a missing binary."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
    except FileNotFoundError:
        raise XtablesUnavailableError(f"cannot run {argv[0]}: not installed") from None
    except OSError as exc:
        raise PacketFilterError(f"cannot run {argv[0]}: {exc.strerror}") from None
    rank_above_agent(proc.pid, first=True)
    pending: str | None = input if input is not None else ""
    with proc:
        while True:
            step = _POLL if deadline is None else max(0.0, min(_POLL, deadline - time.monotonic()))
            try:
                out, err = proc.communicate(pending, timeout=step)
                return Result(proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                pending = None  # sent with the first call
            stop_reason = (
                "interrupted"
                if abort is not None and abort.is_set()
                else "timed out"
                if deadline is not None and time.monotonic() >= deadline
                else None
            )
            if stop_reason:
                proc.kill()
                proc.communicate()
                what = f"{' '.join(argv)} {stop_reason}"
                if stop_reason == "interrupted":
                    raise PacketFilterInterruptError(what)
                raise PacketFilterError(what)


@dataclass
class Xtables:
    """One backend (legacy or nft) of the iptables binaries, for both families.

    ``lock_file`` is passed as ``XTABLES_LOCKFILE`` (honoured by iptables >= 1.8.5; nft ignores the lock).
    ``lock_wait`` bounds one attempt's wait for it, in seconds (iptables counts whole seconds).
    """

    mode: Mode
    lock_file: Path
    lock_wait: float
    run: Runner = run_command
    proc_net: Path = Path("/proc/net")

    def existing_tables(self, family: Family) -> set[str] | None:
        """The legacy tables that exist in this namespace, read without creating any; None for nft.

        ``iptables-legacy-save -t TABLE`` would create TABLE (the kernel loads tables on first use), which
        would change ``iptables-legacy-save`` output for good: only tables listed here are read."""
        if self.mode != "legacy":
            return None
        names = self.proc_net / ("ip_tables_names" if family == 4 else "ip6_tables_names")
        try:
            return set(names.read_text().split())
        except FileNotFoundError:
            return set()

    def save(self, family: Family, table: str, *, deadline: float | None = None) -> str:
        """``iptables-save -t TABLE`` without counters; empty when a legacy table does not exist."""
        existing = self.existing_tables(family)
        if existing is not None and table not in existing:
            return ""
        argv = [binary(self.mode, family, "-save"), "-t", table]
        res = self.run(argv, deadline=deadline)
        if res.returncode != 0:
            raise PacketFilterError(_failed(argv, res))
        return res.stdout

    def restore(
        self,
        family: Family,
        text: str,
        *,
        deadline: float | None = None,
        abort: Abort | None = None,
    ) -> None:
        """Apply ``text`` with ``iptables-restore --noflush``, waiting a bounded time for the xtables lock."""
        remaining = self.lock_wait if deadline is None else max(0.0, deadline - time.monotonic())
        wait = max(1, math.ceil(min(self.lock_wait, remaining)))
        argv = [binary(self.mode, family, "-restore"), "--noflush", "-w", str(wait)]
        child_deadline = time.monotonic() + wait + 5 if deadline is None else deadline
        res = self.run(
            argv,
            input=text,
            deadline=child_deadline,
            abort=abort,
            env={"XTABLES_LOCKFILE": str(self.lock_file)},
        )
        if res.returncode == 0:
            return
        message = _failed(argv, res)
        if res.returncode == _EXIT_RESOURCE_PROBLEM and "xtables lock" in res.stderr:
            raise XtablesLockError(f"{self.lock_file} held by another program for {wait}s ({message})")
        raise PacketFilterError(message)


def detect_mode(run: Runner = run_command, *, deadline_s: float = 10.0) -> Mode:
    """The iptables flavour the host uses, decided the way kubernetes-sigs/iptables-wrappers does.

    1. the kubelet's canary chains in ``iptables-nft-save -t mangle`` (or ip6tables) → nft;
    2. the same in ``iptables-legacy-save`` (no ``-t``, which would create the legacy mangle table) → legacy;
    3. otherwise whichever has more rules, nft on a tie (a host with no rules at all is taken as nft).
    """
    deadline = time.monotonic() + deadline_s

    def output(*argv: str) -> str:
        try:
            res = run(argv, deadline=deadline)
        except PacketFilterError:
            return ""
        return res.stdout if res.returncode == 0 else ""

    def canaries(text: str) -> bool:
        return any(line.startswith(f":{c} ") for line in text.splitlines() for c in KUBELET_CANARIES)

    def rule_count(text: str) -> int:
        return sum(1 for line in text.splitlines() if line.startswith("-"))

    nft_mangle = output("iptables-nft-save", "-t", "mangle") + output("ip6tables-nft-save", "-t", "mangle")
    if canaries(nft_mangle):
        return "nft"
    legacy = output("iptables-legacy-save") + output("ip6tables-legacy-save")
    if canaries(legacy):
        return "legacy"
    nft = output("iptables-nft-save") + output("ip6tables-nft-save")
    return "legacy" if rule_count(legacy) > rule_count(nft) else "nft"
