"""The shipped DaemonSet on a real single-node cluster (harness/cluster.py), kube-proxy in iptables mode and
in nftables mode (the documented iptables-mode sed serves both).

The manifest is installed as docs/install.md says (the documented sed, ``kubectl apply -f``), run by a real
kubelet from the agent's image, and proven from a real pod: queries to the kube-dns ClusterIP are answered by
the node's cache without a conntrack entry; a force delete of the agent's pod under load falls back to
kube-dns; and ``kubectl delete -f`` leaves the node's packet filter as it was before the install. The tests
share one install and run in file order (the last one removes it).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import manifests
from harness.cluster import KUBE_DNS_IP, SERVICES, STUB_DNS_IP, STUB_NAMES, Cluster
from harness.waiting import poll

LOCAL_IP = manifests.LOCALDNS
SERVICE = "web.default.svc.cluster.local"
SERVICE_IP = SERVICES["web.default"]
AGENT = "k8s-app=node-local-dns"
OOM_LIMIT = "32Mi"  # below what the agent needs to start (about 40 MB), so the OOM killer takes it
# The first test also starts the session's cluster (about 20 s on an idle machine; more when it is shared).
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def before_install(cluster: Cluster) -> dict[str, str]:
    """The node's packet filter and addresses before the manifest is applied."""
    return {"tables": cluster.normalized_tables(), "links": cluster.links()}


@pytest.fixture(scope="module")
def manifest(
    cluster: Cluster, before_install: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """image/nodelocaldns.yaml after the documented iptables-mode sed, with the cluster's kube-dns
    ClusterIP."""
    kubedns = cluster.kubectl(
        "get", "svc", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.spec.clusterIP}"
    )
    assert kubedns == KUBE_DNS_IP
    workdir = tmp_path_factory.mktemp("manifest")
    manifests.run_sed("iptables", workdir, kubedns=kubedns)
    return workdir / "nodelocaldns.yaml"


@pytest.fixture(scope="module")
def installed(cluster: Cluster, manifest: Path) -> Iterator[Path]:
    cluster.kubectl("apply", "-f", str(manifest))
    yield manifest
    cluster.kubectl("delete", "-f", str(manifest), "--ignore-not-found", "--wait=true", timeout=90)
    cluster.kubectl("delete", "-f", str(manifests.API_RBAC), "--ignore-not-found")
    cluster.kubectl("delete", "configmap", "kube-dns", "-n", "kube-system", "--ignore-not-found")
    cluster.wait_gone("kube-system", AGENT)


def agent_pods(cluster: Cluster) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT, "-o", "json")
    )["items"]
    return pods


def agent_pod(cluster: Cluster) -> dict[str, object]:
    """The one agent pod, once a pod an update replaced has finished terminating (up to its grace period)."""
    poll(lambda: len(agent_pods(cluster)) == 1, 40, every=1)
    pods = agent_pods(cluster)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, object] = pods[0]
    return pod


