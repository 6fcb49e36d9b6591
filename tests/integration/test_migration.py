"""Migrating from node-cache to the agent and back on the real cluster (docs/upgrades.md, "Migrating from
node-cache"), kube-proxy in iptables mode and in nftables mode (the session's ``cluster`` fixture).

Upstream's manifest (tests/fixtures/upstream-nodelocaldns.yaml) is installed as its instructions say, with
the real node-cache 1.26.7 (image/node-cache/Dockerfile); then, under a bounded load from a pod on the
kube-dns ClusterIP and on the link-local address, the agent's manifest (image/nodelocaldns.yaml, the same
ConfigMap) is applied as the docs' migration says, and upstream's again as their rollback says. Each
direction counts the queries lost on each address and checks what the other program leaves in the node's
tables: no node-cache rule survives the migration, no agent rule the rollback; upstream's uninstall leaves
the tables and addresses as before. The tests share one install and run in file order. Skipped without the
node-cache binary (see harness/nodecache.py); in CI that skip is a failure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import manifests, migration
from harness.cluster import KUBE_DNS_IP, SERVICES, Cluster
from harness.migration import AGENT_TAG, NODE_CACHE_IMAGE, NODE_CACHE_TAG, Transition
from harness.waiting import poll

_reason = migration.unavailable()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(_reason is not None, reason=_reason or "")]

UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream-nodelocaldns.yaml"
LOCAL_IP = manifests.LOCALDNS
SERVICE = "web.default.svc.cluster.local"
SERVICE_IP = SERVICES["web.default"]
AGENT_IMAGE = "node-local-dns-agent:0.1.0"  # as image/nodelocaldns.yaml names it
# The loads: the ClusterIP as the rolling-update test loads it; the link-local address, no kube-dns behind it.
LOADS = {"ClusterIP": (KUBE_DNS_IP, 1000.0), "link-local": (LOCAL_IP, 200.0)}


@pytest.fixture(scope="module")
def before(cluster: Cluster) -> dict[str, str]:
    """The node's packet filter and addresses before anything is installed."""
    return {"tables": cluster.normalized_tables(), "links": cluster.links()}


