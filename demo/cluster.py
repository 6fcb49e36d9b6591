"""The cluster demo: the shipped DaemonSet on a real single-node Kubernetes cluster (harness/cluster.py).

``python -m demo.cluster [--mode iptables|nftables]`` starts the cluster (etcd, kube-apiserver,
containerd, kubelet, kube-proxy, controller-manager, scheduler and a CoreDNS kube-dns inside the sandbox's
namespaces), installs ``image/nodelocaldns.yaml`` as docs/install.md says, shows a pod resolving through the
node's
cache, a force delete of the agent's pod under load, and ``kubectl delete -f``; then removes everything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import manifests
from harness.cluster import KUBE_DNS_IP, SERVICES, Cluster, started
from harness.waiting import poll

SERVICE = "web.default.svc.cluster.local"
AGENT = "k8s-app=node-local-dns"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def path_of_query(cluster: Cluster) -> str:
    """Where the client pod's query to the ClusterIP went: the node's CoreDNS counters and conntrack tell."""
    served = cluster.node_cache_requests() if cluster.node_cache_up() else 0.0
    cluster.node_exec(["conntrack", "-F"], mount=False, check=False)
    answer = cluster.dig(KUBE_DNS_IP, SERVICE)
    tracked = "dport=53" in cluster.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
    local = cluster.node_cache_up() and cluster.node_cache_requests() > served
    via = "the node's cache (not tracked)" if local and not tracked else "kube-proxy to kube-dns (tracked)"
    return f"{answer or 'no answer':12} via {via}"


def settled_path(cluster: Cluster) -> str:
    """The query's path once the new pod's agent has put its rules in (Ready means CoreDNS serves; the
    rules follow on the agent's next successful probe round)."""
    path = ""

    def local() -> bool:
        nonlocal path
        path = path_of_query(cluster)
        return "node's cache" in path

    poll(local, 10, every=0.5)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(prog="demo_cluster")
    parser.add_argument("--mode", choices=["iptables", "nftables"], default="iptables", help="kube-proxy's")
    mode = parser.parse_args().mode
    say(f"starting a single-node cluster, kube-proxy in {mode} mode (all inside the sandbox's namespaces)")
    t0 = time.monotonic()
    with started(mode) as cluster, tempfile.TemporaryDirectory() as tmp:
        print(f"  node Ready and kube-dns serving in {cluster.startup_seconds:.1f}s (run {cluster.run_id})")
        print(cluster.kubectl("get", "pods", "-A", "-o", "wide"))
        before = cluster.normalized_tables()
        print(f"  the client pod's query, before the install: {path_of_query(cluster)}")

        say("image/nodelocaldns.yaml after the documented sed, applied with kubectl")
        kubedns = cluster.kubectl("get", "svc", "kube-dns", "-n", "kube-system", "-o",
                                  "jsonpath={.spec.clusterIP}")  # fmt: skip
        manifests.run_sed("iptables", Path(tmp), kubedns=kubedns)
        manifest = str(Path(tmp) / "nodelocaldns.yaml")
        print(cluster.kubectl("apply", "-f", manifest), end="")
        t1 = time.monotonic()
        cluster.wait_rollout("daemonset", "node-local-dns")
        print(f"  rolled out, pod Ready {time.monotonic() - t1:.1f}s after the apply")
        print(cluster.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT, "-o", "wide"), end="")
        print(f"  the client pod's query, now:               {settled_path(cluster)}")
        getent = cluster.kubectl("exec", "client", "--", "getent", "hosts", "db.prod").split()
        expected = SERVICES["db.prod"]
        print(f"  getent hosts db.prod in the pod (glibc):   {' '.join(getent)} (expected {expected})")

        say("kubectl delete pod --grace-period=0 --force of the agent's pod, under 1000 qps from a pod")
        pod = cluster.kubectl("get", "pods", "-n", "kube-system", "-l", AGENT, "-o", "name").strip()
        load = cluster.start_load(rate=1000, duration=8, names=SERVICE)
        time.sleep(2)
        cluster.kubectl("delete", "-n", "kube-system", pod, "--grace-period=0", "--force")
        result = json.loads(load.communicate(timeout=40)[0])
        print(f"  {result['sent']} sent, {result['answered']} answered, {result['failed']} lost; longest gap "
              f"between answers {float(result['longest_gap']) * 1000:.0f} ms")  # fmt: skip
        cluster.wait_rollout("daemonset", "node-local-dns")
        print(f"  the new pod serves; the client pod's query: {settled_path(cluster)}")

        say("kubectl delete -f: the node's tables as before the install")
        cluster.kubectl("delete", "-f", manifest, "--wait=true", timeout=90)
        cluster.wait_gone("kube-system", AGENT)
        same = bool(poll(lambda: cluster.normalized_tables() == before, 30, every=1))
        print(f"  packet filter as before: {'yes' if same else 'NO'}; the client pod's query: "
              f"{path_of_query(cluster)}")  # fmt: skip
        say("removing the cluster")
    print(f"  everything removed; {time.monotonic() - t0:.0f}s in all")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
