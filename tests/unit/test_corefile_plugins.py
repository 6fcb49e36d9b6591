"""The plugins a Corefile names, checked against those a CoreDNS binary lists with ``-plugins``.

tests/integration/test_coredns_node_build.py runs the real node-local build and the agent against it."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.corefile.kubedns import parse_kubedns
from agent.corefile.lexer import CorefileError
from agent.corefile.plugins import (
    MissingPluginError,
    PluginCheck,
    compiled_plugins,
    missing_plugins,
    parse_plugin_list,
    plugin_uses,
    refuse_missing,
)
from agent.corefile.render import render, serve_stale_directive

TEMPLATE = (Path(__file__).resolve().parents[2] / "corefile" / "Corefile.base").read_text()
# `coredns -plugins` of the node-local build (image/coredns-node), as CoreDNS v1.14.7 prints it.
NODE_LOCAL = (
    "acl\nany\nbind\nbufsize\ncache\ndebug\ndns64\ndnstap\nerrors\nforward\nhealth\nhosts\nloadbalance\nlog\n"
    "loop\nmetadata\npprof\nprometheus\nready\nreload\nrewrite\ntemplate\ntrace\nwhoami\n\n"
)
# The same question to CoreDNS before 1.7 (Caddy's sections, the server type's prefix).
OLD_FORMAT = """Server types:
  dns

Caddyfile loaders:
  flag
  default

Other plugins:
  dns.cache
  dns.forward
  dns.prometheus
  on
"""


def test_the_one_name_a_line_output_is_read_whole() -> None:
    plugins = parse_plugin_list(NODE_LOCAL)
    assert len(plugins) == 24
    assert {"prometheus", "cache", "forward", "ready", "template"} <= plugins
    assert "kubernetes" not in plugins and "" not in plugins


def test_the_older_sectioned_output_gives_only_directives_without_the_dns_prefix() -> None:
    assert parse_plugin_list(OLD_FORMAT) == {"cache", "forward", "prometheus", "on"}


def test_every_directive_of_every_server_block_is_a_use_with_its_block_and_line() -> None:
    corefile = (
        "example.org:53 {\n    errors\n    kubernetes cluster.local\n}\n.:53 {\n    forward . 1.1.1.1\n}\n"
    )
    uses = [(u.plugin, u.server_block, u.line) for u in plugin_uses(corefile)]
    assert uses == [
        ("errors", "example.org:53", 2),
        ("kubernetes", "example.org:53", 3),
        ("forward", ".:53", 6),
    ]


def test_options_inside_a_plugins_block_are_not_plugins() -> None:
    corefile = ".:53 {\n    cache {\n        serve_stale 1h verify\n        prefetch 10\n    }\n}\n"
    assert [u.plugin for u in plugin_uses(corefile)] == ["cache"]


def test_a_snippet_counts_where_it_is_imported_and_an_imported_file_is_not_followed() -> None:
    corefile = (
        "(common) {\n    etcd\n}\n"
        "a.example:53 {\n    import common\n    import /etc/coredns/extra/*.conf\n    forward . 1.1.1.1\n}\n"
    )
    assert [(u.plugin, u.server_block) for u in plugin_uses(corefile)] == [
        ("etcd", "a.example:53"),
        ("forward", "a.example:53"),
    ]


def test_the_rendered_default_template_needs_only_the_node_local_plugins() -> None:
    text = render(
        TEMPLATE,
        local_ips=(ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10")),
        cluster_dns_ip=ipaddress.ip_address("10.96.0.11"),
        cluster_domain="cluster.local",
        dns_port=53,
        health_port=8080,
        kubedns=parse_kubedns({"stubDomains": '{"acme.local": ["10.0.0.99"]}'}),
        upstream_servers=("10.0.0.53",),
        serve_stale=serve_stale_directive(3600, "immediate"),
    )
    assert missing_plugins(text, parse_plugin_list(NODE_LOCAL)) == []
    assert {u.plugin for u in plugin_uses(text)} >= {"ready", "template", "cache", "health", "prometheus"}


def test_the_refusal_names_the_plugin_the_block_the_binary_and_the_build_argument() -> None:
    corefile = ".:53 {\n    forward . 1.1.1.1\n}\ncluster.local:53 {\n    kubernetes\n    etcd\n}\n"
    with pytest.raises(MissingPluginError) as caught:
        refuse_missing(corefile, parse_plugin_list(NODE_LOCAL), "/usr/local/bin/coredns")
    message = str(caught.value)
    assert (
        'plugin "kubernetes" in server block "cluster.local:53" (line 5 of the rendered Corefile)' in message
    )
    assert 'plugin "etcd" in server block "cluster.local:53" (line 6 of the rendered Corefile)' in message
    assert "/usr/local/bin/coredns" in message
    assert "--build-arg COREDNS_PLUGINS=full" in message and "docs/image.md" in message
    assert '"forward"' not in message
    # A bad Corefile like any other: the supervisor rejects it and keeps the last good one.
    assert isinstance(caught.value, CorefileError)


def test_a_corefile_within_the_binarys_plugins_passes() -> None:
    refuse_missing(
        ".:53 {\n    forward . 1.1.1.1\n    cache 30\n}\n", parse_plugin_list(NODE_LOCAL), "coredns"
    )


def fake_coredns(tmp_path: Path, output: str, code: int = 0) -> tuple[Path, Path]:
    """A script answering -plugins with ``output``; each call appends a line to the returned log."""
    calls = tmp_path / "calls"
    script = tmp_path / "coredns"
    (tmp_path / "output").write_text(output)
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncat {tmp_path / "output"}\nexit {code}\n')
    script.chmod(0o755)
    return script, calls


def test_the_binary_is_asked_once_however_many_corefiles_are_checked(tmp_path: Path) -> None:
    binary, calls = fake_coredns(tmp_path, NODE_LOCAL)
    check = PluginCheck(str(binary))
    for _ in range(5):
        check.check(".:53 {\n    forward . 1.1.1.1\n}\n")
    with pytest.raises(MissingPluginError):
        check.check(".:53 {\n    kubernetes\n}\n")
    assert calls.read_text().splitlines() == ["-plugins"]
    assert PluginCheck(str(binary)).check(".:53 {\n    cache\n}\n") is None  # another check, same binary
    assert calls.read_text().splitlines() == ["-plugins"]


def test_a_replaced_binary_is_asked_again(tmp_path: Path) -> None:
    binary, calls = fake_coredns(tmp_path, NODE_LOCAL)
    PluginCheck(str(binary)).check(".:53 {\n    cache\n}\n")
    replacement = tmp_path / "coredns.new"
    replacement.write_text(binary.read_text() + "# a new build\n")
    replacement.chmod(0o755)
    replacement.replace(binary)
    PluginCheck(str(binary)).check(".:53 {\n    cache\n}\n")
    assert calls.read_text().splitlines() == ["-plugins", "-plugins"]


@pytest.mark.parametrize(("output", "code"), [("", 0), ("plugin/forward: not a valid option\n", 1)])
def test_a_binary_that_cannot_tell_is_not_checked(tmp_path: Path, output: str, code: int) -> None:
    binary, _ = fake_coredns(tmp_path, output, code)
    assert compiled_plugins(str(binary)) == (str(binary), None)
    PluginCheck(str(binary)).check(".:53 {\n    kubernetes\n}\n")  # CoreDNS itself will say


def test_a_missing_binary_is_not_checked(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-coredns")
    assert compiled_plugins(missing) == (missing, None)
    PluginCheck(missing).check(".:53 {\n    kubernetes\n}\n")
