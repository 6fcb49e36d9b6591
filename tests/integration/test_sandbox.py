"""The node sandbox is real: pods resolve through kube-proxy-like DNAT to a real CoreDNS, in both flavours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import sandbox as sb
from harness.sandbox import KUBE_DNS_IP, KUBE_DNS_IP6, KUBE_DNS_UPSTREAM_IP, SERVICES, STUB_DOMAIN
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[2]


def dnspython(box: sb.Sandbox, ns: str, server: str, name: str, *extra: str) -> dict[str, object]:
    out = box.exec(
        ns, [sys.executable, "-m", "harness.dnsclient", "query", server, name, *extra], check=False
    )
    result: dict[str, object] = json.loads(out)
    return result


def test_pod_resolves_a_service_through_the_cluster_ip_with_dig(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    assert box.dig(box.pod(0), KUBE_DNS_IP, "web.default.svc.cluster.local") == "10.96.10.20"


def test_pod_resolves_a_service_with_dnspython(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    result = dnspython(box, box.pod(0), KUBE_DNS_IP, "db.prod.svc.cluster.local")
    assert result == {"ok": True, "rcode": "NOERROR", "answers": ["10.96.20.30"]}


def test_pod_resolves_a_short_name_through_glibc_and_its_search_path(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    out = box.exec(box.pod(0), ["getent", "hosts", "web.default"])
    assert out.split() == ["10.96.10.20", "web.default.svc.cluster.local"]


def test_cluster_ip_query_is_dnatted_to_the_kube_dns_pod(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    box.flush_conntrack()
    box.dig(box.pod(0), KUBE_DNS_IP, "kubernetes.default.svc.cluster.local")
    box.dig(box.pod(0), KUBE_DNS_UPSTREAM_IP, "kubernetes.default.svc.cluster.local")
    for cluster_ip in (KUBE_DNS_IP, KUBE_DNS_UPSTREAM_IP):
        entries = box.conntrack("-p", "udp", "--orig-dst", cluster_ip)
        # The reply direction comes from the kube-dns pod: the DNAT of the kube-proxy rules happened.
        assert f"dst={cluster_ip}" in entries
        assert f"src={box.kube_dns_pod_ip} dst={box.pod_ip(0)} sport=53" in entries


def test_tcp_queries_work_through_the_cluster_ip(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    assert box.dig(box.pod(0), KUBE_DNS_IP, "web.default.svc.cluster.local", tcp=True) == "10.96.10.20"
    result = dnspython(box, box.pod(0), KUBE_DNS_IP, "web.default.svc.cluster.local", "--tcp")
    assert result["answers"] == ["10.96.10.20"]
    assert "ESTABLISHED" in box.conntrack("-p", "tcp", "--orig-dst", KUBE_DNS_IP) or box.conntrack(
        "-p", "tcp", "--orig-dst", KUBE_DNS_IP
    )


def test_ipv6_cluster_ip_is_dnatted_too(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    assert box.dig(box.pod(0), KUBE_DNS_IP6, "web.default.svc.cluster.local") == "10.96.10.20"
    assert f"src={box.kube_dns_pod_ip6}" in box.conntrack("-f", "ipv6", "--orig-dst", KUBE_DNS_IP6)


def test_kube_dns_serves_headless_srv_reverse_and_external_records(shared_sandbox: sb.Sandbox) -> None:
    box, pod = shared_sandbox, shared_sandbox.pod(1)
    headless = box.dig(pod, KUBE_DNS_IP, "cassandra.prod.svc.cluster.local").split()
    assert sorted(headless) == SERVICES.headless["cassandra.prod.svc.cluster.local"]
    srv = box.dig(pod, KUBE_DNS_IP, "_cql._tcp.cassandra.prod.svc.cluster.local", "SRV").splitlines()
    assert len(srv) == 3 and all(" 9042 cassandra-" in line for line in srv)
    assert box.dig(pod, KUBE_DNS_IP, "20.10.96.10.in-addr.arpa", "PTR") == "web.default.svc.cluster.local."
    assert box.dig(pod, KUBE_DNS_IP, "www.example.org") == "192.0.2.81"
    assert box.dig(pod, KUBE_DNS_IP, "missing.default.svc.cluster.local") == ""


def test_stub_server_answers_its_domain_on_both_ports(shared_sandbox: sb.Sandbox) -> None:
    box = shared_sandbox
    for port in ("53", "5353"):
        result = dnspython(box, box.pod(0), box.stub_ip, f"www.{STUB_DOMAIN}", "--port", port)
        assert result["answers"] == ["198.51.100.7"]


def test_each_namespace_has_its_own_resolv_conf(shared_sandbox: sb.Sandbox) -> None:
    box = shared_sandbox
    assert box.exec(box.pod(0), ["cat", "/etc/resolv.conf"]).startswith(f"nameserver {KUBE_DNS_IP}\n")
    assert box.exec(box.node, ["cat", "/etc/resolv.conf"]).startswith(f"nameserver {box.kube_dns_pod_ip}\n")


def test_nothing_routes_out_of_the_sandbox(shared_sandbox: sb.Sandbox) -> None:
    box = shared_sandbox
    for ns in box.all_namespaces:
        routes = box.exec(ns, ["ip", "route", "get", "192.0.2.1"], check=False)
        # Pods route to the node; the node has no default route, so the lookup fails there.
        assert "via" not in routes or ns != box.node
    assert box.exec(box.node, ["ip", "route", "show", "default"]) == ""


def test_sandbox_is_removed_when_the_body_raises() -> None:
    box = sb.Sandbox(flavour="legacy")
    with pytest.raises(RuntimeError, match="boom"), box:
        assert sb.leftovers({box.run_id})
        raise RuntimeError("boom")
    assert sb.leftovers({box.run_id}) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sandbox_is_removed_on_ctrl_c_and_sigterm(signum: int) -> None:
    code = (
        "import sys, time\n"
        "from harness import sandbox as sb\n"
        "with sb.sandbox('nft') as box:\n"
        "    print(box.run_id, flush=True)\n"
        "    time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert run_id and sb.leftovers({run_id})
        proc.send_signal(signum)
        proc.wait(timeout=20)
    assert poll(lambda: sb.leftovers({run_id}) == [], 5, every=0.1)


def test_the_node_itself_reaches_both_cluster_ips_through_output_dnat(shared_sandbox: sb.Sandbox) -> None:
    box = shared_sandbox
    for server in (KUBE_DNS_IP, KUBE_DNS_UPSTREAM_IP, KUBE_DNS_IP6):
        assert box.dig(box.node, server, "web.default.svc.cluster.local", tcp=True) == "10.96.10.20"
    assert box.dig(box.node, "10.96.0.99", "web.default.svc.cluster.local", check=False) == ""  # no Service
