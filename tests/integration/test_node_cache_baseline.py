"""The real node-cache in the node sandbox: the baseline the benchmarks compare the agent with.

Pins what the benchmarks rely on: node-cache answers the ClusterIP locally with its untracked rule set (no
socket match), a SIGKILL leaves that rule set behind and the ClusterIP blackholed, a SIGTERM removes it.
Skipped where there is no node-cache binary (see harness/nodecache.py); in CI that skip is a failure.
"""

from __future__ import annotations

import re

import pytest

from harness import nodecache as nc
from harness import sandbox as sb
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP, SERVICES, STUB_DOMAIN

_reason = nc.unavailable()
# Skipped where there is no binary, which CI counts as a failure (tests/conftest.py).
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

WEB = "web.default.svc.cluster.local"
RULE = re.compile(
    r"^(?P<table>\w+) -A (?P<chain>\S+) (?P<dir>-[ds]) (?P<addr>[\d.]+)/32 -p (?P<proto>\w+) -m \w+ "
    r'--(?:d|s)port (?P<port>\d+) -m comment --comment "NodeLocal DNS Cache: [^"]+" -j (?P<target>\w+)$'
)


def expected_rule_set(addresses: tuple[str, ...]) -> set[tuple[str, str, str, str, str, str, str]]:
    """node-cache's rule set as DESIGN.md describes it: (table, chain, -d/-s, addr, proto, port, target)."""
    rules = set()
    for addr in addresses:
        for proto in ("udp", "tcp"):
            rules |= {
                ("raw", "PREROUTING", "-d", addr, proto, "53", "NOTRACK"),
                ("raw", "OUTPUT", "-s", addr, proto, "53", "NOTRACK"),
                ("raw", "OUTPUT", "-d", addr, proto, "53", "NOTRACK"),
                ("filter", "INPUT", "-d", addr, proto, "53", "ACCEPT"),
                ("filter", "OUTPUT", "-s", addr, proto, "53", "ACCEPT"),
            }
        rules |= {
            ("raw", "OUTPUT", "-d", addr, "tcp", str(nc.HEALTH_PORT), "NOTRACK"),
            ("raw", "OUTPUT", "-s", addr, "tcp", str(nc.HEALTH_PORT), "NOTRACK"),
        }
    return rules


def parsed(rules: list[str]) -> list[tuple[str, ...]]:
    out = []
    for line in rules:
        m = RULE.match(line)
        assert m, f"unexpected node-cache rule shape: {line}"
        out.append(tuple(m.group("table", "chain", "dir", "addr", "proto", "port", "target")))
    return out


def test_node_cache_answers_the_cluster_ip_locally_with_its_untracked_rule_set(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    with nc.running(box, stub_domains={STUB_DOMAIN: [box.stub_ip]}) as cache:
        rules = parsed(cache.rules())
        assert len(rules) == len(set(rules)), "duplicated rules"
        assert set(rules) == expected_rule_set((LOCAL_IP, KUBE_DNS_IP))
        box.flush_conntrack()
        stub_name = f"www.{STUB_DOMAIN}"
        assert cache.answers(box.pod(0), KUBE_DNS_IP, WEB) == SERVICES.records[WEB]
        assert cache.answers(box.pod(0), KUBE_DNS_IP, stub_name) == SERVICES.stub[stub_name]
        # Answered without a conntrack entry: NOTRACKed packets cannot be DNATed, so the node's own socket on
        # the ClusterIP answered, not kube-dns behind kube-proxy.
        assert box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP).strip() == ""


def test_sigkill_leaves_node_cache_rules_behind_and_the_cluster_ip_blackholed() -> None:
    with sb.Sandbox(flavour="nft") as box, nc.running(box) as cache:
        installed = cache.rules()
        assert cache.kill() == -9
        assert cache.rules() == installed
        assert cache.answers(box.pod(0), KUBE_DNS_IP, WEB) == ""
        # kube-dns itself is fine: the node's leftover rules are what blackholes the ClusterIP.
        assert cache.answers(box.pod(0), box.kube_dns_pod_ip, WEB) == SERVICES.records[WEB]


def test_sigterm_removes_node_cache_rules_and_the_cluster_ip_falls_back_to_kube_dns() -> None:
    with sb.Sandbox(flavour="nft") as box, nc.running(box) as cache:
        assert cache.stop() == 0
        assert cache.rules() == []
        assert box.exec(box.node, ["ip", "-o", "link", "show", nc.INTERFACE], check=False).strip() == ""
        box.flush_conntrack()
        assert cache.answers(box.pod(0), KUBE_DNS_IP, WEB) == SERVICES.records[WEB]
        assert f"src={box.kube_dns_pod_ip}" in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
