"""The Corefile's inputs, gathered the way node-cache gathers them: the template file, the mounted kube-dns
ConfigMap, ``<SVC>_SERVICE_HOST`` (or the Service's clusterIP from the API), the node's resolv.conf.

The supervisor and ``agent --print-corefile`` both render through :class:`CorefileBuilder`, so they render
from exactly the same sources.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.corefile.endpoints import ProbeEndpoints, probe_endpoints
from agent.corefile.kubedns import KubeDnsConfig, read_kubedns_dir
from agent.corefile.lexer import CorefileError
from agent.corefile.render import (
    CLUSTER_DNS,
    UPSTREAM_SERVERS,
    render,
    serve_stale_directive,
    twin_probe_block,
)
from agent.observe.logs import get_logger
from agent.settings import IPAddress, Settings

# Where systemd-resolved keeps the real upstreams when /etc/resolv.conf names only its stub 127.0.0.53; the
# kubelet makes the same switch. Forwarding to the stub would make CoreDNS's loop plugin stop CoreDNS.
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")
# glibc (MAXNS) and the kubelet use at most 3 nameservers of a resolv.conf.
MAX_RESOLV_CONF_NAMESERVERS = 3
MAX_TEMPLATE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Rendered:
    """A rendered Corefile and where CoreDNS will answer the probes."""

    text: str
    endpoints: ProbeEndpoints

    @classmethod
    def of(cls, text: str) -> Rendered:
        return cls(text, probe_endpoints(text))


class CorefileBuilder:
    """Renders from the sources ``settings`` names; each :meth:`build` reads them afresh.

    ``environ`` is where ``<SVC>_SERVICE_HOST`` is looked up; ``api_cluster_dns_ip`` is the Service's
    clusterIP when the caller read it through the Kubernetes API (used when neither --cluster-dns-ip nor the
    environment gives one)."""

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        api_cluster_dns_ip: IPAddress | None = None,
        systemd_resolv_conf: Path = SYSTEMD_RESOLV_CONF,
        logger: Any = None,
    ) -> None:
        self.settings = settings
        self.log = get_logger("corefile") if logger is None else logger
        self.environ = os.environ if environ is None else environ
        self.api_cluster_dns_ip = api_cluster_dns_ip
        self.systemd_resolv_conf = systemd_resolv_conf

    def build(self, kubedns: KubeDnsConfig | None = None) -> Rendered:
        """Render from the current inputs; ``kubedns`` overrides the mounted ConfigMap (the API source)."""
        s = self.settings
        if kubedns is None:
            dir_ = s.kubedns_configmap_dir
            kubedns = read_kubedns_dir(dir_) if dir_ is not None else KubeDnsConfig()
        template = self.read_template()
        needs_upstreams = not kubedns.upstream_nameservers and UPSTREAM_SERVERS in template
        cluster_dns_ip = self.cluster_dns_ip()
        if cluster_dns_ip in s.require_local_ips() and CLUSTER_DNS in template:
            raise CorefileError(
                f"{self._cluster_dns_source()}: {cluster_dns_ip} is one of -localip, so forwarding the "
                "cluster domain to it would loop back to this cache; pass -upstreamsvc kube-dns-upstream "
                "(the Service the manifest creates), or --cluster-dns-ip"
            )
        text = (
            f"# Written by the node-local-dns agent from {s.base_corefile}: edit that, not this file.\n"
            + render(
                template,
                local_ips=s.require_local_ips(),
                cluster_dns_ip=cluster_dns_ip,
                cluster_domain=s.cluster_domain,
                dns_port=s.dns_port,
                health_port=s.health_port,
                kubedns=kubedns,
                upstream_servers=self.resolv_conf_nameservers() if needs_upstreams else (),
                prometheus_endpoint=s.prometheus_listen_address,
                serve_stale=serve_stale_directive(s.serve_stale, s.serve_stale_mode),
            )
        )
        if s.coredns_instances > 1:
            text += twin_probe_block(s.twin_probe_address())
        return Rendered.of(text)

    def read_template(self) -> str:
        path = self.settings.base_corefile
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            raise CorefileError(f"-basecorefile: cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_TEMPLATE_BYTES:
            raise CorefileError(f"-basecorefile: {path} is larger than {MAX_TEMPLATE_BYTES} bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorefileError(f"-basecorefile: {path} is not UTF-8 (byte {exc.start})") from None

    def cluster_dns_ip(self) -> IPAddress | None:
        """--cluster-dns-ip, else ``<SVC>_SERVICE_HOST`` of -upstreamsvc (as node-cache), else the API's."""
        if self.settings.cluster_dns_ip is not None:
            return self.settings.cluster_dns_ip
        variable = service_host_variable(self.settings.upstream_svc)
        value = self.environ.get(variable, "").strip()
        if value:
            try:
                return ipaddress.ip_address(value)
            except ValueError:
                raise CorefileError(f"{variable}: {value!r} is not an IP address") from None
        return self.api_cluster_dns_ip

    def _cluster_dns_source(self) -> str:
        if self.settings.cluster_dns_ip is not None:
            return "--cluster-dns-ip"
        variable = service_host_variable(self.settings.upstream_svc)
        if self.environ.get(variable, "").strip():
            return f"-upstreamsvc {self.settings.upstream_svc} ({variable})"
        return f"-upstreamsvc {self.settings.upstream_svc} (its clusterIP from the API)"

    def resolv_conf_nameservers(self) -> tuple[str, ...]:
        """The node's nameservers; systemd-resolved's real ones when resolv.conf names only its local stub."""
        path = self.settings.resolv_conf
        servers = self._read_resolv_conf(path)
        if servers and all(ip.is_loopback for ip in servers):
            if self.systemd_resolv_conf.exists():
                self.log.info(
                    "upstreams_from_systemd_resolved",
                    cause=f"{path} names only the local stub resolver {' '.join(map(str, servers))}",
                    resolv_conf=str(self.systemd_resolv_conf),
                )
                path = self.systemd_resolv_conf
                servers = self._read_resolv_conf(path)
            else:
                self.log.warning(
                    "upstreams_are_local", resolv_conf=str(path), nameservers=list(map(str, servers))
                )
        if not servers:
            raise CorefileError(
                f"--resolv-conf: {path} names no nameserver; "
                "set upstreamNameservers in the kube-dns ConfigMap"
            )
        return tuple(str(ip) for ip in servers[:MAX_RESOLV_CONF_NAMESERVERS])

    def _read_resolv_conf(self, path: Path) -> tuple[IPAddress, ...]:
        """Nameserver addresses in file order; like glibc, a line that is not an address is skipped."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CorefileError(f"--resolv-conf: cannot read {path}: {exc.strerror}") from None
        servers: list[IPAddress] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = re.split(r"[#;]", line, maxsplit=1)[0].split()
            if len(words) >= 2 and words[0] == "nameserver":
                try:
                    servers.append(ipaddress.ip_address(words[1]))
                except ValueError:
                    self.log.warning("resolv_conf_line_skipped", path=str(path), line=number, value=words[1])
        return tuple(servers)


def service_host_variable(service: str) -> str:
    """The environment variable the kubelet sets for a Service's ClusterIP (kube-dns-upstream →
    KUBE_DNS_UPSTREAM_SERVICE_HOST)."""
    return service.upper().replace("-", "_").replace(".", "_") + "_SERVICE_HOST"
