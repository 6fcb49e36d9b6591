"""Rendering: node-cache's placeholders, the stub domain blocks, the probe zone, and every refusal."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.corefile.endpoints import ProbeEndpoints, probe_endpoints
from agent.corefile.kubedns import KubeDnsConfig, parse_kubedns
from agent.corefile.lexer import CorefileError
from agent.corefile.parse import server_blocks
from agent.corefile.render import HEALTH_PROBE_ANSWER, HEALTH_PROBE_NAME, render, serve_stale_directive

TEMPLATE = (Path(__file__).resolve().parents[2] / "corefile" / "Corefile.base").read_text()
LOCAL = (ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10"))
CLUSTER_DNS = ipaddress.ip_address("10.96.0.11")


def rendered(template: str = TEMPLATE, data: dict[str, str] | None = None, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "local_ips": LOCAL,
        "cluster_dns_ip": CLUSTER_DNS,
        "cluster_domain": "cluster.local",
        "dns_port": 53,
        "health_port": 8080,
        "kubedns": parse_kubedns(data or {}),
        "upstream_servers": ("10.0.0.53",),
    }
    args.update(overrides)
    return render(template, **args)


def block(text: str, key: str) -> str:
    """The text of the server block whose key line starts with ``key``."""
    match = re.search(rf"^{re.escape(key)} \{{\n(.*?)^\}}", text, re.S | re.M)
    assert match, f"no block {key} in:\n{text}"
    return match.group(1)


def test_no_configmap_forwards_the_cluster_zones_over_tcp_and_the_rest_to_resolv_conf() -> None:
    text = rendered()
    for zone in ("cluster.local:53", "in-addr.arpa:53", "ip6.arpa:53"):
        assert "forward . 10.96.0.11 {\n        force_tcp\n    }" in block(text, zone)
        assert "bind 169.254.20.10 10.96.0.10\n" in block(text, zone)
    assert "forward . 10.0.0.53\n" in block(text, ".:53")
    assert "success 9984 30" in block(text, "cluster.local:53")
    assert "denial 9984 5" in block(text, "cluster.local:53")
    assert "health 169.254.20.10:8080" in block(text, "cluster.local:53")
    assert "ready 169.254.20.10:8181" in block(
        text, "health.node-local-dns:53"
    )  # added: the template has none
    assert "__PILLAR__" not in "\n".join(line.split("#")[0] for line in text.splitlines())


def test_stub_domains_become_sorted_udp_blocks_bound_to_every_local_address() -> None:
    stubs = {"zeta.example": ["10.0.0.2"], "acme.local": ["10.0.0.1", "10.0.0.3:5353"]}
    text = rendered(data={"stubDomains": json.dumps(stubs)})
    assert block(text, "acme.local:53") == (
        "    errors\n    cache 30\n    bind 169.254.20.10 10.96.0.10\n    forward . 10.0.0.1 10.0.0.3:5353\n"
    )
    assert text.index("acme.local:53 {") < text.index("zeta.example:53 {")
    assert "forward . 10.0.0.53\n" in block(text, ".:53")  # upstreams unchanged


def test_custom_upstreams_replace_resolv_conf_and_drop_force_tcp_only_from_the_dot_block() -> None:
    # node-cache's older template forwarded "." with force_tcp; custom upstreams switch it to UDP.
    template = TEMPLATE.replace(
        "forward . __PILLAR__UPSTREAM__SERVERS__\n",
        "forward . __PILLAR__UPSTREAM__SERVERS__ {\n        force_tcp\n    }\n",
    )
    with_default = rendered(template)
    assert "forward . 10.0.0.53 {\n        force_tcp\n    }" in block(with_default, ".:53")
    text = rendered(template, {"upstreamNameservers": '["1.1.1.1", "[2606:4700::1111]:53"]'})
    assert "    forward . 1.1.1.1 [2606:4700::1111]:53\n    prometheus" in block(text, ".:53")
    assert "force_tcp" in block(text, "cluster.local:53")
    # Other options of that forward stay.
    template = template.replace(
        "        force_tcp\n    }\n    prometheus",
        "        force_tcp\n        max_fails 3\n    }\n    prometheus",
    )
    text = rendered(template, {"upstreamNameservers": '["1.1.1.1"]'})
    assert "forward . 1.1.1.1 {\n        max_fails 3\n    }" in block(text, ".:53")


def test_stubs_and_upstreams_together() -> None:
    text = rendered(
        data={"stubDomains": '{"acme.local": ["10.0.0.1"]}', "upstreamNameservers": '["1.1.1.1"]'}
    )
    assert "forward . 10.0.0.1\n" in block(text, "acme.local:53")
    assert "forward . 1.1.1.1\n" in block(text, ".:53")


def test_ipv6_local_address_first_is_bracketed_before_a_port() -> None:
    local = (ipaddress.ip_address("fd00::10"), ipaddress.ip_address("169.254.20.10"))
    text = rendered(
        local_ips=local, data={"stubDomains": '{"acme.local": ["fd00:53::1", "[fd00:53::2]:5353"]}'}
    )
    assert "health [fd00::10]:8080" in text
    assert "bind fd00::10 169.254.20.10\n" in block(text, "acme.local:53")
    assert "forward . fd00:53::1 [fd00:53::2]:5353\n" in block(text, "acme.local:53")
    assert probe_endpoints(text).health_url == "http://[fd00::10]:8080/health"


def test_dns_and_health_ports_move_every_zone_and_the_health_listener() -> None:
    text = rendered(dns_port=1053, health_port=9090, data={"stubDomains": '{"acme.local": ["10.0.0.1"]}'})
    zones = [zone for b in server_blocks(text) for zone in b.zones]
    assert {port for _, port in zones} == {1053}
    assert "health 169.254.20.10:9090" in text
    assert "acme.local:1053 {" in text


def test_many_stub_domains_each_get_one_block() -> None:
    stubs = {f"zone{i:03}.example": [f"10.1.{i // 200}.{i % 200 + 1}"] for i in range(300)}
    text = rendered(data={"stubDomains": json.dumps(stubs)})
    zones = [zone for b in server_blocks(text) for zone, _ in b.zones]
    assert zones.count("zone042.example") == 1
    assert len(zones) == 5 + 300  # 4 template zones, the probe zone, the stubs


def test_the_cluster_domain_is_configurable() -> None:
    text = rendered(cluster_domain="Corp.Internal.")
    assert "corp.internal:53 {" in text


def test_comments_are_dropped_so_no_placeholder_survives_even_half_substituted() -> None:
    # What the documented sed leaves of a header comment: one placeholder filled in, others not.
    header = "# 169.254.20.10 is __PILLAR__LOCAL__DNS__; __PILLAR__FUTURE__ is unknown\n#\n"
    text = rendered(
        header + TEMPLATE.replace("    errors\n", "    errors # __PILLAR__DNS__SERVER__ here\n", 1)
    )
    assert "__PILLAR__" not in text and "#" not in text
    assert text.startswith("cluster.local:53 {\n    errors\n")


def test_the_reload_directive_is_dropped_in_every_form() -> None:
    for directive in ("reload", "reload 10s", "reload 30s 15s", "    reload\t"):
        text = rendered(TEMPLATE.replace("    loop\n", f"    {directive.strip()}\n    loop\n", 1))
        assert not any(line.split()[:1] == ["reload"] for line in text.splitlines()), directive
    assert "reloader" in rendered(TEMPLATE.replace("    loop\n", "    loop\n    reloader\n", 1))


def test_the_probe_zone_is_added_when_the_template_lacks_it_and_kept_once_when_it_has_it() -> None:
    bare = ".:53 {\n    bind __PILLAR__LOCAL__DNS__\n    forward . __PILLAR__UPSTREAM__SERVERS__\n}\n"
    for template in (bare, TEMPLATE):
        text = rendered(template)
        probe_blocks = [b for b in server_blocks(text) if ("health.node-local-dns", 53) in b.zones]
        assert len(probe_blocks) == 1
        assert f"IN A {HEALTH_PROBE_ANSWER}" in text
    assert HEALTH_PROBE_NAME == "health.node-local-dns."


def test_endpoints_come_from_the_rendered_corefile() -> None:
    assert probe_endpoints(rendered()) == ProbeEndpoints(
        health_url="http://169.254.20.10:8080/health",
        metrics_url="http://127.0.0.1:9253/metrics",  # `prometheus :9253` listens on loopback too
    )
    defaults = ".:53 {\n    health {\n        lameduck 5s\n    }\n    ready\n    prometheus\n}\n"
    assert probe_endpoints(defaults) == ProbeEndpoints(
        health_url="http://127.0.0.1:8080/health", metrics_url="http://localhost:9153/metrics"
    )
    assert probe_endpoints(".:53 {\n    whoami\n}\n") == ProbeEndpoints(None, None)


def test_the_same_inputs_render_the_same_bytes() -> None:
    a = {"stubDomains": '{"b.example": ["10.0.0.2"], "a.example": ["10.0.0.1"]}'}
    b = {"stubDomains": '{"a.example": ["10.0.0.1"], "B.example.": ["10.0.0.2"]}'}
    assert rendered(data=a) == rendered(data=b)


_domain = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z][a-z0-9]{0,8}){0,2}", fullmatch=True).filter(
    lambda d: d not in {"in-addr.arpa", "ip6.arpa", "cluster.local"}
)
_server = st.ip_addresses(v=4, network="10.0.0.0/8").map(str)


@given(stubs=st.dictionaries(_domain, st.lists(_server, min_size=1, max_size=3, unique=True), max_size=8))
def test_stub_order_in_the_configmap_does_not_change_the_output(stubs: dict[str, list[str]]) -> None:
    forward = rendered(data={"stubDomains": json.dumps(stubs)})
    backward = rendered(data={"stubDomains": json.dumps(dict(reversed(stubs.items())))})
    assert forward == backward
    zones = [zone for b in server_blocks(forward) for zone, _ in b.zones]
    assert sorted(zones[4:-1]) == zones[4:-1] == sorted(stubs)
    assert zones[-1] == "health.node-local-dns"


def _first_line_with(text: str) -> int:
    return next(n for n, line in enumerate(TEMPLATE.splitlines(), 1) if text in line)


BAD_TEMPLATE = [
    ("bind __PILLAR__LOCAL__DNS__\n.:53 {\n    forward . __PILLAR__UPSTREAM_SERVERS__\n}\n", {},
     "Corefile template line 3: unknown placeholder __PILLAR__UPSTREAM_SERVERS__ "
     "(known: __PILLAR__LOCAL__DNS__"),
    (TEMPLATE, {"cluster_dns_ip": None},
     f"Corefile template line {_first_line_with('forward . __PILLAR__CLUSTER__DNS__')}: "
     "__PILLAR__CLUSTER__DNS__ has no value: the kube-dns-upstream Service's IP is "
     "unknown (set its *_SERVICE_HOST variable through -upstreamsvc, or --cluster-dns-ip)"),
    (TEMPLATE, {"upstream_servers": ()},
     "__PILLAR__UPSTREAM__SERVERS__ has no value: no upstreamNameservers and no nameserver in resolv.conf"),
    (TEMPLATE, {"local_ips": ()}, "-localip: no local address given"),
    (TEMPLATE, {"cluster_domain": "cluster..local"},
     "--cluster-domain: 'cluster..local' is not a domain name"),
    (TEMPLATE, {"upstream_servers": ("resolver.example",)},
     "upstream servers (resolv.conf): 'resolver.example' is not an IP address"),
    (".:53 {\n    forward . 1.1.1.1\n", {}, "Corefile line 1: the block of .:53 is not closed"),
    (".:53 {\n}\n}\n", {}, "Corefile line 3: '}' closes no block"),
    (".:53 {\n}\nexample.org:53\n", {}, "Corefile line 3: example.org:53 has no block"),
    ('.:53 {\n    template IN A . {\n        answer "{{ .Name }} 0 IN A 1.2.3.4\n    }\n}\n', {},
     "Corefile line 3: a quoted string is not closed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("template", "overrides", "message"), BAD_TEMPLATE, ids=[m for *_, m in BAD_TEMPLATE]
)
def test_bad_template_or_inputs_are_refused_with_the_place_and_the_problem(
    template: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(CorefileError) as info:
        rendered(template, **overrides)
    assert message in str(info.value)


BAD_STUBS = [
    ('{"cluster.local": ["10.0.0.1"]}', {},
     "stubDomains: 'cluster.local' is the cluster domain; it is always forwarded to the cluster DNS"),
    ('{"Corp.Internal": ["10.0.0.1"]}', {"cluster_domain": "corp.internal"},
     "'corp.internal' is the cluster domain"),
    ('{"in-addr.arpa": ["10.0.0.1"]}', {}, "stubDomains: 'in-addr.arpa' is already a zone of the Corefile"),
    ('{"health.node-local-dns": ["10.0.0.1"]}', {},
     "'health.node-local-dns' is already a zone of the Corefile"),
    ('{"acme.local": ["169.254.20.10"]}', {},
     "stubDomains['acme.local']: 169.254.20.10 is this cache's own address; forwarding to it would loop"),
    ('{"acme.local": ["dns://10.96.0.10:1053"]}', {"dns_port": 1053},
     "dns://10.96.0.10:1053 is this cache's own"),
]  # fmt: skip


@pytest.mark.parametrize(("stubs", "overrides", "message"), BAD_STUBS, ids=[m for *_, m in BAD_STUBS])
def test_stub_domains_that_clash_with_the_corefile_are_refused(
    stubs: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(CorefileError) as info:
        rendered(data={"stubDomains": stubs}, **overrides)
    assert message in str(info.value)


def test_a_stub_server_on_a_local_address_but_another_port_is_fine() -> None:
    assert "forward . 169.254.20.10:5353" in rendered(
        data={"stubDomains": '{"acme.local": ["169.254.20.10:5353"]}'}
    )


def test_an_upstream_that_is_the_cache_itself_is_refused() -> None:
    with pytest.raises(CorefileError, match=r"^upstreamNameservers: 10.96.0.10 is this cache's own address"):
        render(
            TEMPLATE, local_ips=LOCAL, cluster_dns_ip=CLUSTER_DNS, cluster_domain="cluster.local",
            dns_port=53, health_port=8080, kubedns=KubeDnsConfig(upstream_nameservers=("10.96.0.10",)),
        )  # fmt: skip


def ready_lines(text: str) -> list[tuple[str, str]]:
    return [(key, args[0]) for b in server_blocks(text) for key, args in b.directives if key == "ready"]


NO_READY = ".:53 {\n    bind __PILLAR__LOCAL__DNS__\n    health __PILLAR__LOCAL__DNS__:8080\n}\n"


def test_ready_is_added_once_on_the_first_local_address_when_the_template_has_none() -> None:
    text = rendered(NO_READY)
    assert ready_lines(text) == [("ready", "169.254.20.10:8181")]
    v6 = rendered(NO_READY, local_ips=(ipaddress.ip_address("fd00::10"),))
    assert ready_lines(v6) == [("ready", "[fd00::10]:8181")]


def test_a_template_with_its_own_ready_keeps_it_and_gets_no_second_one() -> None:
    own = NO_READY.replace("    health", "    ready 127.0.0.1:8282\n    health")
    assert ready_lines(rendered(own)) == [("ready", "127.0.0.1:8282")]


def test_a_template_with_the_probe_zone_but_no_ready_gets_a_ready_block_of_its_own() -> None:
    probe_only = NO_READY + (
        "health.node-local-dns:53 {\n    bind __PILLAR__LOCAL__DNS__\n"
        '    template IN A health.node-local-dns {\n        answer "{{ .Name }} 0 IN A 127.0.0.1"\n    }\n}\n'
    )
    text = rendered(probe_only)
    assert ready_lines(text) == [("ready", "169.254.20.10:8181")]
    assert "ready 169.254.20.10:8181" in block(text, "ready.node-local-dns:53")


VERIFY = "serve_stale 3600s verify 500ms 0s 10s"


def test_the_serve_stale_directive_follows_the_flags_and_is_absent_when_off() -> None:
    assert serve_stale_directive(3600, "verify") == VERIFY
    assert serve_stale_directive(90, "immediate") == "serve_stale 90s immediate 0s 10s"
    assert serve_stale_directive(0, "verify") is None


def test_serve_stale_goes_into_every_cache_of_the_template_and_of_each_stub_domain() -> None:
    stubs = {"stubDomains": json.dumps({"acme.local": ["10.0.0.7"]})}
    text = rendered(data=stubs, serve_stale=VERIFY)
    assert (
        "    cache {\n        " + VERIFY + "\n        success 9984 30\n        denial 9984 5\n    }\n"
        in block(text, "cluster.local:53")
    )
    for zone in ("in-addr.arpa:53", "ip6.arpa:53", ".:53", "acme.local:53"):
        assert f"    cache 30 {{\n        {VERIFY}\n    }}\n" in block(text, zone), block(text, zone)
    assert text.count("serve_stale") == 5
    assert "serve_stale" not in block(text, "health.node-local-dns:53")
    caches = [args for b in server_blocks(text) for name, args in b.directives if name == "cache"]
    assert len(caches) == 5  # still one cache per block, each with its block


def test_a_template_with_its_own_serve_stale_keeps_it_and_gets_no_second_one() -> None:
    template = TEMPLATE.replace(
        "        denial 9984 5\n", "        denial 9984 5\n        serve_stale 10m immediate\n"
    )
    text = rendered(template, serve_stale=VERIFY)
    cluster = block(text, "cluster.local:53")
    assert "serve_stale 10m immediate" in cluster and VERIFY not in cluster
    assert text.count(VERIFY) == 3  # the other three blocks


def test_without_serve_stale_the_cache_lines_stay_as_the_template_has_them() -> None:
    text = rendered()
    assert "serve_stale" not in text
    assert "    cache 30\n" in block(text, ".:53")


# Edits read the template with the one lexer: cases the older line-by-line walkers got wrong.


def test_force_tcp_goes_from_the_upstream_forward_even_with_a_comment_after_its_brace() -> None:
    template = TEMPLATE.replace(
        "forward . __PILLAR__UPSTREAM__SERVERS__\n",
        "forward . __PILLAR__UPSTREAM__SERVERS__ { # UDP once the ConfigMap names upstreams\n"
        "        force_tcp # as node-cache\n    }\n",
    )
    text = rendered(template, {"upstreamNameservers": '["1.1.1.1"]'})
    assert "    forward . 1.1.1.1\n    prometheus" in block(text, ".:53")
    assert "force_tcp" in block(text, "cluster.local:53")


def test_a_hash_inside_quotes_is_kept_and_the_comment_after_the_string_goes() -> None:
    template = TEMPLATE.replace(
        "    loop\n",
        "    loop\n    template IN TXT example.org {\n"
        '        answer "{{ .Name }} 60 IN TXT \\"a # b } c\\"" # a comment\n    }\n',
        1,
    )
    assert (
        '    template IN TXT example.org {\n        answer "{{ .Name }} 60 IN TXT \\"a # b } c\\""\n    }\n'
        in block(rendered(template), "cluster.local:53")
    )


def test_serve_stale_goes_into_a_cache_block_whose_first_option_shares_the_brace_line() -> None:
    template = TEMPLATE.replace("    cache 30\n", "    cache { success 9984 30\n    }\n", 1)
    text = rendered(template, serve_stale=VERIFY)
    assert f"    cache {{\n        {VERIFY}\n        success 9984 30\n    }}\n" in block(
        text, "in-addr.arpa:53"
    )
    empty = rendered(TEMPLATE.replace("    cache 30\n", "    cache { }\n", 1), serve_stale=VERIFY)
    assert f"    cache {{\n        {VERIFY}\n    }}\n" in block(empty, "in-addr.arpa:53")
    assert text.count(VERIFY) == empty.count(VERIFY) == 4


SNIPPET = """\
(common) {
    cache 30
    health __PILLAR__LOCAL__DNS__:8080
    ready 127.0.0.1:8282
}
.:53 {
    import common
    bind __PILLAR__LOCAL__DNS__
    forward . __PILLAR__UPSTREAM__SERVERS__
}
"""


def test_a_snippet_gets_serve_stale_in_its_cache_and_its_directives_count_where_imported() -> None:
    text = rendered(SNIPPET, serve_stale=VERIFY)
    assert text.startswith(f"(common) {{\n    cache 30 {{\n        {VERIFY}\n    }}\n    health")
    assert text.count(VERIFY) == 1
    assert ready_lines(text) == [("ready", "127.0.0.1:8282")]  # the snippet's: no second ready is added
    assert probe_endpoints(text).health_url == "http://169.254.20.10:8080/health"


def test_a_server_block_may_open_on_the_next_line_but_a_cache_block_may_not() -> None:
    text = rendered(
        ".:53\n{\n    cache 30\n    forward . __PILLAR__UPSTREAM__SERVERS__\n}\n", serve_stale=VERIFY
    )
    assert text.startswith(
        f".:53\n{{\n    cache 30 {{\n        {VERIFY}\n    }}\n    forward . 10.0.0.53\n}}\n"
    )
    # CoreDNS's plugins read a block only when its "{" ends the directive's line.
    template = TEMPLATE.replace("    cache {\n", "    cache\n    {\n", 1)
    with pytest.raises(CorefileError, match=r"^Corefile line \d+: the block of cache must open on its line"):
        rendered(template, serve_stale=VERIFY)


def test_the_prometheus_endpoint_placeholder_is_filled_with_the_flag_or_its_default() -> None:
    template = TEMPLATE.replace("prometheus :9253", "prometheus __PROMETHEUS__ENDPOINT__")
    assert "prometheus __PROMETHEUS__ENDPOINT__" in template
    told = rendered(template, prometheus_endpoint="127.0.0.1:9263")
    assert "prometheus 127.0.0.1:9263\n" in told and "__PROMETHEUS__" not in told
    assert "prometheus :9253\n" in rendered(template)
