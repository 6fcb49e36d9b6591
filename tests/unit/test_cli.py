"""Flag parsing: node-cache's flags unchanged, long forms, Go-style values, clear errors with exit 2."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.cli import parse
from agent.settings import ConfigError, Settings, parse_duration

UPSTREAM_MANIFEST_ARGS = [
    "-localip", "169.254.20.10,10.96.0.10", "-conf", "/etc/Corefile", "-upstreamsvc", "kube-dns-upstream",
    "-pidfile", "/tmp/node-cache.pid",
]  # fmt: skip


def test_the_upstream_manifest_args_parse_unchanged() -> None:
    _, s = parse(UPSTREAM_MANIFEST_ARGS)
    assert s.local_ips == (ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10"))
    assert s.corefile == Path("/etc/Corefile")
    assert s.upstream_svc == "kube-dns-upstream"
    assert s.pidfile == Path("/tmp/node-cache.pid")


def test_go_flag_spellings_are_accepted() -> None:
    _, s = parse([
        "--localip=fd00::10,169.254.20.10", "-setupiptables=false", "-skipteardown", "-syncinterval", "60",
        "-health-port=9090", "-dns.port", "5353",
    ])  # fmt: skip
    assert [ip.version for ip in s.local_ips] == [6, 4]
    assert s.setup_iptables is False and s.skip_teardown is True
    assert s.sync_interval == 60.0 and s.health_port == 9090 and s.dns_port == 5353


def test_readable_long_forms_mean_the_same() -> None:
    _, short = parse(["-localip", "169.254.20.10", "-interfacename", "nld0"])
    _, long = parse(["--local-ip", "169.254.20.10", "--interface-name", "nld0"])
    assert short == long


def test_coredns_flags_and_the_next_releases_flags_are_accepted() -> None:
    _, s = parse([
        "-localip", "169.254.20.10", "-dns.port=5353", "-quiet", "-metrics-listen-address", "localhost:9353",
        "-prometheus-listen-address", "[::1]:9253",
    ])  # fmt: skip
    assert (s.dns_port, s.quiet, s.metrics_listen_address) == (5353, True, "localhost:9353")
    assert s.prometheus_listen_address == "[::1]:9253"


def test_defaults_are_node_caches() -> None:
    s = Settings()
    assert (s.upstream_svc, s.prometheus_listen_address, s.quiet) == ("kube-dns", ":9253", False)
    assert (s.interface_name, s.metrics_listen_address, s.health_port, s.dns_port) == (
        "nodelocaldns", "0.0.0.0:9353", 8080, 53,
    )  # fmt: skip
    assert s.base_corefile == Path("/etc/coredns/Corefile.base")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["-localip", "169.254.20.300"],
            "argument -localip/--localip/--local-ip: '169.254.20.300' is not an IP address",
        ),
        (["-syncinterval", "soon"], "'soon' is not a duration"),
        (["-setupiptables=maybe"], "'maybe' is not a boolean"),
        (["-interfacename", "a-very-long-interface-name"], "is not a valid interface name"),
        (["-health-port", "70000"], "-health-port: 70000 is not a port number"),
        (["-metrics-listen-address", "9353"], "'9353' is not HOST:PORT"),
        (["-localip", "169.254.20.10,169.254.20.10"], "duplicate address"),
        (["-nosuchflag"], "agent: flag provided but not defined: -nosuchflag\n"),
        # Exact names only: no prefix of a flag is taken for it (argparse would read -pidfile 5353).
        (["-p", "5353"], "agent: flag provided but not defined: -p\n"),
        (["-local", "169.254.20.10"], "agent: flag provided but not defined: -local\n"),
        (["-pidf", "/tmp/x.pid"], "agent: flag provided but not defined: -pidf\n"),
        (["--upstream", "kube-dns"], "agent: flag provided but not defined: --upstream\n"),
        (["-localip", "169.254.20.10", "extra"], "agent: unexpected argument 'extra'"),
        (["-metrics-listen-address", "bad_host:9353"], "'bad_host' is neither an IP address nor a host name"),
        (["--iptables-mode", "ebpf"], "invalid choice: 'ebpf'"),
        (["--serve-stale", "forever"], "argument --serve-stale: 'forever' is not a duration"),
        (["--serve-stale=-1s"], "argument --serve-stale: '-1s' is not a duration"),
        (["--serve-stale=-60"], "agent: --serve-stale: -60.0s is negative (0 turns it off)"),
        (["--serve-stale-mode", "verified"], "invalid choice: 'verified'"),
        (["--coredns-instances", "0"], "agent: --coredns-instances: 0 is outside 1..8"),
        (["--coredns-instances", "two"], "argument --coredns-instances: invalid int value: 'two'"),
        (
            ["--coredns-instances", "2", "--coredns-probe-port", "65535"],
            "agent: --coredns-probe-port: 65535-65536 (one per instance) are not port numbers",
        ),
        (
            ["--coredns-instances", "3", "--coredns-probe-port", "8079"],
            "agent: --coredns-probe-port: ports 8079-8081 (one per instance) take the DNS or health port",
        ),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"), [("60", 60.0), ("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("0.25", 0.25)]
)
def test_durations_in_go_or_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text, "-x") == seconds


def test_serve_stale_is_on_for_an_hour_in_verify_mode_unless_told() -> None:
    _, default = parse(UPSTREAM_MANIFEST_ARGS)
    assert (default.serve_stale, default.serve_stale_mode) == (3600.0, "verify")
    _, told = parse([*UPSTREAM_MANIFEST_ARGS, "--serve-stale", "30m", "--serve-stale-mode", "immediate"])
    assert (told.serve_stale, told.serve_stale_mode) == (1800.0, "immediate")
    _, off = parse([*UPSTREAM_MANIFEST_ARGS, "--serve-stale", "0"])
    assert off.serve_stale == 0


def test_run_without_local_ip_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="-localip: no local address"):
        Settings().require_local_ips()


def test_twins_answer_their_probes_on_the_link_local_address_wherever_it_is_listed() -> None:
    link_local, cluster_ip = ipaddress.ip_address("169.254.20.10"), ipaddress.ip_address("10.96.0.10")
    assert Settings(local_ips=(cluster_ip, link_local)).twin_probe_address() == link_local
    ula = ipaddress.ip_address("fd00::10")
    assert Settings(local_ips=(ula,)).twin_probe_address() == ula  # none link-local: the first
