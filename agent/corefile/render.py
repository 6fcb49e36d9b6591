"""The Corefile: node-cache's template placeholders filled in, the kube-dns stub domains appended.

:func:`render` is pure and deterministic: the same inputs give the same bytes, so a digest tells whether
CoreDNS needs a reload. Everything that can be wrong is found here, before a file is written or CoreDNS is
signalled: an invalid input leaves the previous Corefile in place and CoreDNS serving it.

:class:`CorefileBuilder` gathers the inputs the way node-cache does (the template file, the mounted kube-dns
ConfigMap, ``<SVC>_SERVICE_HOST``, the node's resolv.conf) so the supervisor and ``agent --print-corefile``
render from exactly the same sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.corefile.kubedns import (
    KubeDnsConfig,
    normalize_domain,
    normalize_nameserver,
    read_kubedns_dir,
)
from agent.observe.logs import get_logger
from agent.settings import ConfigError, IPAddress, Settings

LOCAL_DNS = "__PILLAR__LOCAL__DNS__"
DNS_SERVER = "__PILLAR__DNS__SERVER__"
DNS_DOMAIN = "__PILLAR__DNS__DOMAIN__"
CLUSTER_DNS = "__PILLAR__CLUSTER__DNS__"
UPSTREAM_SERVERS = "__PILLAR__UPSTREAM__SERVERS__"
# The agent's own: node-cache's template hard-codes 53 and 8080, which -dns.port and -health-port cannot move.
DNS_PORT = "__PILLAR__DNS__PORT__"
HEALTH_PORT = "__PILLAR__HEALTH__PORT__"
# node-local-dns main's (2026-06): CoreDNS's prometheus listener, -prometheus-listen-address (default :9253).
PROMETHEUS_ENDPOINT = "__PROMETHEUS__ENDPOINT__"

# The zone CoreDNS answers by itself, for the agent's DNS health probe: asking it proves CoreDNS is serving on
# the local address without depending on kube-dns or the upstream resolvers being up.
HEALTH_PROBE_ZONE = "health.node-local-dns"
HEALTH_PROBE_NAME = f"{HEALTH_PROBE_ZONE}."
HEALTH_PROBE_TYPE = "A"
HEALTH_PROBE_ANSWER = "127.0.0.1"

# With twins (--coredns-instances), each CoreDNS process gets its own port for the agent's probe through this
# environment variable, which CoreDNS substitutes where the Corefile says {$NAME}: one file serves them all.
PROBE_PORT_ENV = "NODE_LOCAL_DNS_PROBE_PORT"

# Where the agent puts CoreDNS's `ready` when the template has none (the node-local-dns ConfigMap has none:
# node-cache's CoreDNS build lacks the plugin, so the same ConfigMap must serve both for a rollback by image
# swap). The manifest's readiness probe asks the first local address on this port.
READY_PORT = 8181
READY_ZONE = "ready.node-local-dns"
# CoreDNS's defaults when `health` / `ready` name no address.
DEFAULT_HEALTH_ADDRESS = ":8080"
DEFAULT_READY_ADDRESS = ":8181"
# Where systemd-resolved keeps the real upstreams when /etc/resolv.conf names only its stub 127.0.0.53; the
# kubelet makes the same switch. Forwarding to the stub would make CoreDNS's loop plugin stop CoreDNS.
SYSTEMD_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")
# glibc (MAXNS) and the kubelet use at most 3 nameservers of a resolv.conf.
MAX_RESOLV_CONF_NAMESERVERS = 3
MAX_TEMPLATE_BYTES = 1024 * 1024
STUB_CACHE_TTL = 30

# serve_stale's settings besides its duration and mode (--serve-stale, --serve-stale-mode), in the order the
# cache plugin takes them (CoreDNS v1.14: serve_stale DURATION verify [TIMEOUT [TTL [RECHECK]]], or immediate
# [TTL [RECHECK]]):
# - verify's timeout: how long kube-dns gets before the stale answer goes out; a blackholed kube-dns would
#   otherwise hold each query for the forward plugin's 5 s, past the clients' own timeouts (glibc's
#   `timeout:1` is the shortest common one). A healthy kube-dns on another node answers in milliseconds.
STALE_VERIFY_TIMEOUT = "500ms"
# - the TTL of a stale answer: 0 (CoreDNS's default). The cache's clients are the pods' stub resolvers, which
#   keep nothing: with 0 they ask again and get the fresh answer as soon as the cache has it.
STALE_RESPONSE_TTL = "0s"
# - after a failed refresh, the stale entry is served without asking kube-dns again for this long: one
#   attempt per name per 10 s instead of one per query (and, in verify mode, one waiting client instead of
#   all of them), so a failing kube-dns is not hammered. Fresh answers return once a refresh succeeds: within
#   about 15 s of kube-dns's return (a failed refresh takes the forward plugin's 5 s, then this recheck).
STALE_FAILURE_RECHECK = "10s"

_PLACEHOLDER = re.compile(r"__PILLAR__[A-Za-z0-9_]*")
_UPSTREAM_FORWARD = re.compile(r"^\s*forward\s+\.\s+" + UPSTREAM_SERVERS + r"\s*\{\s*$")


class CorefileError(ConfigError):
    """The Corefile cannot be rendered from these inputs; the message names the input and the problem."""


# Rendering -------------------------------------------------------------------------------------------------


def render(
    template: str,
    *,
    local_ips: Sequence[IPAddress],
    cluster_dns_ip: IPAddress | None,
    cluster_domain: str,
    dns_port: int,
    health_port: int,
    kubedns: KubeDnsConfig,
    upstream_servers: Sequence[str] = (),
    prometheus_endpoint: str = Settings.prometheus_listen_address,
    serve_stale: str | None = None,
) -> str:
    """The Corefile for these inputs.

    ``upstream_servers`` is the fallback for ``.`` when the ConfigMap names no ``upstreamNameservers`` (the
    node's resolv.conf nameservers). Custom upstreams drop ``force_tcp`` from the ``.`` forward, as node-cache
    does (UDP-only resolvers broke otherwise); stub domains are forwarded over UDP for the same reason.
    ``serve_stale`` (a ``serve_stale …`` line, see :func:`serve_stale_directive`) goes into every ``cache``
    that has none."""
    if not local_ips:
        raise CorefileError("-localip: no local address given (e.g. -localip 169.254.20.10,10.96.0.10)")
    domain = normalize_domain(cluster_domain, "--cluster-domain", CorefileError)
    upstreams = kubedns.upstream_nameservers or tuple(
        normalize_nameserver(s, "upstream servers (resolv.conf)", CorefileError) for s in upstream_servers
    )
    values = {
        DNS_DOMAIN: domain,
        DNS_PORT: str(dns_port),
        HEALTH_PORT: str(health_port),
        CLUSTER_DNS: str(cluster_dns_ip) if cluster_dns_ip is not None else None,
        UPSTREAM_SERVERS: " ".join(upstreams) or None,
        PROMETHEUS_ENDPOINT: prometheus_endpoint,
    }
    lines = template.splitlines()
    if kubedns.upstream_nameservers:
        lines = _without_force_tcp_to_upstreams(lines)
    substituted = [(line, _substitute(line, n, local_ips, values)) for n, line in enumerate(lines, 1)]
    # A line that was only a comment goes (the template's notes are about placeholders, half of which the
    # documented sed fills in); so does the `reload` directive (see RELOAD_DIRECTIVE).
    out = [
        code
        for line, code in substituted
        if (code or not line.strip()) and not RELOAD_DIRECTIVE.fullmatch(code)
    ]
    body = "\n".join(out).strip("\n") + "\n"
    blocks = server_blocks(body)
    served = {(zone, port or dns_port) for block in blocks for zone, port in block.zones}
    probe_missing = (HEALTH_PROBE_ZONE, dns_port) not in served
    has_ready = any(name == "ready" for block in blocks for name, _ in block.directives)
    ready = None if has_ready else f"{_host(local_ips[0])}:{READY_PORT}"
    ours = {(HEALTH_PROBE_ZONE, dns_port)} | (
        {(READY_ZONE, dns_port)} if ready and not probe_missing else set()
    )
    _check_stub_domains(kubedns, domain, served | ours, local_ips, dns_port)
    binds = " ".join(map(str, local_ips))
    for stub, servers in kubedns.stub_domains:
        body += (
            f"{stub}:{dns_port} {{\n    errors\n    cache {STUB_CACHE_TTL}\n    bind {binds}\n"
            f"    forward . {' '.join(servers)}\n}}\n"
        )
    if probe_missing:
        body += probe_server_block(local_ips, dns_port, ready)
    elif ready:
        body += (
            f"{READY_ZONE}:{dns_port} {{\n    bind {' '.join(map(str, local_ips))}\n    ready {ready}\n}}\n"
        )
    if serve_stale:
        body = "\n".join(_with_serve_stale(body.splitlines(), serve_stale)) + "\n"
    return body


def serve_stale_directive(seconds: float, mode: str) -> str | None:
    """The ``serve_stale`` line for ``--serve-stale`` and ``--serve-stale-mode``; None when it is off."""
    if seconds <= 0:
        return None
    timeout = f" {STALE_VERIFY_TIMEOUT}" if mode == "verify" else ""
    return f"serve_stale {seconds:g}s {mode}{timeout} {STALE_RESPONSE_TTL} {STALE_FAILURE_RECHECK}"


def _with_serve_stale(lines: list[str], directive: str) -> list[str]:
    """``directive`` in every server block's ``cache``: ``cache 30`` becomes a block holding it; a ``cache {``
    block gets it as its first line, unless it has a ``serve_stale`` of its own (the template's wins)."""
    out: list[str] = []
    depth = 0
    for number, line in enumerate(lines):
        tokens = [token for _, token in _tokens(line)]
        if depth == 1 and tokens[:1] == ["cache"] and "}" not in tokens:
            indent = line[: len(line) - len(line.lstrip())]
            if "{" not in tokens:
                out += [f"{line.rstrip()} {{", f"{indent}    {directive}", f"{indent}}}"]
                continue
            if tokens[-1] == "{" and not _block_has(lines[number + 1 :], "serve_stale"):
                out += [line, f"{indent}    {directive}"]
                depth += 1
                continue
        depth += tokens.count("{") - tokens.count("}")
        out.append(line)
    return out


def _block_has(lines: list[str], directive: str) -> bool:
    """Whether the block whose body starts at ``lines[0]`` holds ``directive`` at its top level."""
    depth = 0
    for line in lines:
        tokens = [token for _, token in _tokens(line)]
        if depth == 0 and tokens[:1] == [directive]:
            return True
        depth += tokens.count("{") - tokens.count("}")
        if depth < 0:
            return False
    return False


def probe_server_block(local_ips: Sequence[IPAddress], dns_port: int, ready: str | None = None) -> str:
    """The zone the health probe asks, added when a template (e.g. a node-cache ConfigMap) lacks it; it
    carries CoreDNS's ``ready`` (the readiness probe's ``/ready``) when the template has none."""
    return (
        f"{HEALTH_PROBE_ZONE}:{dns_port} {{\n    bind {' '.join(map(str, local_ips))}\n"
        + (f"    ready {ready}\n" if ready else "")
        + f"    template IN {HEALTH_PROBE_TYPE} {HEALTH_PROBE_ZONE} {{\n"
        f'        answer "{{{{ .Name }}}} 0 IN {HEALTH_PROBE_TYPE} {HEALTH_PROBE_ANSWER}"\n    }}\n}}\n'
    )


def twin_probe_block(address: IPAddress) -> str:
    """The probe zone on each twin's own port (:data:`PROBE_PORT_ENV`), bound to ``address`` (see
    :meth:`Settings.twin_probe_address`: the agent's own, so the port is free), where the kernel cannot hand
    the probe to another twin."""
    return (
        f"{HEALTH_PROBE_ZONE}:{{${PROBE_PORT_ENV}}} {{\n    bind {address}\n"
        f"    template IN {HEALTH_PROBE_TYPE} {HEALTH_PROBE_ZONE} {{\n"
        f'        answer "{{{{ .Name }}}} 0 IN {HEALTH_PROBE_TYPE} {HEALTH_PROBE_ANSWER}"\n    }}\n}}\n'
    )


def _substitute(
    line: str, number: int, local_ips: Sequence[IPAddress], values: Mapping[str, str | None]
) -> str:
    """One template line with its placeholders filled in and its comment dropped: the rendered Corefile
    carries no placeholder, not even in a comment."""
    cut = _comment_start(line, number)
    code = line[:cut]
    # Before ":PORT" only one address fits (health LOCALIP:8080): the first, node-cache's link-local one.
    code = code.replace(f"{LOCAL_DNS}:", f"{_host(local_ips[0])}:")
    code = code.replace(LOCAL_DNS, " ".join(map(str, local_ips)))
    code = re.sub(r"[ \t]*" + DNS_SERVER, "", code)
    for placeholder, value in values.items():
        if placeholder in code:
            if value is None:
                raise CorefileError(f"Corefile template line {number}: {placeholder} {_MISSING[placeholder]}")
            code = code.replace(placeholder, value)
    if leftover := _PLACEHOLDER.search(code):
        raise CorefileError(
            f"Corefile template line {number}: unknown placeholder {leftover.group(0)} "
            f"(known: {', '.join(_KNOWN)})"
        )
    return code.rstrip()


# The `reload` plugin and SIGUSR1 do not mix: after a SIGUSR1 reload, the old instance's reload plugin fires,
# fails ("getting old listener file: use of closed network connection") and counts a failed reload (CoreDNS
# issue 6263). The agent watches every input and reloads with SIGUSR1 itself, so the directive is dropped.
RELOAD_DIRECTIVE = re.compile(r"[ \t]*reload(?:[ \t][^{]*)?")


_MISSING = {
    CLUSTER_DNS: "has no value: the kube-dns-upstream Service's IP is unknown "
    "(set its *_SERVICE_HOST variable through -upstreamsvc, or --cluster-dns-ip)",
    UPSTREAM_SERVERS: "has no value: no upstreamNameservers and no nameserver in resolv.conf",
}
_KNOWN = (LOCAL_DNS, DNS_SERVER, DNS_DOMAIN, CLUSTER_DNS, UPSTREAM_SERVERS, DNS_PORT, HEALTH_PORT,
          PROMETHEUS_ENDPOINT)  # fmt: skip


def _without_force_tcp_to_upstreams(lines: list[str]) -> list[str]:
    """node-cache's switch of the ``.`` forward to UDP when the ConfigMap names the upstreams."""
    out: list[str] = []
    opening: int | None = None  # index in ``out`` of the forward line whose block we are in
    for line in lines:
        if _UPSTREAM_FORWARD.match(line):
            opening = len(out)
        elif opening is not None and line.strip() == "}":
            if all(not body.strip() for body in out[opening + 1 :]):  # nothing left: a one-line forward
                del out[opening + 1 :]
                out[opening] = out[opening].rstrip().removesuffix("{").rstrip()
                opening = None
                continue
            opening = None
        elif opening is not None and line.split("#")[0].strip() == "force_tcp":
            continue
        out.append(line)
    return out


def _check_stub_domains(
    kubedns: KubeDnsConfig,
    cluster_domain: str,
    served: set[tuple[str, int]],
    local_ips: Sequence[IPAddress],
    dns_port: int,
) -> None:
    own = {f"{_host(ip)}:{dns_port}" for ip in local_ips} | {str(ip) for ip in local_ips if dns_port == 53}
    for stub, servers in kubedns.stub_domains:
        if stub == cluster_domain:
            raise CorefileError(
                f"stubDomains: {stub!r} is the cluster domain; it is always forwarded to the cluster DNS"
            )
        if (stub, dns_port) in served:
            raise CorefileError(f"stubDomains: {stub!r} is already a zone of the Corefile")
        for server in servers:
            if server.removeprefix("dns://") in own:
                raise CorefileError(
                    f"stubDomains[{stub!r}]: {server} is this cache's own address; "
                    "forwarding to it would loop"
                )
    for server in kubedns.upstream_nameservers:
        if server.removeprefix("dns://") in own:
            raise CorefileError(
                f"upstreamNameservers: {server} is this cache's own address; forwarding to it would loop"
            )


def _host(ip: IPAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


# A small Corefile reader: enough to find server blocks, their zones, and the health/ready addresses --------


@dataclass(frozen=True)
class ServerBlock:
    line: int
    # (zone without trailing dot, "" for the root; port or None for CoreDNS's default port)
    zones: tuple[tuple[str, int | None], ...]
    # Directives of the block (first word of each line at the block's top level) and their arguments.
    directives: tuple[tuple[str, tuple[str, ...]], ...]


def server_blocks(text: str) -> list[ServerBlock]:
    """The server blocks of a Corefile; raises CorefileError for unbalanced braces or a dangling key."""
    blocks: list[ServerBlock] = []
    depth = 0
    keys: list[str] = []
    key_line = 0
    directives: list[tuple[str, list[str]]] = []
    last_line = 0
    for number, token in _tokens(text):
        new_line = number != last_line
        last_line = number
        if token == "{":
            if depth == 0:
                if not keys:
                    raise CorefileError(f"Corefile line {number}: '{{' without a server block key")
                directives = []
            depth += 1
        elif token == "}":
            if depth == 0:
                raise CorefileError(f"Corefile line {number}: '}}' closes no block")
            depth -= 1
            if depth == 0:
                if not keys[0].startswith("("):  # "(name) { }" is a snippet, not a server
                    blocks.append(_server_block(key_line, keys, directives))
                keys = []
        elif depth == 0:
            if not keys:
                key_line = number
            keys.append(token)
            if keys[0] == "import" and len(keys) == 2:
                keys = []
        elif depth == 1:
            if new_line:
                directives.append((token, []))
            elif directives:
                directives[-1][1].append(token)
    if depth:
        raise CorefileError(f"Corefile line {key_line}: the block of {' '.join(keys)} is not closed")
    if keys:
        raise CorefileError(f"Corefile line {key_line}: {' '.join(keys)} has no block")
    return blocks


def _server_block(line: int, keys: list[str], directives: list[tuple[str, list[str]]]) -> ServerBlock:
    zones: list[tuple[str, int | None]] = []
    for key in keys:
        text = re.sub(r"^[a-z0-9+.-]+://", "", key.lower())
        zone, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            zone, port = text, ""
        zones.append((zone.removesuffix("."), int(port) if port else None))
    return ServerBlock(line, tuple(zones), tuple((d, tuple(args)) for d, args in directives))


def _tokens(text: str) -> Iterator[tuple[int, str]]:
    """Corefile tokens with their line numbers: words, quoted strings (unquoted), braces; no comments."""
    for number, line in enumerate(text.splitlines(), 1):
        i = 0
        while i < len(line):
            c = line[i]
            if c.isspace():
                i += 1
            elif c == "#":
                break
            elif c == '"':
                end = _closing_quote(line, i, number)
                yield number, line[i + 1 : end]
                i = end + 1
            else:
                start = i
                while i < len(line) and not line[i].isspace() and line[i] != '"':
                    i += 1
                yield number, line[start:i]


def _comment_start(line: str, number: int) -> int:
    i = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            i = _closing_quote(line, i, number) + 1
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return i
        else:
            i += 1
    return len(line)


def _closing_quote(line: str, start: int, number: int) -> int:
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == '"':
            return i
        else:
            i += 1
    raise CorefileError(f"Corefile line {number}: a quoted string is not closed")


@dataclass(frozen=True)
class ProbeEndpoints:
    """Where CoreDNS answers the supervisor's probes, read from the rendered Corefile itself, so they are
    right for any template (the default one, or a node-cache ConfigMap with its literal ``:8080``)."""

    health_url: str | None
    ready_url: str | None
    metrics_url: str | None = None


def probe_endpoints(text: str) -> ProbeEndpoints:
    """The ``/health``, ``/ready`` and ``/metrics`` URLs of the first ``health``, ``ready`` and ``prometheus``
    directives, if any."""
    found: dict[str, str] = {}
    for block in server_blocks(text):
        for name, args in block.directives:
            if name in _DEFAULT_ADDRESSES and name not in found:
                address = args[0] if args and args[0] != "{" else _DEFAULT_ADDRESSES[name]
                found[name] = _url(address, "metrics" if name == "prometheus" else name)
    return ProbeEndpoints(found.get("health"), found.get("ready"), found.get("prometheus"))


_DEFAULT_ADDRESSES = {
    "health": DEFAULT_HEALTH_ADDRESS,
    "ready": DEFAULT_READY_ADDRESS,
    "prometheus": "localhost:9153",
}


def _url(address: str, path: str) -> str:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"  # an empty host listens everywhere, loopback included
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{port}/{path}"


# Gathering the inputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """A rendered Corefile, its SHA-256 (what changed?) and where CoreDNS will answer the probes."""

    text: str
    digest: str
    endpoints: ProbeEndpoints

    @classmethod
    def of(cls, text: str) -> Rendered:
        return cls(text, hashlib.sha256(text.encode()).hexdigest(), probe_endpoints(text))


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


# Writing and printing ---------------------------------------------------------------------------------------


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically (temp file, fsync, rename) unless ``path`` already holds it; True if written.

    CoreDNS reads the file on (re)load: it must never see a half-written one."""
    data = text.encode()
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True
