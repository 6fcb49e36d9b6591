"""The no-blackhole promise on the paths hand-picked scenarios used to miss: an unexpected error, a dead
thread, a held lock at the first install, PID 1 in a PID namespace, node-cache's signals."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from harness import sandbox as sb
from harness.agentproc import SERVICE, SERVICE_IP, AgentProcess, local_answers
from harness.sandbox import KUBE_DNS_IP
from harness.waiting import poll

RULE_TAG = "NodeLocal DNS agent"


@pytest.fixture
def box(flavour: sb.Flavour) -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour=flavour) as sandbox:
        yield sandbox


def our_rules(box: sb.Sandbox) -> list[str]:
    return [line for line in box.save_rules().splitlines() if RULE_TAG in line]


def events_named(agent: AgentProcess, name: str) -> list[dict[str, object]]:
    return [e for e in agent.events() if e.get("event") == name]


def test_an_unexpected_error_in_the_loop_tears_down_and_exits_non_zero(box: sb.Sandbox) -> None:
    # The 5th periodic network check raises: a bug nobody planned for, once CoreDNS serves.
    with AgentProcess(box, fault="agent.node.reconcile:NetworkReconciler.reconcile:5") as agent:
        agent.wait_serving()
        coredns = agent.coredns_pid()
        assert agent.proc is not None
        assert agent.proc.wait(timeout=20) == 1
    failures = events_named(agent, "agent failed")
    assert len(failures) == 1, agent.tail()
    assert "injected fault" in str(failures[0]["cause"]) and "Traceback" in str(failures[0]["traceback"])
    assert our_rules(box) == []  # nothing points at a dead CoreDNS
    assert coredns is not None and not psutil.pid_exists(coredns)
    assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP  # pods on kube-dns


def test_a_dead_watcher_thread_is_noticed_and_the_agent_exits_cleanly(box: sb.Sandbox) -> None:
    with AgentProcess(box, fault="agent.sources.directory:DirectoryWatcher._run:1") as agent:
        assert agent.proc is not None
        assert agent.proc.wait(timeout=30) == 1
    assert any("watcher thread died" in str(e.get("cause")) for e in events_named(agent, "agent failed"))
    assert our_rules(box) == []


def test_a_dead_prober_is_restarted_and_its_successor_brings_coredns_to_serving(box: sb.Sandbox) -> None:
    with AgentProcess(box, fault="agent.health.probe:Prober._run:2") as agent:  # the restarted child's prober
        agent.wait_serving()
        first = agent.coredns_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert poll(lambda: events_named(agent, "prober restarted"), 10), agent.tail()
        # Only a probe result moves a restarted CoreDNS from starting to running: the new prober's.
        agent.wait_serving(timeout=10)
        second = agent.coredns_pid()
        assert second is not None and second != first
        assert 'nodelocaldns_agent_thread_restarts_total{thread="prober"} 1.0' in agent.metrics()


def test_with_the_lock_held_at_the_first_install_the_agent_is_not_serving_until_the_rules_are_in() -> None:
    # iptables-legacy takes the xtables lock (iptables-nft does not). The link-local address alone: the
    # agent's probes reach CoreDNS there without any rule, so CoreDNS becomes healthy while no rule can go in.
    with sb.Sandbox(flavour="legacy") as box:
        lock = box.workdir / "xtables.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # kube-proxy in a long sync as the agent starts
            with AgentProcess(box, local_ips=[sb.LOCAL_IP], extra=["--xtables-wait", "1s"]) as agent:
                assert poll(lambda: agent.status().get("state") == "running", 30), agent.tail()
                time.sleep(1.0)
                assert agent.status().get("serving") is False
                assert "nodelocaldns_agent_serving 0.0" in agent.metrics()
                assert our_rules(box) == []
                fcntl.flock(held, fcntl.LOCK_UN)
                agent.wait_serving(timeout=40)  # the reconcile retries with back-off and succeeds
                assert our_rules(box)
                assert box.dig(box.pod(0), sb.LOCAL_IP, SERVICE) == SERVICE_IP
                assert "nodelocaldns_agent_serving 1.0" in agent.metrics()
                assert any(e.get("event") == "serving" for e in agent.events())


def test_sigquit_tears_down_and_exits_zero_and_sigusr1_reloads(box: sb.Sandbox) -> None:
    with AgentProcess(box) as agent:
        agent.wait_serving()
        agent.signal(signal.SIGUSR1)
        assert poll(lambda: events_named(agent, "coredns reloaded"), 10), agent.tail()
        agent.signal(signal.SIGQUIT)
        assert agent.proc is not None
        assert agent.proc.wait(timeout=15) == 0
    assert our_rules(box) == []


def test_skipteardown_takes_the_host_rules_off_and_leaves_the_rest(box: sb.Sandbox) -> None:
    with AgentProcess(box, extra=["-skipteardown"]) as agent:
        agent.wait_serving()
        assert any("host queries" in r for r in our_rules(box))
        assert agent.stop() == 0
    left = our_rules(box)
    assert left and not any("host queries" in r for r in left)
    # The node's own queries go to kube-dns (no rule sends them to the stopped CoreDNS); pods too (gate).
    assert box.dig(box.node, KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP
    box.exec(box.node, ["ip", "link", "del", "nodelocaldns"], check=False)


class Pid1Agent(AgentProcess):
    """The agent as PID 1 of a PID namespace of its own (a container's init), in the node namespace."""

    def start(self) -> AgentProcess:
        argv = [
            "ip",
            "netns",
            "exec",
            self.box.node,
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            *self.argv,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def agent_pid(self) -> int:
        """The namespace's PID 1, as the host sees it (unshare's child)."""
        assert self.proc is not None
        found = poll(lambda: psutil.Process(self.proc.pid).children() if self.proc else [], 5)  # type: ignore[union-attr]
        assert found, "unshare started nothing"
        return int(found[0].pid)


def zombies_of(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children() if p.status() == psutil.STATUS_ZOMBIE]


def test_as_pid_1_the_agent_reaps_orphans_and_sigterm_tears_down(box: sb.Sandbox) -> None:
    with Pid1Agent(box) as agent:
        agent.wait_serving()
        init = agent.agent_pid()
        # A process in the namespace whose parent exits: the kernel hands the orphan to PID 1.
        subprocess.run(
            ["nsenter", "-t", str(init), "-p", "--", "sh", "-c", "sleep 0.3 & exit 0"], check=True, timeout=5
        )
        time.sleep(1.0)
        assert zombies_of(init) == []
        assert local_answers(box)
        os.kill(init, signal.SIGTERM)  # what `podman stop` / the kubelet sends
        assert agent.proc is not None
        assert agent.proc.wait(timeout=15) == 0
    assert our_rules(box) == []
    assert any(e.get("event") == "agent stopped" for e in agent.events())


def test_as_pid_1_sigkill_takes_every_process_and_pods_fall_back(box: sb.Sandbox) -> None:
    with Pid1Agent(box) as agent:
        agent.wait_serving()
        init = agent.agent_pid()
        namespace_pids = [p.pid for p in psutil.Process(init).children(recursive=True)]
        os.kill(init, signal.SIGKILL)  # the whole pod killed: no user-space cleanup runs
        assert poll(lambda: not any(psutil.pid_exists(p) for p in namespace_pids), 5)
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP  # the kernel gate closed
        assert "dport=53" in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
    box.exec(box.node, ["ip", "link", "del", "nodelocaldns"], check=False)


def test_print_corefile_prints_byte_for_byte_what_the_agent_writes(box: sb.Sandbox) -> None:
    with AgentProcess(box) as agent:
        agent.wait_serving()
        written = (box.workdir / "Corefile").read_text()
        printed = box.exec(box.node, [*agent.argv, "--print-corefile"])
    assert printed == written
    assert "__PILLAR__" not in written and "\n    reload" not in written
    assert written.startswith("# Written by the node-local-dns agent from ")


def test_a_flush_while_the_lock_is_held_does_not_get_a_healthy_coredns_killed() -> None:
    # The flush takes the agent's probe rules too: its probes to the ClusterIP go through kube-proxy to
    # kube-dns (NXDOMAIN for the probe zone) while the held lock keeps the agent from putting them back.
    with sb.Sandbox(flavour="legacy") as box, AgentProcess(box, extra=["--xtables-wait", "1s"]) as agent:
        agent.wait_serving()
        coredns = agent.coredns_pid()
        lock = box.workdir / "xtables.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            for table in ("raw", "filter"):  # the flush itself under the machine's default lock path
                box.exec(box.node, ["iptables-legacy", "-t", table, "-F"])
            time.sleep(3.0)
        agent.wait_serving(timeout=20)
        time.sleep(1.5)  # the rounds that queued up meanwhile are handled by now
        assert agent.coredns_pid() == coredns, agent.tail()
        causes = [str(e.get("cause")) for e in events_named(agent, "coredns state")]
        assert not any(c.startswith("hung") for c in causes), causes
        assert local_answers(box)
