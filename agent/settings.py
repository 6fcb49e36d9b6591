"""The agent's settings: one frozen dataclass, validated once, with node-cache's defaults."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IptablesMode = Literal["auto", "legacy", "nft"]
LogFormat = Literal["auto", "json", "console"]
CorednsLogs = Literal["plain", "json"]
ServeStaleMode = Literal["verify", "immediate"]

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --coredns-instances at most: each twin costs a cache's memory and a prober.
MAX_COREDNS_INSTANCES = 8


class ConfigError(ValueError):
    """A setting or an input is invalid; the message names it and says what is wrong."""


@dataclass(frozen=True)
class Settings:
    """Everything the agent is told at start. Durations are in seconds, sizes in bytes."""

    # The addresses CoreDNS serves on: the link-local address and, in iptables mode, the kube-dns ClusterIP.
    # IPv4 and IPv6 may be mixed (node-cache allows one family only).
    local_ips: tuple[IPAddress, ...] = ()
    interface_name: str = "nodelocaldns"
    setup_interface: bool = True
    setup_iptables: bool = True
    # How often rules and addresses are checked when no kernel notification arrived first. node-cache checks
    # every 60 s; a cheap in-process check makes 1 s affordable.
    sync_interval: float = 1.0
    metrics_listen_address: str = "0.0.0.0:9353"
    # CoreDNS's prometheus listener, written where the template says __PROMETHEUS__ENDPOINT__ (node-local-dns
    # main's placeholder and default; the shipped template names :9253 itself).
    prometheus_listen_address: str = ":9253"
    base_corefile: Path = Path("/etc/coredns/Corefile.base")
    # Where the rendered Corefile is written (node-cache's -corefile; CoreDNS's -conf names the same file).
    corefile: Path = Path("/etc/Corefile")
    # The kube-dns ConfigMap mounted as a directory; None when there is none.
    kubedns_configmap_dir: Path | None = None
    # The kube-dns ConfigMap read through the Kubernetes API ("namespace/name"); None to not use the API.
    kubedns_configmap_api: str | None = None
    kubeconfig: Path | None = None
    # The Service whose ClusterIP the cluster zones are forwarded to (its *_SERVICE_HOST variable).
    # node-cache's default, kube-dns, works only where the cache does not hold the kube-dns ClusterIP (IPVS
    # mode); the manifest passes kube-dns-upstream. A ClusterIP that is a local address is refused (a loop).
    upstream_svc: str = "kube-dns"
    cluster_dns_ip: IPAddress | None = None
    cluster_domain: str = "cluster.local"
    health_port: int = 8080
    dns_port: int = 53
    # CoreDNS's -quiet: no start-up banner.
    quiet: bool = False
    skip_teardown: bool = False
    reload_with_signal: bool = False
    pidfile: Path | None = None
    coredns_binary: str = "coredns"
    iptables_mode: IptablesMode = "auto"
    # The node's resolver configuration, for upstream servers when the ConfigMap names none.
    resolv_conf: Path = Path("/etc/resolv.conf")
    # Where the agent records its loop's progress for `agent --check`.
    status_file: Path = Path("/run/node-local-dns/status.json")
    # `agent --check` fails when the loop made no progress for this long. 10 s: far above the loop's 1 s
    # tick, far below the kubelet's default liveness window (3 failures x 10 s period).
    check_max_age: float = 10.0
    # The xtables lock kube-proxy and iptables-legacy share, and how long one attempt may wait for it.
    xtables_lock: Path = Path("/run/xtables.lock")
    # Shared by every agent on the node (a hostPath in the DaemonSet), so that two agents during a surge
    # upgrade never remove what the other relies on.
    agents_lock: Path = Path("/run/node-local-dns-agents.lock")
    xtables_wait: float = 2.0
    log_format: LogFormat = "auto"
    # CoreDNS's own output: "plain" passes its lines through unchanged ("[INFO] plugin/reload: ..."), as
    # node-cache prints them, so log pipelines built for node-cache keep parsing them; "json" makes each a
    # `coredns output` event. The agent's own events are JSON either way.
    coredns_logs: CorednsLogs = "plain"
    # The firewall mark on the agent's DNS probes; a rule lets marked probes to the local addresses skip
    # conntrack, so they reach CoreDNS even while kube-proxy still DNATs the kube-dns ClusterIP. One bit,
    # clear of kube-proxy's 0x4000/0x8000 and of Calico's and Weave's upper bits.
    probe_mark: int = 0x2000
    # CoreDNS's cache answers with an expired entry, for up to this long after it expired, when kube-dns (or
    # an upstream) gives no answer; 0 turns it off. On by default: the cache is the node's last line when
    # kube-dns or the path to it fails, and in "verify" mode nothing changes while kube-dns answers.
    serve_stale: float = 3600.0
    # "verify": kube-dns is asked first and the stale entry goes out only when it fails or stays silent
    # (corefile.STALE_VERIFY_TIMEOUT); "immediate": the stale entry goes out at once, refreshed behind it.
    serve_stale_mode: ServeStaleMode = "verify"
    # CoreDNS processes on the same sockets (SO_REUSEPORT), each supervised on its own: with 2, a crash or a
    # hang of one leaves the other serving, even for pods that query the link-local address directly (IPVS
    # mode, a custom dnsConfig). Each has its own cache. 1 is node-cache's shape (docs/upgrades.md, "CoreDNS
    # twins").
    coredns_instances: int = 1
    # With twins, instance N answers the agent's probe on twin_probe_address() at this port + N (the
    # shared port cannot tell them apart: the kernel hands a probe to any of them).
    coredns_probe_port: int = 5301

    def __post_init__(self) -> None:
        if len(set(self.local_ips)) != len(self.local_ips):
            raise ConfigError(f"-localip: duplicate address in {','.join(map(str, self.local_ips))}")
        if not _IFNAME.match(self.interface_name):
            raise ConfigError(
                f"-interfacename: {self.interface_name!r} is not a valid interface name "
                "(1-15 characters: letters, digits, '_', '.', '-')"
            )
        if not 0.05 <= self.sync_interval <= 3600:
            raise ConfigError(f"-syncinterval: {self.sync_interval}s is outside 0.05s..3600s")
        for name, port in (("-health-port", self.health_port), ("-dns.port", self.dns_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name}: {port} is not a port number (1-65535)")
        if not 1 <= self.coredns_instances <= MAX_COREDNS_INSTANCES:
            raise ConfigError(
                f"--coredns-instances: {self.coredns_instances} is outside 1..{MAX_COREDNS_INSTANCES}"
            )
        probe_ports = range(self.coredns_probe_port, self.coredns_probe_port + self.coredns_instances)
        if self.coredns_instances > 1 and not (probe_ports[0] >= 1 and probe_ports[-1] <= 65535):
            raise ConfigError(
                f"--coredns-probe-port: {probe_ports[0]}-{probe_ports[-1]} (one per instance) are not "
                "port numbers (1-65535)"
            )
        if self.coredns_instances > 1 and {self.dns_port, self.health_port} & set(probe_ports):
            raise ConfigError(
                f"--coredns-probe-port: ports {probe_ports[0]}-{probe_ports[-1]} (one per instance) take "
                f"the DNS or health port"
            )
        if self.health_port == self.dns_port:
            raise ConfigError(f"-health-port: {self.health_port} is also the DNS port")
        parse_host_port(self.metrics_listen_address, "-metrics-listen-address")
        parse_host_port(self.prometheus_listen_address, "-prometheus-listen-address")
        if not 0 < self.probe_mark < 1 << 32 or self.probe_mark & (self.probe_mark - 1):
            raise ConfigError(f"--probe-mark: {self.probe_mark:#x} is not a single bit of a 32-bit mark")
        if self.check_max_age <= 0:
            raise ConfigError(f"--check-max-age: {self.check_max_age}s must be positive")
        if self.serve_stale < 0:
            raise ConfigError(f"--serve-stale: {self.serve_stale}s is negative (0 turns it off)")
        if self.kubedns_configmap_api is not None and self.kubedns_configmap_api.count("/") != 1:
            raise ConfigError(
                f"--kubedns-configmap-api: {self.kubedns_configmap_api!r} is not NAMESPACE/NAME"
            )

    def twin_probe_address(self) -> IPAddress:
        """Where twins answer the agent's probe (each on its own port): the first link-local address, the
        agent's own; else the first. Not a ClusterIP if avoidable: kube-proxy (nftables mode) rejects
        traffic to a Service's address on a port the Service does not have."""
        ips = self.require_local_ips()
        return next((ip for ip in ips if ip.is_link_local), ips[0])

    def require_local_ips(self) -> tuple[IPAddress, ...]:
        if not self.local_ips:
            raise ConfigError("-localip: no local address given (e.g. -localip 169.254.20.10,10.96.0.10)")
        return self.local_ips