def probe_results(cluster: Cluster, probe: str) -> dict[str, float]:
    """The kubelet's prober_probe_total for the agent's container: result → count."""
    out = cluster.node_exec(
        ["curl", "-sk", f"https://{cluster.node_ip}:10250/metrics/probes"], mount=False, timeout=10
    )
    results: dict[str, float] = {}
    for line in out.splitlines():
        if line.startswith("prober_probe_total{") and 'container="node-cache"' in line and \
                f'probe_type="{probe}"' in line:  # fmt: skip
            result = re.search(r'result="(\w+)"', line)
            assert result is not None
            results[result.group(1)] = results.get(result.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return results


def answered_by_node_cache(cluster: Cluster) -> bool:
    """The client pod's query to the ClusterIP is answered, and by the node's CoreDNS (it counts it). Pod
    Ready means CoreDNS serves; the agent puts the pods' rules in on its next successful probe round."""
    if not cluster.node_cache_up():
        return False
    served = cluster.node_cache_requests()
    return cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP and cluster.node_cache_requests() > served


def test_manifest_after_the_documented_sed_rolls_out_ready_with_the_exec_liveness_probe(
    cluster: Cluster, installed: Path
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    pod = agent_pod(cluster)
    status = pod["status"]
    assert isinstance(status, dict)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    # The exec liveness probe (`agent --check`) runs and passes: the kubelet's own count, and no restart.
    if not poll(lambda: probe_results(cluster, "Liveness").get("successful", 0) >= 1, 40, every=1):
        raise AssertionError(f"no successful liveness probe: {probe_results(cluster, 'Liveness')}")
    assert "failed" not in probe_results(cluster, "Liveness")
    assert probe_results(cluster, "Readiness").get("successful", 0) >= 1
    assert agent_pod(cluster)["status"]["containerStatuses"][0]["restartCount"] == 0  # type: ignore[index]
    assert f"inet {LOCAL_IP}/32" in cluster.links()
    # The install page's own check, through the API and the kubelet.
    cluster.kubectl("-n", "kube-system", "exec", "daemonset/node-local-dns", "--", "agent", "--check")


def test_client_pod_resolves_services_through_the_node_cache_without_conntrack(
    cluster: Cluster, installed: Path
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    served = cluster.node_cache_requests()
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    # glibc (the pod's resolv.conf: nameserver 10.96.0.10, the cluster's search path) and dig.
    getent = cluster.kubectl("exec", "client", "--", "getent", "hosts", "db.prod")
    assert getent.split() == [SERVICES["db.prod"], "db.prod.svc.cluster.local"], getent
    assert cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert cluster.dig(LOCAL_IP, SERVICE) == SERVICE_IP
    assert cluster.dig(KUBE_DNS_IP, "example.org") == "192.0.2.80"  # the "." zone, via the upstream
    # The node's CoreDNS answered them, and none of them left a conntrack entry on the node.
    assert cluster.node_cache_requests() >= served + 4
    pod_ip = cluster.kubectl("get", "pod", "client", "-o", "jsonpath={.status.podIP}")
    for server in (KUBE_DNS_IP, LOCAL_IP):
        entries = cluster.conntrack("-p", "udp", "--orig-dst", server, "--orig-src", pod_ip)
        assert "dport=53" not in entries, entries


def test_force_delete_of_the_agent_pod_under_load_falls_back_to_kube_dns(
    cluster: Cluster, installed: Path
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    first = agent_pod(cluster)["metadata"]["name"]  # type: ignore[index]
    load = cluster.start_load(rate=1000, duration=8, names=SERVICE)
    time.sleep(2)
    cluster.kubectl("delete", "pod", "-n", "kube-system", first, "--grace-period=0", "--force")
    result = json.loads(load.communicate(timeout=40)[0])
    assert result["sent"] == 8000, result
    # Only queries in flight when the pod went may be lost (a quarter of a second of load at most, on a
    # machine shared with other work), all at that moment; the rest went to kube-dns at once.
    failures = [float(t) for t in result["failure_times"]]  # type: ignore[attr-defined]
    assert int(result["failed"]) <= 250, result  # type: ignore[call-overload]
    assert not failures or max(failures) - min(failures) < 0.25, result
    assert float(result["longest_gap"]) < 1.0, result  # type: ignore[arg-type]
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    second = agent_pod(cluster)
    assert second["metadata"]["name"] != first  # type: ignore[index]
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "the new pod does not serve"


def test_rolling_update_under_load_loses_no_query_on_the_cluster_ip(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    first = agent_pod(cluster)["metadata"]["name"]  # type: ignore[index]
    # The new pod is Ready at its readiness probe's first success after it serves (every 10 s), and
    # available 5 s later (minReadySeconds): the old pod is stopped about 15 s after the update.
    duration = 30.0
    cluster_ip = cluster.start_load(rate=1000, duration=duration, names=SERVICE)
    link_local = cluster.start_load(rate=200, duration=duration, names=SERVICE, server=LOCAL_IP)
    time.sleep(2)
    cluster.kubectl("set", "env", "-n", "kube-system", "daemonset/node-local-dns", f"ROLLED={time.time()}")
    results = [json.loads(load.communicate(timeout=duration + 30)[0]) for load in (cluster_ip, link_local)]
    # The handover fell within the load: the old pod was already gone or terminating when it ended.
    old = [p for p in agent_pods(cluster) if p["metadata"]["name"] == first]
    assert all(p["metadata"].get("deletionTimestamp") for p in old), "the old pod outlived the load"
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    second = agent_pod(cluster)
    assert second["metadata"]["name"] != first, "no new pod"  # type: ignore[index]
    # The update surges: the new pod's CoreDNS serves on the same sockets before the old one stops. What the
    # old CoreDNS's socket had queued as it closed is lost (each SO_REUSEPORT socket has its own queue): none
    # in most runs, 19 of 14 000 once on a busy machine.
    assert results[0]["sent"] == 1000 * duration and results[0]["failed"] <= 25, results[0]
    assert results[0]["longest_gap"] < 1.0, results[0]
    # The link-local address has no kube-dns behind it: the surge covers it too.
    with capsys.disabled():
        for path, result in zip(("ClusterIP at 1000", "link-local at 200"), results, strict=True):
            summary = {k: result[k] for k in ("sent", "answered", "failed", "longest_gap")}
            print(f"\n[{cluster.proxy_mode}] rolling update, {path} qps: {summary}")
    assert results[1]["sent"] == 200 * duration and results[1]["failed"] <= 10, results[1]
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "the new pod does not serve"
    assert second["status"]["containerStatuses"][0]["restartCount"] == 0  # type: ignore[index]


def pod_ready(pod: dict[str, Any]) -> bool:
    return {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}.get("Ready") == "True"


def test_a_new_version_that_never_serves_is_never_ready_and_the_rollout_waits_for_an_undo(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken new version: its agent runs, its CoreDNS never serves. The old pod's CoreDNS answers /ready
    on the port both share, so only the exec readiness probe (``agent --ready``) keeps the broken pod from
    being taken for Ready and replacing the working one."""
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    first = agent_pod(cluster)["metadata"]["name"]  # type: ignore[index]
    duration = 35.0
    link_local = cluster.start_load(rate=200, duration=duration, names=SERVICE, server=LOCAL_IP)
    time.sleep(1)
    broken = [
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/args/-",
            "value": "--coredns-binary=/bin/false",
        }
    ]
    cluster.kubectl("-n", "kube-system", "patch", "daemonset", "node-local-dns", "--type=json", "-p",
                    json.dumps(broken))  # fmt: skip
    assert poll(lambda: len(agent_pods(cluster)) == 2, 60, every=1), "no surge pod"
    # Well past what the old probe needed to take it for Ready (at once) and minReadySeconds (5 s), and past
    # two periods of the exec probe.
    time.sleep(25)
    pods = {p["metadata"]["name"]: p for p in agent_pods(cluster)}
    assert first in pods, "the working pod was replaced by one that never serves"
    assert pod_ready(pods[first])
    [new] = [p for name, p in pods.items() if name != first]
    assert not pod_ready(new), new["status"]
    result = json.loads(link_local.communicate(timeout=duration + 30)[0])
    with capsys.disabled():
        summary = {k: result[k] for k in ("sent", "answered", "failed", "longest_gap")}
        print(f"\n[{cluster.proxy_mode}] a broken new version, link-local at 200 qps: {summary}")
    assert result["failed"] == 0, result  # the old pod kept serving the address no kube-dns stands behind
    cluster.kubectl("-n", "kube-system", "rollout", "undo", "daemonset/node-local-dns")
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    assert poll(lambda: [p["metadata"]["name"] for p in agent_pods(cluster)] == [first], 60, every=1)
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "the old pod does not serve"


def coredns_pids(cluster: Cluster, pod: str) -> list[int]:
    """The host pids of the CoreDNS processes of agent pod ``pod``, oldest first."""
    init = psutil.Process(cluster.pod_pid("kube-system", pod, "node-cache"))
    found = [p for p in [init, *init.children(recursive=True)] if p.name() == "coredns"]
    return [p.pid for p in sorted(found, key=lambda p: p.create_time())]


def test_twins_set_with_kubectl_patch_keep_the_link_local_address_answering_when_one_is_killed(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--coredns-instances=2`` rolled out like any change (a surge), then one CoreDNS SIGKILLed under load
    on the link-local address, which no kube-dns stands behind: the other answers its share at once, the
    agent restarts the killed one, and the pod is neither restarted nor unready."""
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    flag = "--coredns-instances=2"
    twins = [{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": flag}]
    cluster.kubectl("-n", "kube-system", "patch", "daemonset", "node-local-dns", "--type=json", "-p",
                    json.dumps(twins))  # fmt: skip
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    pod = agent_pod(cluster)
    name = pod["metadata"]["name"]  # type: ignore[index]
    assert poll(lambda: len(coredns_pids(cluster, name)) == 2, 30, every=0.5), "no twins"
    killed = coredns_pids(cluster, name)[0]
    load = cluster.start_load(rate=1000, duration=8, names=SERVICE, server=LOCAL_IP)
    time.sleep(3)
    os.kill(killed, signal.SIGKILL)
    result = json.loads(load.communicate(timeout=40)[0])
    with capsys.disabled():
        summary = {k: result[k] for k in ("sent", "answered", "failed", "longest_gap")}
        print(f"\n[{cluster.proxy_mode}] one of two CoreDNS killed, link-local at 1000 qps: {summary}")
    assert result["sent"] == 8000, result
    assert result["failed"] <= 10, result  # what the killed one had queued or was answering
    assert poll(lambda: len(coredns_pids(cluster, name)) == 2, 30, every=0.5), "the killed twin not restarted"
    assert killed not in coredns_pids(cluster, name)
    pod = agent_pod(cluster)
    assert pod["metadata"]["name"] == name and pod_ready(pod)  # type: ignore[index, arg-type]
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0  # type: ignore[index]
    cluster.kubectl("-n", "kube-system", "rollout", "undo", "daemonset/node-local-dns")
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "no pod serves after the undo"


def stub_domains(*zones: str) -> str:
    return json.dumps({zone: [STUB_DNS_IP] for zone in zones})


def test_a_stub_domain_added_with_kubectl_edit_is_answered_through_the_cache_with_no_query_lost(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    meta = {"name": "kube-dns", "namespace": "kube-system"}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"stubDomains": stub_domains()},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(configmap))
    duration = 20.0
    load = cluster.start_load(rate=500, duration=duration, names=SERVICE)
    time.sleep(1)
    started = time.monotonic()
    cluster.kubectl_edit(
        "kube-system", "configmap/kube-dns", f"s|stubDomains: .*|stubDomains: '{stub_domains('acme.local')}'|"
    )
    name, ip = "www.acme.local", STUB_NAMES["www.acme.local"]
    answered = poll(lambda: cluster.dig(KUBE_DNS_IP, name) == ip, 40, every=0.25)
    elapsed = time.monotonic() - started
    result = json.loads(load.communicate(timeout=duration + 30)[0])
    assert answered, f"{name} not answered within 40 s of the edit"
    assert result["failed"] == 0, result
    # Through the node's cache: the pod's query leaves no conntrack entry, the cache's forward to the stub
    # server's ClusterIP does (a fresh name under the zone, so the cache cannot answer it by itself).
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    assert cluster.dig(KUBE_DNS_IP, f"fresh-{time.monotonic_ns()}.{name}") == ip
    assert "dport=53" not in cluster.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
    assert f"src={cluster.node_ip} dst={STUB_DNS_IP}" in cluster.conntrack("--orig-dst", STUB_DNS_IP)
    with capsys.disabled():
        print(
            f"\n[{cluster.proxy_mode}] stub domain via the mounted ConfigMap: answered {elapsed:.1f}s later"
        )


def test_the_api_source_answers_a_stub_domain_added_with_kubectl_edit_within_a_second(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The install page's optional step: the Role and RoleBinding, then the documented patch (flag and token).
    cluster.kubectl("apply", "-f", str(manifests.API_RBAC))
    patch = json.dumps(manifests.documented_patch())
    cluster.kubectl("-n", "kube-system", "patch", "daemonset", "node-local-dns", "--type=json", "-p", patch)
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    assert poll(
        lambda: cluster.dig(KUBE_DNS_IP, "www.acme.local") == STUB_NAMES["www.acme.local"], 30, every=0.5
    )
    name, ip = "www.beta.local", STUB_NAMES["www.beta.local"]
    started = time.monotonic()
    cluster.kubectl_edit(
        "kube-system", "configmap/kube-dns",
        f"s|stubDomains: .*|stubDomains: '{stub_domains('acme.local', 'beta.local')}'|",
    )  # fmt: skip
    answered = poll(lambda: cluster.dig(KUBE_DNS_IP, name) == ip, 10, every=0.05)
    elapsed = time.monotonic() - started
    assert answered, f"{name} not answered within 10 s of the edit"
    with capsys.disabled():
        print(
            f"\n[{cluster.proxy_mode}] stub domain via the API source: answered {elapsed:.2f}s after the edit"
        )
    assert elapsed < 2.0  # about a second; kubectl edit's own round trip is in it


def container_status(cluster: Cluster) -> dict[str, Any]:
    statuses = agent_pod(cluster)["status"].get("containerStatuses") or [{}]  # type: ignore[attr-defined]
    status: dict[str, Any] = statuses[0]
    return status


def test_a_memory_limit_too_small_is_reported_oomkilled_while_pods_keep_resolving(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    daemonset = cluster.get("daemonset", "node-local-dns")
    resources = daemonset["spec"]["template"]["spec"]["containers"][0]["resources"]
    duration = 20.0
    load = cluster.start_load(rate=500, duration=duration, names=SERVICE)
    time.sleep(1)
    cluster.kubectl("-n", "kube-system", "set", "resources", "daemonset/node-local-dns", "-c", "node-cache",
                    f"--limits=memory={OOM_LIMIT}", f"--requests=memory={OOM_LIMIT}")  # fmt: skip

    # The update surges: the new pod, with the limit, runs next to the old one, which keeps serving (a new
    # version that cannot run never replaces a working one); the kubelet reports the new one OOMKilled.
    def limited_statuses() -> list[dict[str, Any]]:
        return [
            status
            for pod in agent_pods(cluster)
            if pod["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("memory") == OOM_LIMIT
            for status in pod["status"].get("containerStatuses") or []
        ]

    def oom_killed() -> bool:
        return any(
            status.get(key, {}).get("terminated", {}).get("reason") == "OOMKilled"
            for status in limited_statuses()
            for key in ("state", "lastState")
        )

    reported = poll(oom_killed, 60, every=1)
    result = json.loads(load.communicate(timeout=duration + 30)[0])
    with capsys.disabled():
        summary = {k: result[k] for k in ("sent", "answered", "failed", "longest_gap")}
        print(f"\n[{cluster.proxy_mode}] limit {OOM_LIMIT}: OOMKilled {bool(reported)}, ClusterIP: {summary}")
    assert reported, limited_statuses()
    assert result["failed"] == 0, result  # the old pod served meanwhile
    # Back without the limit: the pod serves again.
    restore = [{"op": "replace", "path": "/spec/template/spec/containers/0/resources", "value": resources}]
    cluster.kubectl("-n", "kube-system", "patch", "daemonset", "node-local-dns", "--type=json", "-p",
                    json.dumps(restore))  # fmt: skip
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)

    assert poll(lambda: len(agent_pods(cluster)) == 1, 60, every=1), "the limited pod is still there"
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "the pod does not serve again"


def test_a_stopped_agent_fails_its_liveness_probe_and_is_restarted_while_dns_falls_back(
    cluster: Cluster, installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5)
    pod = agent_pod(cluster)["metadata"]["name"]  # type: ignore[index]
    restarts = container_status(cluster)["restartCount"]
    failed_probes = probe_results(cluster, "Liveness").get("failed", 0)
    # The container's first process stays PID 1 (it reaps and forwards signals); the agent is its child.
    init = cluster.pod_pid("kube-system", pod, container="node-cache")
    (agent,) = map(int, Path(f"/proc/{init}/task/{init}/children").read_text().split())
    assert b"agent" in Path(f"/proc/{agent}/cmdline").read_bytes()
    # The manifest's probe: --check-max-age 10 s, every 10 s, 3 failures; then the 20 s grace period.
    duration = 80.0
    load = cluster.start_load(rate=200, duration=duration, names=SERVICE)
    time.sleep(1)
    stopped = time.monotonic()
    os.kill(agent, signal.SIGSTOP)
    try:
        restarted = poll(lambda: container_status(cluster).get("restartCount", 0) > restarts, 78, every=1)
        elapsed = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent, signal.SIGCONT)
    result = json.loads(load.communicate(timeout=duration + 30)[0])
    with capsys.disabled():
        summary = {k: result[k] for k in ("sent", "answered", "failed", "longest_gap")}
        print(f"\n[{cluster.proxy_mode}] SIGSTOP of the agent: restart after {elapsed:.0f}s; load {summary}")
    assert restarted, container_status(cluster)
    assert probe_results(cluster, "Liveness").get("failed", 0) >= failed_probes + 3
    # CoreDNS served while the agent was stopped; the container's kill stopped it, and the kernel gate sent
    # the queries to kube-dns: at most those in flight are lost.
    failures = [float(t) for t in result["failure_times"]]  # type: ignore[attr-defined]
    assert int(result["failed"]) <= 50, result  # type: ignore[call-overload]
    assert not failures or max(failures) - min(failures) < 0.25, result
    assert poll(lambda: answered_by_node_cache(cluster), 20, every=0.5), "the restarted agent does not serve"


def assert_node_as_before(cluster: Cluster, before: dict[str, str]) -> None:
    """The node's tables (within 30 s: kube-proxy syncs the removed Services) and addresses as ``before``."""
    if not poll(lambda: cluster.normalized_tables() == before["tables"], 30, every=1):
        diff = difflib.unified_diff(before["tables"].splitlines(), cluster.normalized_tables().splitlines(),
                                    "before", "after", lineterm="")  # fmt: skip
        raise AssertionError("the node's tables differ:\n" + "\n".join(diff))
    assert cluster.links().splitlines() == before["links"].splitlines()


def test_kubectl_delete_of_the_manifest_leaves_the_node_tables_as_before(
    cluster: Cluster, installed: Path, before_install: dict[str, str]
) -> None:
    installed_tables = cluster.normalized_tables()
    assert installed_tables != before_install["tables"]
    assert "NodeLocal DNS" in installed_tables  # the agent's rules, tagged
    cluster.kubectl("delete", "-f", str(installed), "--wait=true", timeout=90)
    cluster.wait_gone("kube-system", AGENT)
    assert_node_as_before(cluster, before_install)
    assert cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP  # kube-dns answers the pods again


def test_the_helm_chart_with_the_same_values_serves_and_its_uninstall_leaves_the_tables_as_before(
    cluster: Cluster, before_install: dict[str, str]
) -> None:
    # After the manifest's uninstall (the test before): the chart as docs/install.md installs it.
    assert cluster.normalized_tables() == before_install["tables"]
    kubedns = cluster.kubectl(
        "get", "svc", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.spec.clusterIP}"
    )
    chart = str(manifests.REPO / "chart")
    cluster.cp.helm("install", "node-local-dns", chart, "-n", "kube-system", "--set", f"kubeDNS.ip={kubedns}")
    try:
        cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
        assert poll(lambda: answered_by_node_cache(cluster), 10, every=0.5), "the chart's pod does not serve"
        cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
        assert cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP
        assert "dport=53" not in cluster.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
        assert container_status(cluster)["restartCount"] == 0
    finally:
        cluster.cp.helm("uninstall", "node-local-dns", "-n", "kube-system", "--wait")
    cluster.wait_gone("kube-system", AGENT)
    assert_node_as_before(cluster, before_install)
