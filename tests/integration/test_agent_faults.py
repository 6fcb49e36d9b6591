"""The agent against faults that need more than signals: a real OOM kill in a memory cgroup, a held xtables
lock at shutdown, and the systemd notify protocol on a real socket."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import sandbox as sb
from harness.agentproc import SERVICE, AgentProcess, local_answers
from harness.sandbox import KUBE_DNS_IP
from harness.waiting import poll


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[tuple[Path, str, str]]:
    """A memory cgroup of our own: (its directory, the limit file, the usage file). v2 or v1."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        path, limit, usage = Path("/sys/fs/cgroup") / name, "memory.max", "memory.current"
    else:
        own = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":", 2)[1].split(",")
        )
        path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name
        limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
    path.mkdir()
    try:
        yield path, limit, usage
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        poll(lambda: not (path / "cgroup.procs").read_text().strip(), 5)
        path.rmdir()


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="legacy") as sandbox:
        yield sandbox


def test_a_real_oom_kill_is_named_as_such_and_dns_falls_back_then_recovers(box: sb.Sandbox) -> None:
    names = box.workdir / "unique-names.txt"
    names.write_text("".join(f"n{i}.default.svc.cluster.local A\n" for i in range(40000)))
    cgroup_name = f"{sb.PREFIX}-{box.run_id}-oom"
    with memory_cgroup(cgroup_name) as (cgroup, limit, usage), AgentProcess(box, cgroup=cgroup) as agent:
        agent.wait_serving()
        # A few MB of room, then a flood of names nobody asked before: CoreDNS's cache grows until the
        # kernel's OOM killer steps in, and it must pick CoreDNS (its score is raised), not the agent.
        (cgroup / limit).write_text(str(int((cgroup / usage).read_text()) + (4 << 20)))
        flood = ["dnsperf", "-s", KUBE_DNS_IP, "-d", str(names), "-l", "8", "-Q", "4000"]
        box.exec(box.pod(0), flood, check=False, timeout=30)
        causes = [str(e.get("cause", "")) for e in agent.events() if e.get("event") == "coredns state"]
        assert any(c.startswith("OOM-killed") for c in causes), causes
        assert agent.proc is not None and agent.proc.poll() is None  # the agent survived
        # The kernel gate sends pod queries to kube-dns whenever CoreDNS is dead.
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == "10.96.10.20"
        (cgroup / limit).write_text("max" if limit == "memory.max" else "-1")
        agent.wait_serving(timeout=20)
        assert local_answers(box)
        assert 'nodelocaldns_agent_coredns_restarts_total{cause="oom"}' in agent.metrics()


def test_sigterm_while_kube_proxy_holds_the_xtables_lock_still_exits_in_time(box: sb.Sandbox) -> None:
    with AgentProcess(box) as agent:
        agent.wait_serving()
        lock = box.workdir / "xtables.lock"  # the lock file the agent was told to share
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # kube-proxy in the middle of a long sync
            started = time.monotonic()
            rc = agent.stop(timeout=15)
            took = time.monotonic() - started
        assert rc == 0
        assert took < 12, took  # the shutdown budget (10 s) and a margin; the grace period is 20 s
        # CoreDNS is gone, so whatever rules stayed behind cannot hold pod queries: they reach kube-dns.
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == "10.96.10.20"
        assert any(e.get("event") == "agent stopped" for e in agent.events())


def test_systemd_hears_ready_once_serving_then_watchdog_pings_then_stopping(box: sb.Sandbox) -> None:
    address = str(box.workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(0.2)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"}
        with AgentProcess(box, env=env) as agent:
            messages: list[str] = []

            def received(what: str, timeout: float) -> bool:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        messages.append(manager.recv(4096).decode())
                    if any(what in m for m in messages):
                        return True
                return False

            assert received("READY=1", 20), messages
            assert agent.status().get("serving") is True  # READY only once DNS is served
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=serving DNS" in ready
            messages.clear()
            assert received("WATCHDOG=1", 3), messages
            agent.signal(15)
            assert received("STOPPING=1", 5), messages
            assert agent.stop() == 0
