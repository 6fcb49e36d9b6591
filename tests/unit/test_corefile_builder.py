"""Gathering the inputs (template, ConfigMap dir, Service variable, resolv.conf); writing; print-corefile."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.corefile.files import write_if_changed
from agent.corefile.inputs import CorefileBuilder, Rendered, service_host_variable
from agent.corefile.kubedns import ConfigMapError, KubeDnsConfig
from agent.corefile.lexer import CorefileError
from agent.settings import Settings
from harness.configmapdir import publish

TEMPLATE = Path(__file__).resolve().parents[2] / "corefile" / "Corefile.base"
LOCAL = ipaddress.ip_address("169.254.20.10")


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.events.append(("warning", event, kw))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.53\n")
    return Settings(
        local_ips=(LOCAL,), base_corefile=TEMPLATE, resolv_conf=resolv, corefile=tmp_path / "Corefile",
        upstream_svc="kube-dns-upstream",
    )  # fmt: skip


def builder(settings: Settings, **kw: Any) -> CorefileBuilder:
    kw.setdefault("environ", {"KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.0.11"})
    kw.setdefault("logger", RecordingLog())
    kw.setdefault("systemd_resolv_conf", settings.resolv_conf.parent / "systemd-resolv.conf")
    return CorefileBuilder(settings, **kw)


def test_the_cluster_dns_ip_comes_from_the_upstream_service_environment(settings: Settings) -> None:
    assert builder(settings).cluster_dns_ip() == ipaddress.ip_address("10.96.0.11")
    assert "forward . 10.96.0.11 {" in builder(settings).build().text
    other = replace(settings, upstream_svc="my-dns")
    b = builder(other, environ={"MY_DNS_SERVICE_HOST": "fd00:96::b"})
    assert b.cluster_dns_ip() == ipaddress.ip_address("fd00:96::b")


def test_the_flag_wins_over_the_environment_which_wins_over_the_api(settings: Settings) -> None:
    api_ip = ipaddress.ip_address("10.96.0.99")
    flag = replace(settings, cluster_dns_ip=ipaddress.ip_address("10.96.0.12"))
    assert builder(flag, api_cluster_dns_ip=api_ip).cluster_dns_ip() == ipaddress.ip_address("10.96.0.12")
    assert builder(settings, api_cluster_dns_ip=api_ip).cluster_dns_ip() == ipaddress.ip_address("10.96.0.11")
    assert builder(settings, environ={}, api_cluster_dns_ip=api_ip).cluster_dns_ip() == api_ip
    assert builder(settings, environ={}).cluster_dns_ip() is None


def test_a_bad_service_host_variable_is_named(settings: Settings) -> None:
    with pytest.raises(
        CorefileError, match=r"^KUBE_DNS_UPSTREAM_SERVICE_HOST: 'kube-dns' is not an IP address"
    ):
        builder(settings, environ={"KUBE_DNS_UPSTREAM_SERVICE_HOST": "kube-dns"}).build()


def test_upstreamsvc_defaults_to_kube_dns_as_in_node_cache(settings: Settings) -> None:
    ipvs = replace(settings, upstream_svc=Settings.upstream_svc)
    assert Settings.upstream_svc == "kube-dns"
    b = builder(
        ipvs, environ={"KUBE_DNS_SERVICE_HOST": "10.96.0.10", "KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.0.11"}
    )
    assert "forward . 10.96.0.10 {" in b.build().text  # IPVS mode: the cache does not hold the ClusterIP


def test_a_cluster_dns_ip_that_is_a_local_address_is_refused_as_a_loop(settings: Settings) -> None:
    iptables_mode = replace(
        settings, upstream_svc="kube-dns", local_ips=(LOCAL, ipaddress.ip_address("10.96.0.10"))
    )
    loop = (
        r"^-upstreamsvc kube-dns \(KUBE_DNS_SERVICE_HOST\): 10.96.0.10 is one of -localip, so forwarding the "
        r"cluster domain to it would loop back to this cache; pass -upstreamsvc kube-dns-upstream"
    )
    with pytest.raises(CorefileError, match=loop):
        builder(iptables_mode, environ={"KUBE_DNS_SERVICE_HOST": "10.96.0.10"}).build()


def test_service_host_variable_is_the_kubelets_name() -> None:
    assert service_host_variable("kube-dns-upstream") == "KUBE_DNS_UPSTREAM_SERVICE_HOST"


def test_resolv_conf_nameservers_in_order_first_three_comments_and_junk_skipped(settings: Settings) -> None:
    settings.resolv_conf.write_text(
        "# generated\nsearch example.internal\nnameserver 10.0.0.1 # primary\nnameserver not-an-ip\n"
        "options ndots:2\nnameserver fd00::53\n;nameserver 10.9.9.9\n"
        "nameserver 10.0.0.2\nnameserver 10.0.0.3\n"
    )
    log = RecordingLog()
    assert builder(settings, logger=log).resolv_conf_nameservers() == ("10.0.0.1", "fd00::53", "10.0.0.2")
    assert ("warning", "resolv_conf_line_skipped") in [(lvl, ev) for lvl, ev, _ in log.events]


def test_systemd_resolved_stub_switches_to_the_real_upstreams(settings: Settings) -> None:
    settings.resolv_conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    systemd = settings.resolv_conf.parent / "systemd-resolv.conf"
    systemd.write_text("nameserver 192.168.1.1\nnameserver 192.168.1.2\n")
    log = RecordingLog()
    b = builder(settings, logger=log)
    assert b.resolv_conf_nameservers() == ("192.168.1.1", "192.168.1.2")
    assert "forward . 192.168.1.1 192.168.1.2\n" in b.build().text
    assert log.events[0][1] == "upstreams_from_systemd_resolved"
    assert "names only the local stub resolver 127.0.0.53" in log.events[0][2]["cause"]


def test_a_local_resolver_is_kept_when_there_is_no_systemd_resolved(settings: Settings) -> None:
    settings.resolv_conf.write_text("nameserver 127.0.0.1\n")
    log = RecordingLog()
    assert builder(settings, logger=log).resolv_conf_nameservers() == ("127.0.0.1",)
    assert log.events[0][:2] == ("warning", "upstreams_are_local")


def test_resolv_conf_is_not_needed_when_the_configmap_names_upstreams(settings: Settings) -> None:
    missing = replace(settings, resolv_conf=settings.resolv_conf.parent / "missing")
    text = builder(missing).build(KubeDnsConfig(upstream_nameservers=("1.1.1.1",))).text
    assert "forward . 1.1.1.1\n" in text
    with pytest.raises(
        CorefileError, match=r"^--resolv-conf: cannot read .*missing: No such file or directory"
    ):
        builder(missing).build()


def test_a_resolv_conf_without_nameservers_is_refused(settings: Settings) -> None:
    settings.resolv_conf.write_text("search example.internal\n")
    with pytest.raises(CorefileError, match=r"resolv.conf names no nameserver; set upstreamNameservers"):
        builder(settings).build()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "-basecorefile: cannot read {path}: No such file or directory"),
        (b"\xff\xfe.:53 {}\n", "-basecorefile: {path} is not UTF-8 (byte 0)"),
        (b"#" * (1024 * 1024 + 1), "-basecorefile: {path} is larger than 1048576 bytes"),
    ],
)
def test_an_unreadable_template_is_named(settings: Settings, content: bytes | None, message: str) -> None:
    path = settings.resolv_conf.parent / "Corefile.base"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorefileError) as info:
        builder(replace(settings, base_corefile=path)).build()
    assert str(info.value) == message.format(path=path)


def test_the_configmap_directory_is_read_unless_a_config_is_given(settings: Settings, tmp_path: Path) -> None:
    kube_dns = tmp_path / "kube-dns"
    publish(kube_dns, {"stubDomains": '{"acme.local": ["10.0.0.7"]}'})
    with_dir = replace(settings, kubedns_configmap_dir=kube_dns)
    assert "acme.local:53 {" in builder(with_dir).build().text
    assert "acme.local:53 {" not in builder(with_dir).build(KubeDnsConfig()).text
    publish(kube_dns, {"stubDomains": '{"acme.local": "10.0.0.7"}'})
    with pytest.raises(ConfigMapError, match=r"^stubDomains\['acme.local'\]: must be a list"):
        builder(with_dir).build()


def test_the_same_inputs_build_the_same_corefile_and_other_inputs_another(settings: Settings) -> None:
    first, again = builder(settings).build(), builder(settings).build()
    assert first == again
    other = builder(settings).build(KubeDnsConfig(stub_domains=(("acme.local", ("10.0.0.7",)),)))
    assert other.text != first.text
    assert Rendered.of(other.text) == other
    assert first.endpoints.health_url == "http://169.254.20.10:8080/health"


def test_write_if_changed_writes_atomically_only_when_the_content_differs(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "Corefile"
    assert write_if_changed(path, "one\n") is True
    inode = path.stat().st_ino
    assert write_if_changed(path, "one\n") is False
    assert path.stat().st_ino == inode  # not rewritten
    assert write_if_changed(path, "two\n") is True
    assert path.read_text() == "two\n"
    assert path.stat().st_ino != inode  # replaced by rename, never written in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["Corefile"]


def print_corefile(
    settings: Settings,
    kube_dns: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    *local_ips: str,
    extra: tuple[str, ...] = (),
) -> int:
    """``agent --print-corefile`` with a published kube-dns ConfigMap dir and the Service variable set."""
    monkeypatch.setenv("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.96.0.11")
    directory = settings.resolv_conf.parent / "kube-dns"
    publish(directory, kube_dns)
    return main([
        "--print-corefile", "-localip", ",".join(local_ips), "-basecorefile", str(TEMPLATE),
        "-kubednscm", str(directory), "--resolv-conf", str(settings.resolv_conf),
        "-upstreamsvc", "kube-dns-upstream", *extra,
    ])  # fmt: skip


def test_print_corefile_renders_to_stdout(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stubs = {"stubDomains": '{"acme.local": ["10.0.0.7"]}'}
    assert print_corefile(settings, stubs, monkeypatch, "169.254.20.10", "10.96.0.10") == 0
    out, err = capsys.readouterr()
    assert "bind 169.254.20.10 10.96.0.10\n" in out and "acme.local:53 {" in out
    assert err == ""
    assert not settings.corefile.exists()


def test_print_corefile_shows_serve_stale_as_the_flags_set_it(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert print_corefile(settings, {}, monkeypatch, "169.254.20.10") == 0
    assert capsys.readouterr().out.count("serve_stale 3600s verify 500ms 0s 10s\n") == 4
    told = ("--serve-stale", "5m", "--serve-stale-mode", "immediate")
    assert print_corefile(settings, {}, monkeypatch, "169.254.20.10", extra=told) == 0
    assert capsys.readouterr().out.count("serve_stale 300s immediate 0s 10s\n") == 4
    assert print_corefile(settings, {}, monkeypatch, "169.254.20.10", extra=("--serve-stale", "0")) == 0
    assert "serve_stale" not in capsys.readouterr().out


def test_print_corefile_exits_non_zero_with_the_error_on_stderr(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstreams = {"upstreamNameservers": '["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]'}
    assert print_corefile(settings, upstreams, monkeypatch, "169.254.20.10") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "agent: upstreamNameservers: 4 nameservers is more than the 3 kube-dns allows\n"


def test_twins_get_the_probe_zone_on_a_port_each_instance_reads_from_its_environment(
    settings: Settings,
) -> None:
    one = builder(settings).build().text
    assert "{$" not in one  # one CoreDNS: the Corefile as ever
    text = builder(replace(settings, coredns_instances=2)).build().text
    assert text.startswith(one)
    assert text[len(one) :] == (
        "health.node-local-dns:{$NODE_LOCAL_DNS_PROBE_PORT} {\n    bind 169.254.20.10\n"
        "    template IN A health.node-local-dns {\n"
        '        answer "{{ .Name }} 0 IN A 127.0.0.1"\n    }\n}\n'
    )
