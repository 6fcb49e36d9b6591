"""One metrics port with everything, as node-cache has: the agent's series, its process metrics and CoreDNS's
current metrics (fetched at scrape time); a failed fetch is a metric of the agent's, never a failed scrape."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from harness import sandbox as sb
from harness.agentproc import SERVICE, SERVICE_IP, AgentProcess
from harness.waiting import poll


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in:\n{text[:2000]}"
    return float(match.group(1))


def test_the_agents_port_serves_coredns_metrics_too_and_survives_a_stopped_coredns() -> None:
    # A host name, as Go's listener takes it (the node's /etc/hosts resolves it; no DNS is asked).
    with (
        sb.Sandbox(flavour="nft") as box,
        AgentProcess(box, extra=["-metrics-listen-address", "localhost:9353"]) as agent,
    ):
        agent.wait_serving()
        assert box.dig(box.pod(0), sb.KUBE_DNS_IP, SERVICE) == SERVICE_IP
        text = agent.metrics()
        assert "coredns_build_info{" in text
        assert re.search(
            r'^coredns_dns_requests_total\{.*zone="cluster.local.".*\} [1-9]', text, re.MULTILINE
        )
        assert sample(text, "nodelocaldns_agent_process_resident_memory_bytes") > 1 << 20
        assert 'coredns_nodecache_setup_errors_total{errortype="iptables"} 0.0' in text
        assert sample(text, "nodelocaldns_agent_coredns_metrics_up") == 1.0
        types = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
        assert len(types) == len(set(types)), "a metric family appears twice"
        # CoreDNS's metrics listener unreachable (its packets dropped: a connect that never completes). A
        # stopped CoreDNS would not do: the agent kills a stopped CoreDNS at once.
        drop = ["OUTPUT", "-p", "tcp", "--dport", "9253", "-j", "DROP"]
        box.exec(box.node, [box.iptables(), "-I", *drop])
        try:
            started = time.monotonic()
            text = agent.metrics()
            took = time.monotonic() - started
        finally:
            box.exec(box.node, [box.iptables(), "-D", *drop])
        assert took < 2.0
        assert sample(text, "nodelocaldns_agent_coredns_metrics_up") == 0.0
        assert sample(text, "nodelocaldns_agent_coredns_metrics_fetch_failures_total") >= 1
        assert "coredns_build_info{" not in text and "nodelocaldns_agent_coredns_state{" in text


def test_a_metrics_port_held_by_node_cache_is_taken_once_it_is_free() -> None:
    """During a migration surge node-cache still listens on 9353 and does not share the port (Go's listener
    sets no SO_REUSEPORT): the agent serves DNS without its metrics, and listens as soon as the port is free,
    not only after a restart."""
    holder = (
        "import socket, sys, time\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 9353)); s.listen()\n"
        "print('held', flush=True); sys.stdin.read()\n"
    )
    with sb.Sandbox(flavour="nft") as box:
        held = box.popen(
            box.node, [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert held.stdout is not None and held.stdout.readline() == b"held\n"
            with AgentProcess(box) as agent:
                agent.wait_serving()
                assert box.dig(box.pod(0), sb.KUBE_DNS_IP, SERVICE) == SERVICE_IP
                assert [e for e in agent.events() if e.get("event") == "metrics not served"]
                assert held.stdin is not None
                held.stdin.close()  # node-cache's pod is gone
                held.wait(timeout=5)
                served = poll(lambda: "nodelocaldns_agent_coredns_state{" in _get(box), timeout=15)
                assert served, agent.tail()
                assert [e for e in agent.events() if e.get("event") == "metrics served"]
        finally:
            if held.poll() is None:
                held.kill()
                held.wait(timeout=5)
            for pipe in (held.stdin, held.stdout):
                if pipe is not None:
                    pipe.close()


def _get(box: sb.Sandbox) -> str:
    try:
        return box.http_get(box.node, "http://127.0.0.1:9353/metrics")
    except sb.SandboxError:  # not listening yet: the poll asks again
        return ""
