"""The real image under podman, run as the DaemonSet runs it (harness/agentcontainer.py) on the sandbox's
node.

Each test starts the DaemonSet's pod from image/nodelocaldns.yaml in the node namespace and a pod resolving
names through the kube-dns ClusterIP, then does to the container what a node does to it: probes, a SIGKILL, a
stop within the grace period, a memory limit, a ConfigMap update.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import sandbox as sb
from harness.agentcontainer import PODMAN, AgentContainer, ensure_image, podman, podman_unavailable
from harness.agentproc import (
    SERVICE,
    SERVICE_IP,
    Load,
    http_status,
    interface_exists,
    local_answers,
    our_rules,
    query_path,
)
from harness.configmapdir import publish
from harness.sandbox import KUBE_DNS_IP, STUB_DOMAIN
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[2]
STUB_NAME, STUB_ANSWER = f"www.{STUB_DOMAIN}", "198.51.100.7"
# CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13): the manifest's capabilities, nothing else.
MANIFEST_CAPABILITIES = (1 << 10) | (1 << 12) | (1 << 13)


@pytest.fixture(scope="module", autouse=True)
def image() -> str:
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    return ensure_image()


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="nft") as sandbox:
        yield sandbox


@pytest.fixture
def legacy_box() -> Iterator[sb.Sandbox]:
    """iptables-legacy: the backend that takes the xtables lock."""
    with sb.Sandbox(flavour="legacy") as sandbox:
        yield sandbox


def serving(box: sb.Sandbox) -> Iterator[AgentContainer]:
    with AgentContainer(box) as container:
        container.wait_serving()
        yield container


@pytest.fixture
def pod(box: sb.Sandbox) -> Iterator[AgentContainer]:
    """The DaemonSet's pod, serving, on an iptables-nft node."""
    yield from serving(box)


@pytest.fixture
def legacy_pod(legacy_box: sb.Sandbox) -> Iterator[AgentContainer]:
    """The DaemonSet's pod, serving, on an iptables-legacy node."""
    yield from serving(legacy_box)