@pytest.fixture(scope="module")
def files(
    cluster: Cluster, before: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Both manifests after the operator's sed, for the cluster's kube-dns ClusterIP."""
    kubedns = cluster.kubectl(
        "get", "svc", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.spec.clusterIP}"
    )
    assert kubedns == KUBE_DNS_IP
    upstream = migration.upstream_manifest(UPSTREAM, tmp_path_factory.mktemp("upstream"), kubedns)
    agent_dir = tmp_path_factory.mktemp("agent")
    manifests.run_sed("iptables", agent_dir, kubedns=kubedns)
    return {"upstream": upstream, "agent": agent_dir / "nodelocaldns.yaml"}


@pytest.fixture(scope="module")
def node(cluster: Cluster, files: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """node-cache's image in the node and the link driver's stand-in; whatever is installed at the end is
    deleted (the last test deletes it and checks the node)."""
    migration.import_node_cache_image(cluster)
    with migration.link_driver_standin(cluster):
        try:
            yield files
        finally:
            cluster.kubectl("delete", "-f", str(files["upstream"]), "--ignore-not-found", "--wait=true",
                            timeout=90, check=False)  # fmt: skip
            cluster.wait_gone("kube-system", migration.SELECTOR, timeout=90)


def serves(cluster: Cluster) -> bool:
    return all(cluster.dig(ip, SERVICE) == SERVICE_IP for ip in (KUBE_DNS_IP, LOCAL_IP))


def report(cluster: Cluster, transition: Transition, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n[{cluster.proxy_mode}] {transition.summary()}")


def test_upstream_manifest_with_node_cache_rolls_out_and_serves_with_its_rules(
    cluster: Cluster, node: dict[str, Path]
) -> None:
    cluster.kubectl("apply", "-f", str(node["upstream"]))
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    [pod] = migration.pods(cluster)
    assert migration.pod_image(pod) == NODE_CACHE_IMAGE
    # node-cache installs its rules once its CoreDNS serves (it polls for the pidfile every second).
    assert poll(lambda: serves(cluster) and migration.tagged_rules(cluster, NODE_CACHE_TAG), 60, every=1), (
        cluster.kubectl("logs", "-n", "kube-system", pod["metadata"]["name"], check=False)
    )
    assert not migration.tagged_rules(cluster, AGENT_TAG)
    # The answer came from node-cache's CoreDNS: the ClusterIP's query left no conntrack entry.
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    assert cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP
    assert "dport=53" not in cluster.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)


def test_migration_to_the_agent_under_load_surges_and_leaves_no_node_cache_rule(
    cluster: Cluster, node: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    # The agent's manifest surges (its update strategy is the one that applies): the agent's pod is Ready at
    # its readiness probe's first success after it serves (every 10 s), node-cache's pod is stopped 5 s later.
    transition = migration.apply_under_load(cluster, node["agent"], name="node-cache → agent",
                                            new_image=AGENT_IMAGE, loads=LOADS, duration=30,
                                            names=SERVICE)  # fmt: skip
    report(cluster, transition, capsys)
    assert transition.old_gone_after is not None, "node-cache's pod outlived the load"
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    # No rule of node-cache's survives (its own SIGTERM teardown removes what the agent's start left).
    assert poll(lambda: not migration.tagged_rules(cluster, NODE_CACHE_TAG), 30, every=1), (
        migration.tagged_rules(cluster, NODE_CACHE_TAG)
    )
    assert migration.tagged_rules(cluster, AGENT_TAG)
    assert poll(lambda: serves(cluster), 20, every=0.5), "the agent does not serve both addresses"
    for address in LOADS:
        assert transition.sent(address) == LOADS[address][1] * 30, transition.results[address]
    # The link-local address: node-cache's SIGTERM teardown deletes the interface both share (node-cache takes
    # no agents lock, so it cannot know another cache uses it); the agent puts it back when the kernel reports
    # it gone. Measured: 5-48 of 6000, one gap under 0.3 s.
    link_local = transition.results["link-local"]
    assert link_local["failed"] <= 150 and link_local["longest_gap"] < 1.0, transition.summary()
    # The ClusterIP: the agent's start takes node-cache's live rules for leftovers and removes them, so the
    # ClusterIP goes to kube-dns until the agent's own CoreDNS serves (about 4 s: half its probes reach
    # node-cache's CoreDNS on the shared port, which answers SERVFAIL for the agent's probe zone); kube-dns,
    # a pod without CPU requests here, times out a part of them on this busy machine. Measured: 231-1033 of
    # 30 000; kube-dns's whole share at most, about 5 s of the load.
    assert transition.results["ClusterIP"]["failed"] <= 5000, transition.summary()


def test_rollback_to_node_cache_under_load_leaves_no_agent_rule(
    cluster: Cluster, node: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    # Upstream's strategy (maxUnavailable, no surge): the agent's pod goes first, node-cache's starts after.
    transition = migration.apply_under_load(cluster, node["upstream"], name="agent → node-cache",
                                            new_image=NODE_CACHE_IMAGE, loads=LOADS, duration=25,
                                            names=SERVICE)  # fmt: skip
    report(cluster, transition, capsys)
    assert transition.old_gone_after is not None, "the agent's pod outlived the load"
    cluster.wait_rollout("daemonset", "node-local-dns", timeout=120)
    assert poll(lambda: not migration.tagged_rules(cluster, AGENT_TAG), 30, every=1), migration.tagged_rules(
        cluster, AGENT_TAG
    )
    assert poll(lambda: serves(cluster) and migration.tagged_rules(cluster, NODE_CACHE_TAG), 60, every=1)
    for address in LOADS:
        assert transition.sent(address) == LOADS[address][1] * 25, transition.results[address]
    # Upstream's update strategy has no surge, so the node has no cache from the agent's exit (its SIGTERM
    # removes the rules and the interface: DNS back to kube-dns) until node-cache's CoreDNS serves: the
    # link-local address, with nothing behind it, goes unanswered (measured: 249-800 of 5000, a gap of
    # 1.3-4.1 s); the ClusterIP goes to kube-dns (measured: 10-1517 of 25 000 lost, kube-dns's timeouts).
    link_local = transition.results["link-local"]
    assert link_local["failed"] <= 1600 and link_local["longest_gap"] < 8.0, transition.summary()
    assert transition.results["ClusterIP"]["failed"] <= 5000, transition.summary()


def test_deleting_upstream_manifest_leaves_the_node_as_before(
    cluster: Cluster, node: dict[str, Path], before: dict[str, str]
) -> None:
    cluster.kubectl("delete", "-f", str(node["upstream"]), "--wait=true", timeout=90)
    cluster.wait_gone("kube-system", migration.SELECTOR, timeout=90)
    if not poll(lambda: cluster.normalized_tables() == before["tables"], 30, every=1):
        diff = difflib.unified_diff(before["tables"].splitlines(), cluster.normalized_tables().splitlines(),
                                    "before", "after", lineterm="")  # fmt: skip
        raise AssertionError("the node's tables differ:\n" + "\n".join(diff))
    # node-cache's teardown removed its addresses and the link (the stand-in's empty bridge is back, and goes
    # with it at the end of the module).
    links = cluster.links().splitlines()
    assert [line for line in links if migration.INTERFACE not in line] == before["links"].splitlines()
    assert cluster.dig(KUBE_DNS_IP, SERVICE) == SERVICE_IP  # kube-dns answers the pods again
