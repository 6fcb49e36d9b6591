"""Every rendered Corefile is loaded by the real CoreDNS and answers: from the cache itself (the health probe
zone), through the cluster DNS over TCP, through each stub domain's servers and through the upstreams.

One namespace holds the cache's local addresses and a "world" CoreDNS that plays the cluster DNS, the stub
servers and two upstream resolvers, each listener answering every A query with an address of its own, so an
answer tells which server the cache forwarded to.
"""

from __future__ import annotations

import ipaddress
import json
import string
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.corefile.inputs import CorefileBuilder
from agent.corefile.kubedns import ConfigMapError, parse_kubedns
from agent.corefile.lexer import CorefileError
from agent.corefile.render import HEALTH_PROBE_ANSWER, HEALTH_PROBE_NAME
from agent.settings import Settings
from harness.corednslab import CorednsLab

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "corefile" / "Corefile.base"

LOCAL_IP, LOCAL_IP6 = "169.254.20.10", "fd00::10"
CLUSTER_DNS, CLUSTER_DNS6 = "10.96.0.11", "fd00:96::b"
# World listeners: address, port -> the A record every query gets.
WORLD = {
    (CLUSTER_DNS, 53): "10.96.10.20",
    ("10.53.0.2", 53): "198.51.100.7",  # stub server
    ("10.53.0.3", 5353): "198.51.100.8",  # stub server on another port
    ("fd00:53::2", 53): "198.51.100.9",  # IPv6 stub server
    ("10.53.0.53", 53): "192.0.2.80",  # the node's resolver (resolv.conf)
    ("10.53.0.54", 53): "192.0.2.81",  # a custom upstream (upstreamNameservers)
    ("fd00:53::54", 53): "192.0.2.82",  # an IPv6 custom upstream
}
SERVICE = "web.default.svc.cluster.local"
EXTERNAL = "www.example.org"


def world_corefile() -> str:
    blocks = []
    for (address, port), answer in WORLD.items():
        blocks.append(
            f".:{port} {{\n    bind {address}\n    template IN A . {{\n"
            f'        answer "{{{{ .Name }}}} 30 IN A {answer}"\n    }}\n}}\n'
        )
    return "".join(blocks)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CorednsLab]:
    addresses = [LOCAL_IP, LOCAL_IP6, CLUSTER_DNS6, *{a for a, _ in WORLD}]
    with CorednsLab(addresses) as lab:
        lab.load(world_corefile() + _probe_zone(CLUSTER_DNS), server=CLUSTER_DNS, name="world")
        yield lab


def _probe_zone(address: str) -> str:
    # The world answers the probe name too, only so that lab.load() can tell when it is up.
    return (
        f"{HEALTH_PROBE_NAME}:53 {{\n    bind {address}\n    template IN A {HEALTH_PROBE_NAME} {{\n"
        f'        answer "{{{{ .Name }}}} 0 IN A {HEALTH_PROBE_ANSWER}"\n    }}\n}}\n'
    )


@pytest.fixture(scope="module")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    work = tmp_path_factory.mktemp("corefile")
    resolv = work / "resolv.conf"
    resolv.write_text("nameserver 10.53.0.53\noptions ndots:5\n")
    return Settings(
        local_ips=(ipaddress.ip_address(LOCAL_IP), ipaddress.ip_address(LOCAL_IP6)),
        cluster_dns_ip=ipaddress.ip_address(CLUSTER_DNS),
        base_corefile=TEMPLATE,
        resolv_conf=resolv,
        corefile=work / "Corefile",
    )


def render(settings: Settings, data: dict[str, str] | None) -> str:
    return CorefileBuilder(settings, environ={}).build(parse_kubedns(data or {})).text


