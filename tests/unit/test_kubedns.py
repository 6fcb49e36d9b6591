"""The kube-dns ConfigMap: what is accepted, how it is normalised, and every bad input with its message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.corefile.kubedns import (
    MAX_STUB_DOMAINS,
    MAX_VALUE_BYTES,
    ConfigMapError,
    KubeDnsConfig,
    parse_kubedns,
    read_kubedns_dir,
)
from harness.configmapdir import publish


def test_stub_domains_and_upstreams_are_parsed_and_normalised() -> None:
    config = parse_kubedns({
        "stubDomains": json.dumps({
            "Corp.Example.": ["10.0.0.1", " 10.0.0.2:5353 "],
            "acme.local": ["[fd00::1]", "[FD00::2]:53", "TLS://10.0.0.3", "dns://10.0.0.4"],
        }),
        "upstreamNameservers": json.dumps(["8.8.8.8", "[2001:db8::1]:5353"]),
    })  # fmt: skip
    assert config == KubeDnsConfig(
        stub_domains=(
            ("acme.local", ("fd00::1", "[fd00::2]:53", "tls://10.0.0.3", "dns://10.0.0.4")),
            ("corp.example", ("10.0.0.1", "10.0.0.2:5353")),
        ),
        upstream_nameservers=("8.8.8.8", "[2001:db8::1]:5353"),
    )


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"stubDomains": "", "upstreamNameservers": "  \n"},
        {"stubDomains": "{}", "upstreamNameservers": "[]"},
        {"stubDomains": "null"},
        {"federations": '{"x": "y"}'},  # kube-dns's other key is not ours
    ],
)
def test_absent_or_empty_keys_mean_an_empty_config(data: dict[str, str]) -> None:
    assert parse_kubedns(data) == KubeDnsConfig()


def test_values_may_be_utf8_bytes() -> None:
    config = parse_kubedns({"upstreamNameservers": b'["10.0.0.1"]'})
    assert config.upstream_nameservers == ("10.0.0.1",)


def _stubs(value: object) -> dict[str, str]:
    return {"stubDomains": json.dumps(value)}


def _upstreams(value: object) -> dict[str, str]:
    return {"upstreamNameservers": json.dumps(value)}


BAD = [
    ({"stubDomains": '{"acme.local": ["10.0.0.1"]'}, "stubDomains: malformed JSON: Expecting ',' delimiter"),
    ({"upstreamNameservers": "10.0.0.1"}, "upstreamNameservers: malformed JSON"),
    ({"stubDomains": b'{"acme.local": ["10.0.0.1\xff"]}'}, "stubDomains: not UTF-8 (byte 25: b'\\xff')"),
    ({"stubDomains": "[" * 20_000 + "]" * 20_000}, "stubDomains: malformed JSON: nested too deeply"),
    (
        {"upstreamNameservers": "[" + "1" * 5000 + "]"},
        "upstreamNameservers: malformed JSON: Exceeds the limit",
    ),
    (
        {"stubDomains": " " * (MAX_VALUE_BYTES + 1)},
        f"stubDomains: {MAX_VALUE_BYTES + 1} bytes is more than the {MAX_VALUE_BYTES} bytes allowed",
    ),
    (
        _stubs({f"d{i}.example": ["10.0.0.1"] for i in range(MAX_STUB_DOMAINS + 1)}),
        f"stubDomains: {MAX_STUB_DOMAINS + 1} domains is more than the {MAX_STUB_DOMAINS} allowed",
    ),
    (
        _stubs(["acme.local"]),
        "stubDomains: must be a JSON object of domain -> list of nameservers, not a list",
    ),
    (
        _stubs({"acme.local": "10.0.0.1"}),
        "stubDomains['acme.local']: must be a list of nameservers, not a string",
    ),
    (_stubs({"acme.local": []}), "stubDomains['acme.local']: no nameserver given"),
    (
        _stubs({"acme.local": [f"10.0.0.{i}" for i in range(1, 17)]}),
        "stubDomains['acme.local']: 16 nameservers is more than the 15 CoreDNS forwards to",
    ),
    (_stubs({"acme.local": [53]}), "stubDomains['acme.local']: 53 is not a string"),
    (_stubs({"acme..local": ["10.0.0.1"]}), "stubDomains: 'acme..local' is not a domain name (empty label)"),
    (_stubs({".": ["10.0.0.1"]}), "stubDomains: '.' is not a domain name (empty; the root '.' cannot be"),
    (_stubs({"-acme.local": ["10.0.0.1"]}), "stubDomains: '-acme.local' is not a domain name (label '-acme'"),
    (_stubs({"my_zone.local": ["10.0.0.1"]}), "is not a domain name (label 'my_zone': 1-63 letters"),
    (_stubs({"x" * 64 + ".local": ["10.0.0.1"]}), "is not a domain name (label 'xxxxxxxx"),
    (_stubs({("a" * 60 + ".") * 5: ["10.0.0.1"]}), "is not a domain name (longer than 253 characters)"),
    (
        {"stubDomains": '{"acme.local": ["10.0.0.1"], "acme.local": ["10.0.0.2"]}'},
        "stubDomains: 'acme.local' appears twice",
    ),
    (
        _stubs({"acme.local": ["10.0.0.1"], "ACME.local.": ["10.0.0.2"]}),
        "stubDomains['ACME.local.']: the domain 'acme.local' is given twice",
    ),
    (
        _stubs({"acme.local": ["ns1.acme.local"]}),
        "stubDomains['acme.local']: 'ns1.acme.local' is not an IP address (host names are not accepted)",
    ),
    (_stubs({"acme.local": ["10.0.0.300"]}), "'10.0.0.300' is not an IP address"),
    (_stubs({"acme.local": ["10.0.0.1:0"]}), "'10.0.0.1:0' has port 0, not a port number (1-65535)"),
    (_stubs({"acme.local": ["10.0.0.1:65536"]}), "'10.0.0.1:65536' has port 65536, not a port number"),
    (_stubs({"acme.local": ["10.0.0.1:dns"]}), "'10.0.0.1:dns' has port 'dns', not a port number"),
    (_stubs({"acme.local": ["[fd00::1]53"]}), "'[fd00::1]53' is not ip, ip:port or [ip6]:port"),
    (
        _stubs({"acme.local": ["https://10.0.0.1"]}),
        "'https://10.0.0.1' uses transport 'https'; CoreDNS forwards over dns:// or tls://",
    ),
    (_stubs({"acme.local": ["grpc://10.0.0.1"]}), "uses transport 'grpc'"),
    (_stubs({"acme.local": ["0.0.0.0"]}), "'0.0.0.0' is not a usable nameserver address"),
    (_stubs({"acme.local": ["224.0.0.1"]}), "'224.0.0.1' is not a usable nameserver address"),
    (_stubs({"acme.local": ["10.0.0.1", "10.0.0.1"]}), "nameserver '10.0.0.1' is given twice"),
    (
        _upstreams(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]),
        "upstreamNameservers: 4 nameservers is more than the 3 kube-dns allows",
    ),
    (_upstreams({"a": "10.0.0.1"}), "upstreamNameservers: must be a JSON list of nameservers, not an object"),
    (_upstreams(["8.8.8.8", "dns.google"]), "upstreamNameservers: 'dns.google' is not an IP address"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_rejected_with_the_key_and_the_problem(
    data: dict[str, str | bytes], message: str
) -> None:
    with pytest.raises(ConfigMapError) as info:
        parse_kubedns(data)
    assert message in str(info.value)


def test_a_missing_directory_is_an_empty_config(tmp_path: Path) -> None:
    assert read_kubedns_dir(tmp_path / "kube-dns") == KubeDnsConfig()


def test_the_kubelet_layout_is_read_through_data(tmp_path: Path) -> None:
    publish(tmp_path, {"stubDomains": '{"acme.local": ["10.0.0.1"]}'})
    assert read_kubedns_dir(tmp_path).stub_domains == (("acme.local", ("10.0.0.1",)),)
    publish(tmp_path, {"upstreamNameservers": '["10.0.0.9"]'})
    assert read_kubedns_dir(tmp_path) == KubeDnsConfig(upstream_nameservers=("10.0.0.9",))
    assert not (tmp_path / "stubDomains").exists()  # the dropped key's symlink is gone


def test_a_plain_directory_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "upstreamNameservers").write_text('["10.0.0.1"]')
    assert read_kubedns_dir(tmp_path).upstream_nameservers == ("10.0.0.1",)


def test_a_file_instead_of_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "kube-dns").write_text("{}")
    with pytest.raises(ConfigMapError, match="kube-dns: not a directory"):
        read_kubedns_dir(tmp_path / "kube-dns")


def test_an_invalid_key_in_the_directory_names_the_key(tmp_path: Path) -> None:
    publish(tmp_path, {"upstreamNameservers": '["10.0.0.1", "10.0.0.1:99999"]'})
    with pytest.raises(ConfigMapError, match=r"^upstreamNameservers: '10.0.0.1:99999' has port 99999"):
        read_kubedns_dir(tmp_path)