def parse_local_ips(value: str) -> tuple[IPAddress, ...]:
    """``-localip``: comma-separated addresses, IPv4 and IPv6 mixed."""
    ips: list[IPAddress] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            ips.append(ipaddress.ip_address(part))
        except ValueError:
            raise ConfigError(f"-localip: {part!r} is not an IP address") from None
    if not ips:
        raise ConfigError(f"-localip: {value!r} holds no address")
    return tuple(ips)


def parse_duration(value: str, flag: str) -> float:
    """A Go-style duration ("1s", "500ms", "1m30s") or a plain number of seconds (node-cache's style)."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ConfigError(f"{flag}: {value!r} is not a duration (e.g. 60, 1s, 500ms)")
    return total


def parse_bool(value: str, flag: str) -> bool:
    """Go's strconv.ParseBool spellings."""
    text = value.strip()
    if text in {"1", "t", "T", "true", "TRUE", "True"}:
        return True
    if text in {"0", "f", "F", "false", "FALSE", "False"}:
        return False
    raise ConfigError(f"{flag}: {value!r} is not a boolean (true or false)")


def parse_host_port(value: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``, as Go's listener takes it: HOST is an address or a host name
    (``localhost:9353``); an empty host means every address."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{flag}: {value!r} is not HOST:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            labels = host.removesuffix(".").split(".")
            if bracketed or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
                raise ConfigError(f"{flag}: {host!r} is neither an IP address nor a host name") from None
    return host, int(port_text)