STUBS = {"acme.local": ["10.53.0.2"]}
CASES = {
    "no ConfigMap": ({}, {"www.acme.local": "192.0.2.80", EXTERNAL: "192.0.2.80"}),
    "stub domains only": (
        {"stubDomains": json.dumps(STUBS)},
        {"www.acme.local": "198.51.100.7", EXTERNAL: "192.0.2.80"},
    ),
    "upstreams only": (
        {"upstreamNameservers": json.dumps(["10.53.0.54"])},
        {"www.acme.local": "192.0.2.81", EXTERNAL: "192.0.2.81"},
    ),
    "stub domains and upstreams": (
        {"stubDomains": json.dumps(STUBS), "upstreamNameservers": json.dumps(["10.53.0.54"])},
        {"www.acme.local": "198.51.100.7", EXTERNAL: "192.0.2.81"},
    ),
    "IPv6 servers": (
        {
            "stubDomains": json.dumps({"acme.local": ["[fd00:53::2]:53"], "v6.example": ["fd00:53::2"]}),
            "upstreamNameservers": json.dumps(["fd00:53::54"]),
        },
        {"www.acme.local": "198.51.100.9", "x.v6.example": "198.51.100.9", EXTERNAL: "192.0.2.82"},
    ),
    "ports": (
        {"stubDomains": json.dumps({"acme.local": ["10.53.0.3:5353"], "b.example": ["dns://10.53.0.2:53"]})},
        {"www.acme.local": "198.51.100.8", "x.b.example": "198.51.100.7"},
    ),
    "many stub domains": (
        {"stubDomains": json.dumps({f"zone{i}.example": ["10.53.0.2", "10.53.0.3:5353"] for i in range(40)})},
        {"www.zone0.example": "198.51.100.", "www.zone39.example": "198.51.100.", EXTERNAL: "192.0.2.80"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_case_is_loaded_by_coredns_and_answers(
    lab: CorednsLab, base_settings: Settings, case: str
) -> None:
    data, expected = CASES[case]
    rendered = CorefileBuilder(base_settings, environ={}).build(parse_kubedns(data))
    with lab.running(rendered.text, server=LOCAL_IP):
        for server in (LOCAL_IP, LOCAL_IP6):
            assert lab.dig(server, HEALTH_PROBE_NAME) == HEALTH_PROBE_ANSWER
            assert lab.dig(server, SERVICE) == "10.96.10.20"
        for name, answer in expected.items():
            assert lab.dig(LOCAL_IP6, name).startswith(answer), name
        assert rendered.endpoints.health_url is not None
        assert lab.http_get(rendered.endpoints.health_url) == "OK"
        # /ready where the manifest's readiness probe asks: the first local address, port 8181.
        assert lab.http_get(f"http://{LOCAL_IP}:8181/ready") == "OK"


def test_dns_port_and_health_port_flags_move_every_listener(lab: CorednsLab, base_settings: Settings) -> None:
    settings = replace(base_settings, dns_port=1053, health_port=8089)
    text = render(settings, {"stubDomains": json.dumps(STUBS)})
    with lab.running(text, server=LOCAL_IP, port=1053):
        assert lab.dig(LOCAL_IP, "www.acme.local", port=1053) == "198.51.100.7"
        assert lab.dig(LOCAL_IP, SERVICE, port=1053) == "10.96.10.20"
        assert "10.96.10.20" not in lab.dig(LOCAL_IP, SERVICE)  # nothing on 53
        assert lab.http_get(f"http://{LOCAL_IP}:8089/health") == "OK"


def test_cluster_zone_is_forwarded_over_tcp_and_stub_domains_over_udp(
    lab: CorednsLab, base_settings: Settings
) -> None:
    text = render(base_settings, {"stubDomains": json.dumps(STUBS)})
    with lab.running(text, server=LOCAL_IP) as cache:
        assert lab.dig(LOCAL_IP, "db.prod.svc.cluster.local") == "10.96.10.20"
        assert lab.dig(LOCAL_IP, "www.acme.local") == "198.51.100.7"
        peers = _tcp_peers(lab, cache.proc.pid)
        assert f"{CLUSTER_DNS}:53" in peers
        assert "10.53.0.2:53" not in peers


def _tcp_peers(lab: CorednsLab, pid: int) -> set[str]:
    """The peers of the established TCP connections of process ``pid``."""
    out = lab.exec(["ss", "-Htnp", "state", "established"])
    return {line.split()[3] for line in out.splitlines() if f"pid={pid}," in line}


UPSTREAM_MANIFEST_TEMPLATE = """\
__PILLAR__DNS__DOMAIN__:53 {
    errors
    cache {
            success 9984 30
            denial 9984 5
    }
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__CLUSTER__DNS__ {
            force_tcp
    }
    prometheus :9253
    health __PILLAR__LOCAL__DNS__:8080
    }
.:53 {
    errors
    cache 30
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__UPSTREAM__SERVERS__
    prometheus :9253
    }
"""


def test_the_upstream_configmap_without_probe_zone_or_ready_still_answers_both_probes(
    lab: CorednsLab, base_settings: Settings, tmp_path: Path
) -> None:
    template = tmp_path / "Corefile.base"
    template.write_text(UPSTREAM_MANIFEST_TEMPLATE)
    rendered = CorefileBuilder(replace(base_settings, base_corefile=template), environ={}).build()
    with lab.running(rendered.text, server=LOCAL_IP):
        assert lab.dig(LOCAL_IP6, SERVICE) == "10.96.10.20"
        assert rendered.endpoints.health_url == f"http://{LOCAL_IP}:8080/health"
        assert lab.http_get(rendered.endpoints.health_url) == "OK"
        # The readiness probe's /ready, which the upstream ConfigMap lacks, is added by the agent.
        assert f"    ready {LOCAL_IP}:8181\n" in rendered.text
        assert lab.http_get(f"http://{LOCAL_IP}:8181/ready") == "OK"


# Property: whatever the ConfigMap holds, either it is rejected with a message naming the key, or CoreDNS
# accepts the Corefile rendered from it. Each example starts CoreDNS, so the count stays modest.

_labels = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_domains = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
    st.lists(_labels, min_size=1, max_size=3).map(lambda ls: ".".join(ls).upper() + "."),
    st.sampled_from(["cluster.local", "in-addr.arpa", "a..b", "-x.example", "under_score.example", "."]),
)
_v4 = st.ip_addresses(v=4).filter(lambda ip: not (ip.is_unspecified or ip.is_multicast)).map(str)
_v6 = st.ip_addresses(v=6).filter(lambda ip: not (ip.is_unspecified or ip.is_multicast)).map(str)
_ports = st.integers(min_value=1, max_value=65535)
_servers = st.one_of(
    _v4,
    _v6,
    st.tuples(_v4, _ports).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(_v6, _ports).map(lambda t: f"[{t[0]}]:{t[1]}"),
    _v4.map(lambda ip: f"tls://{ip}"),
    st.sampled_from(["ns.example.com", "10.0.0.1:0", "https://10.0.0.1", "0.0.0.0", LOCAL_IP]),
)
_configmaps = st.fixed_dictionaries(
    {},
    optional={
        "stubDomains": st.dictionaries(_domains, st.lists(_servers, min_size=1, max_size=4), max_size=6).map(
            json.dumps
        ),
        "upstreamNameservers": st.lists(_servers, max_size=4).map(json.dumps),
    },
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=_configmaps)
def test_any_accepted_configmap_renders_a_corefile_coredns_loads(
    lab: CorednsLab, base_settings: Settings, data: dict[str, str]
) -> None:
    try:
        text = render(base_settings, data)
    except (ConfigMapError, CorefileError) as exc:
        assert str(exc).split(":")[0].split("[")[0] in {"stubDomains", "upstreamNameservers"}, str(exc)
        event("rejected")
        return
    event("loaded by CoreDNS")
    with lab.running(text, server=LOCAL_IP):
        assert lab.dig(LOCAL_IP6, SERVICE) == "10.96.10.20"
