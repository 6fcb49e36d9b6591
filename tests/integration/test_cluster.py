"""The shipped DaemonSet on a real single-node cluster (tests/cluster.py), kube-proxy in iptables mode and in
nftables mode (the README's iptables-mode sed serves both).

The manifest is installed as the README says (the documented sed, ``kubectl apply -f``), run by a real
kubelet from the agent's image, and proven from a real pod: queries to the kube-dns ClusterIP are answered by
the node's cache without a conntrack entry; a force delete of the agent's pod under load falls back to
kube-dns; and ``kubectl delete -f`` leaves the node's packet filter as it was before the install. The tests
share one install and run in file order (the last one removes it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import manifests
from tests.cluster import KUBE_DNS_IP, REPO, SERVICES, Cluster, ClusterError
from tests.waiting import poll

LOCAL_IP = manifests.LOCALDNS
SERVICE = "web.default.svc.cluster.local"
SERVICE_IP = SERVICES["web.default"]
AGENT = "k8s-app=node-local-dns"
# The first test also starts the session's cluster (about 20 s on an idle machine; more when it is shared).
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """The session's cluster of each kube-proxy mode; the tests run on one mode, then on the other."""
    result: Cluster = request.getfixturevalue(f"{request.param}_cluster")
    return result


@pytest.fixture(scope="module")
def before_install(cluster: Cluster) -> dict[str, str]:
    """The node's packet filter and addresses before the manifest is applied."""
    return {"tables": normalized_tables(cluster), "links": cluster.links()}


@pytest.fixture(scope="module")
def manifest(
    cluster: Cluster, before_install: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """image/nodelocaldns.yaml after the README's iptables-mode sed, with the cluster's kube-dns ClusterIP."""
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
    wait_no_agent_pod(cluster)


IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


def normalized_tables(cluster: Cluster) -> str:
    """The node's packet filter as sorted lines (kube-proxy writes rules in map order, not a fixed one): the
    saves of iptables-legacy and iptables-nft, and every other nftables table (kube-proxy's in nftables mode)
    listed by nft. A table with no rule and only built-in chains that accept is left out: iptables creates one
    on first use and never removes it (an empty ``raw`` table does nothing to a packet)."""
    lines: list[str] = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        table: list[str] = []
        for line in cluster.node_exec([tool], mount=False, check=False).splitlines():
            if line.startswith("*"):
                table = [line]
            elif line == "COMMIT":
                if any(not re.fullmatch(r":[A-Z]+ ACCEPT", entry) for entry in table[1:]):
                    lines += [f"{tool} {table[0]} {entry}" for entry in table[1:]]
            elif line and not line.startswith("#"):
                table.append(line.split(" [")[0] if line.startswith(":") else line)
    for listed in cluster.node_exec(["nft", "list", "tables"], mount=False).splitlines():
        _, family, name = listed.split()
        if family in ("ip", "ip6") and name in IPTABLES_TABLES:
            continue  # iptables-nft's, in its save above
        text = cluster.node_exec(["nft", "-s", "list", "table", family, name], mount=False)
        lines += [f"nft {family} {name} {line.strip()}" for line in text.splitlines() if line.strip()]
    return "\n".join(sorted(lines))


def agent_pod(cluster: Cluster) -> dict[str, object]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT, "-o", "json"))["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, object] = pods[0]
    return pod


def wait_no_agent_pod(cluster: Cluster, timeout: float = 60) -> None:
    def gone() -> bool:
        out = cluster.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT, "-o", "name")
        return not out.strip()

    if not poll(gone, timeout, every=0.5):
        raise ClusterError(f"node-local-dns pod still there after {timeout}s")


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


def node_coredns_requests(cluster: Cluster) -> float:
    """Requests the node's CoreDNS (the agent's child, prometheus :9253 in the node) has served."""
    out = cluster.node_exec(["curl", "-s", "http://127.0.0.1:9253/metrics"], mount=False, timeout=10)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in out.splitlines()
        if line.startswith("coredns_dns_requests_total{")
    )


def dig(cluster: Cluster, server: str, name: str) -> str:
    out = cluster.in_pod("client", ["dig", f"@{server}", name, "+short", "+time=1", "+tries=1"], check=False)
    return "\n".join(line for line in out.splitlines() if line and not line.startswith(";"))


def start_load(cluster: Cluster, *, rate: float, duration: float) -> subprocess.Popen[str]:
    """A bounded ``tests.dnsload`` run from the client pod's network namespace; its stdout is the summary."""
    load = ["--server", KUBE_DNS_IP, "--rate", str(rate), "--duration", str(duration), "--names", SERVICE]
    return cluster.popen_in_pod(
        "client", [sys.executable, "-m", "tests.dnsload", *load], stdout=subprocess.PIPE, text=True, cwd=REPO
    )


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
    # The README's own check, through the API and the kubelet.
    cluster.kubectl("-n", "kube-system", "exec", "daemonset/node-local-dns", "--", "agent", "--check")


def test_client_pod_resolves_services_through_the_node_cache_without_conntrack(
    cluster: Cluster, installed: Path
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    served = node_coredns_requests(cluster)
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    # glibc (the pod's resolv.conf: nameserver 10.96.0.10, the cluster's search path) and dig.
    getent = cluster.kubectl("exec", "client", "--", "getent", "hosts", "db.prod")
    assert getent.split() == [SERVICES["db.prod"], "db.prod.svc.cluster.local"], getent
    assert dig(cluster, KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert dig(cluster, LOCAL_IP, SERVICE) == SERVICE_IP
    assert dig(cluster, KUBE_DNS_IP, "example.org") == "192.0.2.80"  # the "." zone, via the upstream
    # The node's CoreDNS answered them, and none of them left a conntrack entry on the node.
    assert node_coredns_requests(cluster) >= served + 4
    pod_ip = cluster.kubectl("get", "pod", "client", "-o", "jsonpath={.status.podIP}")
    for server in (KUBE_DNS_IP, LOCAL_IP):
        entries = cluster.conntrack("-p", "udp", "--orig-dst", server, "--orig-src", pod_ip)
        assert "dport=53" not in entries, entries


def test_force_delete_of_the_agent_pod_under_load_falls_back_to_kube_dns(
    cluster: Cluster, installed: Path
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    first = agent_pod(cluster)["metadata"]["name"]  # type: ignore[index]
    load = start_load(cluster, rate=1000, duration=8)
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
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    served = node_coredns_requests(cluster)
    assert dig(cluster, KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert node_coredns_requests(cluster) > served


def test_kubectl_delete_of_the_manifest_leaves_the_node_tables_as_before(
    cluster: Cluster, installed: Path, before_install: dict[str, str]
) -> None:
    installed_tables = normalized_tables(cluster)
    assert installed_tables != before_install["tables"]
    assert "NodeLocal DNS" in installed_tables  # the agent's rules, tagged
    cluster.kubectl("delete", "-f", str(installed), "--wait=true", timeout=90)
    wait_no_agent_pod(cluster)
    if not poll(lambda: normalized_tables(cluster) == before_install["tables"], 30, every=1):
        import difflib

        diff = difflib.unified_diff(
            before_install["tables"].splitlines(), normalized_tables(cluster).splitlines(), lineterm=""
        )
        raise AssertionError("tables differ after delete:\n" + "\n".join(diff))
    assert cluster.links().splitlines() == before_install["links"].splitlines()
    assert dig(cluster, KUBE_DNS_IP, SERVICE) == SERVICE_IP  # kube-dns answers the pods again
