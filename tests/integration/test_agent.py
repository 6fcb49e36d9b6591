"""The agent, for real, in the node sandbox: a pod resolving names continuously while things go wrong.

Each test runs a bounded load from a pod (``harness.dnsload``) through the kube-dns ClusterIP and asserts how
many queries failed and what state the node is in afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from harness import sandbox as sb
from harness.agentproc import SERVICE, SERVICE_IP, AgentProcess, Load, kill_coredns_under_load, local_answers
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP, STUB_DOMAIN
from harness.waiting import poll


@pytest.fixture
def box(flavour: sb.Flavour) -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour=flavour) as sandbox:
        yield sandbox


@pytest.fixture
def agent(box: sb.Sandbox) -> Iterator[AgentProcess]:
    with AgentProcess(box) as proc:
        proc.wait_serving()
        yield proc


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    if not poll(predicate, timeout):
        raise AssertionError(f"not {what} within {timeout}s")


def test_pod_queries_are_answered_by_the_local_cache_without_conntrack(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    assert local_answers(box)
    assert box.dig(box.pod(0), LOCAL_IP, SERVICE) == SERVICE_IP
    # The readiness probe's /ready: the template has none (node-cache's CoreDNS lacks it); the agent adds it.
    assert box.http_get(box.node, f"http://{LOCAL_IP}:8181/ready").strip() == "OK"
    assert box.dig(box.pod(0), KUBE_DNS_IP, "www.example.org") == "192.0.2.81"  # the "." zone upstream
    # The cluster zone is forwarded over TCP to kube-dns-upstream, whose ClusterIP is still DNATed.
    box.flush_conntrack()
    assert box.dig(box.pod(0), KUBE_DNS_IP, "db.prod.svc.cluster.local") == "10.96.20.30"
    upstream = box.conntrack("-p", "tcp", "--orig-dst", sb.KUBE_DNS_UPSTREAM_IP)
    assert f"src={box.kube_dns_pod_ip}" in upstream, upstream


def test_sigkill_of_coredns_loses_only_in_flight_queries(box: sb.Sandbox, agent: AgentProcess) -> None:
    first, result = kill_coredns_under_load(box, agent, rate=400, duration=6)
    assert int(result["failed"]) <= 5, result  # queries CoreDNS had read but not answered
    assert float(result["longest_gap"]) < 0.5, result
    agent.wait_serving()
    assert agent.coredns_pid() not in (None, first)
    assert local_answers(box)


def test_sigstop_of_coredns_is_caught_from_the_kernels_stop_notice_within_half_a_second(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    first = agent.coredns_pid()
    assert first is not None
    load = Load(box, rate=1000, duration=5)
    time.sleep(2)
    stopped_at = time.monotonic()
    os.kill(first, signal.SIGSTOP)
    agent.wait_for(lambda s: s.get("state") == "backoff", 3.5, "backoff after a hang")
    detected = time.monotonic() - stopped_at
    result = load.result()
    # The kernel tells the agent (CoreDNS's parent) of the stop at once; the kill follows. The bound leaves
    # room for a loaded machine (three failed rounds, the other path, would take about 2 s).
    assert detected < 0.6, detected
    # Queries sent while CoreDNS was stopped sat in its socket and die with it; nothing after the kill.
    assert float(result["longest_gap"]) < 0.6, result
    assert int(result["failed"]) <= 600, result
    failure_times = [float(t) for t in result["failure_times"]]  # type: ignore[union-attr]
    assert failure_times and max(failure_times) - min(failure_times) < 0.6, failure_times
    agent.wait_serving()
    causes = [str(e.get("cause", "")) for e in agent.events() if e.get("event") == "coredns state"]
    assert any(c.startswith("hung: stopped by SIGSTOP") for c in causes), causes


def test_sigkill_of_agent_and_coredns_together_falls_back_to_kube_dns(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    coredns = agent.coredns_pid()
    assert coredns is not None
    load = Load(box, rate=400, duration=5)
    time.sleep(2)
    os.kill(agent.agent_pid(), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # its parent-death signal may have been faster
        os.kill(coredns, signal.SIGKILL)
    result = load.result()
    assert not psutil.pid_exists(coredns) or psutil.Process(coredns).status() == psutil.STATUS_ZOMBIE
    assert int(result["failed"]) <= 5, result
    assert float(result["longest_gap"]) < 0.5, result
    # A new agent removes the leftovers and takes the traffic back.
    with AgentProcess(box, name="agent2") as second:
        second.wait_serving()
        assert local_answers(box)
        ours = [line for line in box.save_rules().splitlines() if "NodeLocal DNS agent" in line]
        assert ours and len(ours) == len(set(ours)), "duplicated rules"


def test_rolling_restart_loses_no_query(box: sb.Sandbox, agent: AgentProcess) -> None:
    load = Load(box, rate=400, duration=7)
    time.sleep(2)
    started = time.monotonic()
    assert agent.stop() == 0
    stop_took = time.monotonic() - started
    with AgentProcess(box, name="agent2") as second:
        second.wait_serving()
        result = load.result()
        assert result["failed"] == 0, result
        assert local_answers(box)
    assert stop_took < 10


def test_stub_domain_change_reaches_pods_without_losing_a_query(box: sb.Sandbox, agent: AgentProcess) -> None:
    load = Load(box, rate=300, duration=6)
    time.sleep(1.5)
    changed = time.monotonic()
    agent.write_kubedns({"stubDomains": json.dumps({STUB_DOMAIN: [box.stub_ip]})})
    wait_until(lambda: box.dig(box.pod(0), KUBE_DNS_IP, f"www.{STUB_DOMAIN}", check=False) == "198.51.100.7",
               5.0, "resolving the stub domain")  # fmt: skip
    took = time.monotonic() - changed
    result = load.result()
    assert result["failed"] == 0, result
    assert took < 2.5
    assert 'nodelocaldns_agent_reloads_total{result="ok"} 1.0' in agent.metrics()


def test_an_invalid_configmap_is_rejected_and_the_last_good_configuration_keeps_serving(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    agent.write_kubedns({"stubDomains": json.dumps({STUB_DOMAIN: [box.stub_ip]})})
    wait_until(lambda: box.dig(box.pod(0), KUBE_DNS_IP, f"www.{STUB_DOMAIN}", check=False) == "198.51.100.7",
               5.0, "resolving the stub domain")  # fmt: skip
    load = Load(box, rate=300, duration=4, names=f"www.{STUB_DOMAIN},{SERVICE}")
    agent.write_kubedns({"stubDomains": '{"acme.local": ["10.244.2.10"'})  # truncated JSON
    wait_until(lambda: 'errortype="configmap"} 1.0' in agent.metrics(), 5.0, "counting the configmap error")
    result = load.result()
    assert result["failed"] == 0, result
    rejected = [e for e in agent.events() if e.get("event") == "configuration rejected"]
    assert rejected and "stubDomains" in str(rejected[-1]["error"])


def test_an_invalid_configmap_at_first_start_keeps_dns_on_kube_dns_until_it_is_fixed(box: sb.Sandbox) -> None:
    agent = AgentProcess(box)
    agent.write_kubedns({"upstreamNameservers": '["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]'})
    with agent:
        status = agent.wait_for(lambda s: s.get("state") == "backoff", 15, "waiting for a valid Corefile")
        assert "no valid Corefile yet" in str(status.get("detail")), status
        assert agent.coredns_pid() is None
        ours = [line for line in box.save_rules().splitlines() if "NodeLocal DNS agent" in line]
        assert ours and all("health probes" in line for line in ours), ours  # only the marked probes' rules
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP
        assert not local_answers(box)
        rejected = [e for e in agent.events() if e.get("event") == "configuration rejected"]
        assert rejected and "upstreamNameservers: 4 nameservers" in str(rejected[0]["error"]), rejected
        # Alive: a restart would not mend the ConfigMap, so the liveness probe does not ask for one.
        check = [sys.executable, "-m", "agent", "--check", "--status-file", str(agent.status_file)]
        alive = subprocess.run(check, capture_output=True, text=True, check=False)
        assert alive.returncode == 0 and "on the fallback path" in alive.stdout, alive
        # Not ready, though: this agent does not serve the node (the readiness probe holds a rollout here).
        ready = [sys.executable, "-m", "agent", "--ready", "--status-file", str(agent.status_file)]
        unready = subprocess.run(ready, capture_output=True, text=True, check=False)
        assert unready.returncode == 1 and "not serving: coredns backoff" in unready.stderr, unready
        agent.write_kubedns({"upstreamNameservers": '["10.0.0.1"]'})
        agent.wait_serving(timeout=10)
        assert local_answers(box)
        assert subprocess.run(ready, capture_output=True, check=False).returncode == 0


def test_a_missing_coredns_binary_is_named_and_dns_stays_on_kube_dns(box: sb.Sandbox) -> None:
    missing = str(box.workdir / "no-such-coredns")
    with AgentProcess(box, extra=["--coredns-binary", missing]) as agent:
        status = agent.wait_for(lambda s: missing in str(s.get("detail", "")), 15, "naming the binary")
        assert status["state"] == "backoff" and "No such file" in str(status["detail"]), status
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP  # through kube-proxy to kube-dns
        assert not local_answers(box)
        assert agent.proc is not None and agent.proc.poll() is None  # still running, retrying with backoff


def test_port_53_busy_before_start_keeps_dns_on_kube_dns_and_recovers(box: sb.Sandbox) -> None:
    # A squatter holds 10.96.0.10:53 on an interface of its own before the agent starts.
    box.exec(box.node, ["ip", "link", "add", "squat0", "type", "bridge"])
    box.exec(box.node, ["ip", "addr", "add", f"{KUBE_DNS_IP}/32", "dev", "squat0"])
    squatter = box.popen(box.node, [sys.executable, "-c", (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(('{KUBE_DNS_IP}', 53))\n"
        "print('bound', flush=True)\n"
        "time.sleep(60)\n"
    )], stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == b"bound"
        with AgentProcess(box) as agent:
            status = agent.wait_for(lambda s: "address already in use" in str(s.get("detail", "")), 15,
                                    "reporting the busy port")  # fmt: skip
            assert status["state"] == "backoff"
            # DNS keeps working through kube-dns meanwhile.
            assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP
            squatter.kill()
            squatter.wait()
            agent.wait_serving(timeout=20)
            assert local_answers(box)
    finally:
        squatter.kill()
        squatter.wait()
        if squatter.stdout:
            squatter.stdout.close()


def test_flushed_rules_are_restored_within_2s_without_losing_queries(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    def rules() -> list[str]:
        return sorted(box.save_rules().splitlines())  # the order of our rules among themselves is free

    before = rules()
    load = Load(box, rate=300, duration=4)
    time.sleep(1)
    box.exec(box.node, [box.iptables(), "-t", "raw", "-F"])
    box.exec(box.node, [box.iptables(), "-t", "filter", "-F"])
    flushed = time.monotonic()
    wait_until(lambda: rules() == before, 2.0, "restored")
    restored_in = time.monotonic() - flushed
    result = load.result()
    assert result["failed"] == 0, result
    assert restored_in < 2.0


def test_check_is_true_while_the_loop_runs_and_false_when_stuck_or_gone(
    box: sb.Sandbox, agent: AgentProcess
) -> None:
    check = [sys.executable, "-m", "agent", "--check", "--status-file", str(agent.status_file),
             "--check-max-age", "2"]  # fmt: skip
    ok = subprocess.run(check, capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("alive"), ok
    os.kill(agent.agent_pid(), signal.SIGSTOP)
    try:
        time.sleep(2.5)
        stuck = subprocess.run(check, capture_output=True, text=True, check=False)
        assert stuck.returncode == 1 and "no progress" in stuck.stderr, stuck
    finally:
        os.kill(agent.agent_pid(), signal.SIGCONT)
    agent.stop()
    gone = subprocess.run(check, capture_output=True, text=True, check=False)
    assert gone.returncode == 1 and "gone" in gone.stderr


def test_check_imports_little_and_stays_under_30_mb(tmp_path: object) -> None:
    code = (
        "import resource, subprocess, sys\n"
        "subprocess.run([sys.executable, '-m', 'agent', '--check', '--status-file', '/nonexistent/s.json'])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    assert peak_kib < 30 * 1024
    modules = subprocess.run(
        [sys.executable, "-c", "import sys; from agent.cli import main; main(['--check', '--status-file', "
         "'/nonexistent']) ; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    for heavy in ("structlog", "prometheus_client", "pyroute2", "kubernetes", "dns", "requests", "psutil"):
        assert f"'{heavy}'" not in modules.stdout


def test_metrics_report_rules_health_memory_and_setup_errors(box: sb.Sandbox, agent: AgentProcess) -> None:
    def coredns_memory_reported() -> bool:
        # A heartbeat right after CoreDNS's launch reports its start-up RSS (about 4 MiB); the next, 2 s on,
        # its serving size.
        found = re.search(
            r"^nodelocaldns_agent_coredns_peak_resident_memory_bytes (\S+)$", agent.metrics(), re.M
        )
        return found is not None and float(found.group(1)) > 5 << 20

    wait_until(coredns_memory_reported, 5, "reporting CoreDNS's memory (a heartbeat)")
    text = agent.metrics()
    for errortype in ("iptables", "iptables_lock", "interface_add", "interface_check", "configmap"):
        assert f'coredns_nodecache_setup_errors_total{{errortype="{errortype}"}} 0.0' in text
    assert 'nodelocaldns_agent_rules_installed{kind="pod"} 1.0' in text
    assert 'nodelocaldns_agent_rules_installed{kind="host"} 1.0' in text
    assert 'nodelocaldns_agent_coredns_state{state="running"} 1.0' in text
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"
    }
    assert values["nodelocaldns_agent_coredns_peak_resident_memory_bytes"] > 5 << 20
    assert values["nodelocaldns_agent_coredns_healthy_since_seconds"] > 0
    assert values["nodelocaldns_agent_probe_latency_seconds_count"] > 0


def test_host_queries_follow_the_agent_managed_rule(box: sb.Sandbox, agent: AgentProcess) -> None:
    def host_query_is_local() -> bool:
        box.flush_conntrack()
        answer = box.dig(box.node, KUBE_DNS_IP, SERVICE, check=False)
        return answer == SERVICE_IP and "dport=53" not in box.conntrack(
            "-p", "udp", "--orig-dst", KUBE_DNS_IP
        )

    assert host_query_is_local()
    coredns = agent.coredns_pid()
    assert coredns is not None
    os.kill(coredns, signal.SIGSTOP)
    agent.wait_for(lambda s: s.get("serving") is False, 3.5, "off the local path")
    box.flush_conntrack()
    assert box.dig(box.node, KUBE_DNS_IP, SERVICE) == SERVICE_IP  # answered by kube-dns now
    assert "dport=53" in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
    agent.wait_serving()
    assert host_query_is_local()


def test_coredns_never_outlives_a_sigkilled_agent(box: sb.Sandbox, agent: AgentProcess) -> None:
    coredns = agent.coredns_pid()
    assert coredns is not None
    os.kill(agent.agent_pid(), signal.SIGKILL)
    # The parent-death signal takes CoreDNS with the agent; its sockets close and the gate shuts.
    wait_until(lambda: not psutil.pid_exists(coredns), 2, "coredns gone")
    assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert "dport=53" in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)  # via kube-proxy's DNAT