def proc_status(hpid: int) -> dict[str, str]:
    lines = Path(f"/proc/{hpid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_the_image_holds_the_working_trees_agent_and_a_stripped_pinned_coredns(
    image: str, tmp_path: Path
) -> None:
    version = podman("run", "--rm", "--network", "none", image, "--version").splitlines()
    pinned = (REPO / "image" / "coredns.version").read_text().strip().removeprefix("v")
    # CoreDNS's own -version output first (as node-cache prints it), the agent's line last.
    assert version[0] == f"CoreDNS-{pinned}" and version[-1].startswith("node-local-dns-agent "), version
    # Every file of the installed agent package is the working tree's, and the API source's imports work
    # (the image leaves out the Kubernetes client's asyncio half).
    script = (
        "import hashlib, json, pathlib, agent, agent.sources.api\n"
        "from kubernetes import client, config, watch\n"
        "from kubernetes.client.exceptions import ApiException\n"
        "root = pathlib.Path(agent.__file__).parent\n"
        "print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()\n"
        "                  for p in root.rglob('*') if p.is_file() and '__pycache__' not in p.parts}))\n"
    )
    installed = json.loads(
        podman("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", script)
    )
    tree = REPO / "agent"
    expected = {
        str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in tree.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert installed == expected
    # Cut from the final stage: the compiler (it stays in the wheel stage) and pip's cache.
    absent = podman("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
                    "command -v gcc cc; ls -d /root/.cache/pip; echo end", check=False)  # fmt: skip
    assert absent.strip() == "end", absent
    # CoreDNS without its symbol table and debug information.
    binary = tmp_path / "coredns"
    with binary.open("wb") as out:
        subprocess.run([PODMAN, "run", "--rm", "--network", "none", "--entrypoint", "cat", image,
                        "/usr/local/bin/coredns"], stdout=out, check=True, timeout=60)  # fmt: skip
    sections = re.findall(r"\]\s+(\.\S+)", sb.run(["readelf", "--section-headers", "--wide", str(binary)]))
    assert ".text" in sections and not [s for s in sections if s == ".symtab" or s.startswith(".debug")]


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_a_pods_queries_are_answered_by_the_containers_coredns_without_conntrack(flavour: sb.Flavour) -> None:
    with sb.Sandbox(flavour=flavour) as box, AgentContainer(box) as pod:
        pod.wait_serving()
        assert local_answers(box)
        processes = pod.processes()
        # The image's entrypoint is the container's PID 1, which forks the agent once
        # (agent/commands/pid1.py).
        assert [pid for pid, _ in processes["agent"]][:1] == [1] and len(processes["agent"]) == 2, processes
        (coredns,) = processes["coredns"]
        # What holds the ClusterIP's port 53 in the node's namespace is the container's CoreDNS.
        listeners = box.exec(box.node, ["ss", "-Hlunp", "src", f"{KUBE_DNS_IP}:53"])
        assert f"pid={coredns[1]}," in listeners, (listeners, processes)
        # The security context: no capability beyond the manifest's, no privilege escalation, for all.
        for comm, (_, hpid) in [*(("agent", p) for p in processes["agent"]), ("coredns", coredns)]:
            status = proc_status(hpid)
            assert int(status["CapBnd"], 16) == MANIFEST_CAPABILITIES, (comm, status["CapBnd"])
            assert status["NoNewPrivs"] == "1", comm
        # The kubelet's probes, both exec and within their timeouts: liveness and readiness.
        started = time.monotonic()
        alive = pod.liveness()
        assert alive.returncode == 0 and alive.stdout.strip().endswith("coredns running, serving"), alive
        assert time.monotonic() - started < pod.spec.liveness_timeout
        assert pod.ready()


def test_sigkill_of_the_whole_pod_sends_pods_to_kube_dns_at_once(
    box: sb.Sandbox, pod: AgentContainer
) -> None:
    rate = 400
    load = Load(box, rate=rate, duration=5)
    time.sleep(2)
    pod.kill("KILL")
    result = load.result()
    assert pod.state()["ExitCode"] == 137 and not pod.running()
    # Lost: the queries in CoreDNS's sockets while the kernel tears the pod's processes down (PID 1 first,
    # then the rest of its PID namespace; slower on a busy machine), at most a tenth of a second's worth.
    assert int(result["failed"]) <= rate * 0.1, result
    assert float(result["longest_gap"]) < 0.5, result
    # Its rules stayed behind (nothing ran to remove them) and hold nothing: kube-dns answers.
    assert our_rules(box)
    assert query_path(box) == (SERVICE_IP, True)
    # The kubelet's next pod removes the leftovers and takes the traffic back.
    with AgentContainer(box, name="nodelocaldns-2") as second:
        second.wait_serving()
        assert local_answers(box)
        rules = our_rules(box)
        assert len(rules) == len(set(rules)), "duplicated rules"


def test_podman_stop_tears_down_and_exits_0_within_the_grace_period_losing_no_query(
    legacy_box: sb.Sandbox, legacy_pod: AgentContainer
) -> None:
    box, pod = legacy_box, legacy_pod
    load = Load(box, rate=300, duration=4)
    time.sleep(1.5)
    took = pod.stop()
    result = load.result()
    assert pod.state()["ExitCode"] == 0, pod.tail()
    assert took < pod.spec.grace_period, took
    assert result["failed"] == 0, result
    assert our_rules(box) == []
    assert "nodelocaldns" not in box.exec(box.node, ["ip", "-brief", "link"])
    assert query_path(box) == (SERVICE_IP, True)
    assert any(e.get("event") == "agent stopped" for e in pod.events())


def test_a_surge_upgrade_of_the_pod_keeps_the_node_served(box: sb.Sandbox, pod: AgentContainer) -> None:
    """The DaemonSet's surge: the new pod starts next to the old one (the agents lock is a hostPath both
    mount), serves, then the old pod is stopped; pods querying the link-local address lose no query."""
    installed = our_rules(box)
    load = Load(box, rate=500, duration=8, server=sb.LOCAL_IP)
    time.sleep(1.0)
    with AgentContainer(box, name="surge") as new:
        new.wait_serving()
        assert new.ready()  # the readiness probe the DaemonSet controller waits for
        assert our_rules(box) == installed
        took = pod.stop()
        assert pod.state()["ExitCode"] == 0, pod.tail()
        assert took < pod.spec.grace_period, took
        result = load.result()
        assert result["failed"] <= 2, result  # what the old CoreDNS's socket had queued as it closed
        assert any(e.get("event") == "leaving the node to another agent" for e in pod.events()), pod.tail()
        assert our_rules(box) == installed and local_answers(box)
        new.stop()
    assert our_rules(box) == [] and not interface_exists(box)


def test_podman_stop_while_the_nodes_xtables_lock_is_held_still_exits_0_in_time(
    legacy_box: sb.Sandbox, legacy_pod: AgentContainer
) -> None:
    box, pod = legacy_box, legacy_pod
    with pod.xtables_lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # kube-proxy in a long sync, on the node's lock file
        took = pod.stop()
        # The container waited on the node's lock: it could not remove its rules.
        assert our_rules(box)
    assert pod.state()["ExitCode"] == 0, pod.tail()
    assert took < 12, took  # the agent's shutdown budget (10 s) and a margin, within the grace period
    assert query_path(box) == (SERVICE_IP, True)  # CoreDNS is gone, so its rules hold nothing


def oom_kills(pod: AgentContainer) -> int:
    events = pod.cgroup_memory("memory.events", "memory.oom_control")
    return int(re.search(r"^oom_kill (\d+)$", events, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_an_oom_kill_at_the_memory_limit_is_reported_and_pods_fail_over(box: sb.Sandbox) -> None:
    names = box.workdir / "unique-names.txt"
    names.write_text("".join(f"n{i}.default.svc.cluster.local A\n" for i in range(40000)))
    with AgentContainer(box, extra=["--memory", "256m"]) as pod:
        pod.wait_serving()
        # Then just a few MB of room and a flood of names nobody asked before: CoreDNS's cache grows until the
        # kernel's OOM killer steps in, and it must pick CoreDNS (the agent raised its score), not the agent.
        usage = int(pod.cgroup_memory("memory.current", "memory.usage_in_bytes"))
        podman("update", "--memory", str(usage + (6 << 20)), pod.name)
        box.exec(box.pod(0), ["dnsperf", "-s", KUBE_DNS_IP, "-d", str(names), "-l", "8", "-Q", "4000"],
                 check=False, timeout=30)  # fmt: skip
        assert oom_kills(pod) > 0
        assert pod.running(), pod.tail()  # the agent, PID 1, survived
        assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP
        podman("update", "--memory", "256m", pod.name)
        pod.wait_serving()
        assert local_answers(box)
        causes = [str(e.get("cause", "")) for e in pod.events() if e.get("event") == "coredns state"]
        assert any(c.startswith("OOM-killed") for c in causes), causes
        metrics = http_status(box, "http://127.0.0.1:9353/metrics")
        assert 'nodelocaldns_agent_coredns_restarts_total{cause="oom"}' in metrics


def test_the_memory_limit_reaches_coredns_as_gomemlimit(box: sb.Sandbox) -> None:
    with AgentContainer(box, extra=["--memory", "250m"]) as pod:
        pod.wait_serving()
        environ = Path(f"/proc/{pod.processes()['coredns'][0][1]}/environ").read_bytes().split(b"\0")
        assert b"GOMEMLIMIT=200MiB" in environ, [e for e in environ if e.startswith(b"GO")]


def served_locally_within(box: sb.Sandbox, name: str, answer: str, seconds: float) -> None:
    """A pod's query for ``name`` gets ``answer`` within ``seconds``, from the local cache (no conntrack)."""
    changed = time.monotonic()
    assert poll(lambda: box.dig(box.pod(0), KUBE_DNS_IP, name, check=False) == answer, seconds * 2)
    assert time.monotonic() - changed < seconds
    box.flush_conntrack()
    assert box.dig(box.pod(0), KUBE_DNS_IP, name) == answer
    assert "dport=53" not in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)


def test_configmap_updates_reach_the_containers_coredns(box: sb.Sandbox, pod: AgentContainer) -> None:
    # The kube-dns ConfigMap: a stub domain.
    assert box.dig(box.pod(0), KUBE_DNS_IP, STUB_NAME, check=False) != STUB_ANSWER
    publish(pod.kubedns_dir, {"stubDomains": json.dumps({STUB_DOMAIN: [box.stub_ip]})})
    served_locally_within(box, STUB_NAME, STUB_ANSWER, 5)
    # The node-local-dns ConfigMap (Corefile.base): a name of the cluster zone answered by the cache itself.
    name, address = "fresh.default.svc.cluster.local", "10.96.77.77"
    assert box.dig(box.pod(0), KUBE_DNS_IP, name, check=False) == ""
    block = "cluster.local:53 {\n    errors\n"
    assert block in pod.spec.corefile
    hosts = f"    hosts {{\n        {address} {name}\n        fallthrough\n    }}\n"
    publish(pod.corefile_dir, {"Corefile.base": pod.spec.corefile.replace(block, block + hosts)})
    served_locally_within(box, name, address, 5)
    metrics = http_status(box, "http://127.0.0.1:9353/metrics")
    assert 'nodelocaldns_agent_reloads_total{result="ok"} 2.0' in metrics, pod.tail()


ZOMBIES = (
    "import os\n"
    "stats = [open(f'/proc/{p}/stat').read() for p in os.listdir('/proc') if p.isdigit()]\n"
    "print(sum(s.rsplit(')', 1)[1].split()[0] == 'Z' for s in stats))\n"
)


def test_the_agent_as_pid_1_reaps_orphans(pod: AgentContainer) -> None:
    # The shell exits at once; its sleep is orphaned to the container's PID 1 and exits 0.2 s later.
    assert pod.exec("sh", "-c", "sleep 0.2 & exit 0").returncode == 0
    time.sleep(0.5)
    reaped = poll(lambda: pod.exec("python3", "-c", ZOMBIES).stdout.strip() == "0", 3, every=0.2)
    assert reaped, pod.exec("python3", "-c", ZOMBIES)
