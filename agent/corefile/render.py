"""The Corefile: node-cache's template placeholders filled in, the kube-dns stub domains appended.

:func:`render` is pure and deterministic: the same inputs give the same bytes, so comparing texts tells
whether CoreDNS needs a reload. Everything that can be wrong is found here, before a file is written or
CoreDNS is signalled: an invalid input leaves the previous Corefile in place and CoreDNS serving it.

Every edit (placeholders, comments, ``reload``, ``force_tcp``, ``serve_stale``) is made on the template's
tokens as :mod:`agent.corefile.lexer` reads them, and spliced into the original text: what no edit touches
stays as the template's author wrote it. Gathering the inputs is :mod:`agent.corefile.inputs`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from agent.corefile.kubedns import KubeDnsConfig, normalize_domain, normalize_nameserver
from agent.corefile.lexer import CorefileError, Lexed, Token, lex
from agent.corefile.parse import Corefile, parse
from agent.corefile.splice import Splice
from agent.settings import IPAddress, Settings

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

# The `reload` plugin and SIGUSR1 do not mix: after a SIGUSR1 reload, the old instance's reload plugin fires,
# fails ("getting old listener file: use of closed network connection") and counts a failed reload (CoreDNS
# issue 6263). The agent watches every input and reloads with SIGUSR1 itself, so the directive is dropped.
RELOAD_DIRECTIVE = "reload"

_PLACEHOLDER = re.compile(r"__PILLAR__[A-Za-z0-9_]*")
_DNS_SERVER = re.compile(r"[ \t]*" + DNS_SERVER)
_SPACES_BEFORE = re.compile(r"[ \t]*\Z")


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
    source = lex(template)
    edits = Splice(source)
    # Comments go (the template's notes are about placeholders, half of which the documented sed fills in:
    # the rendered Corefile carries no placeholder, not even in a comment), and with them lines left empty.
    edits.drop_comments()
    _fill_placeholders(source, edits, local_ips, values)
    corefile = parse(source)  # after the placeholders: their errors name the template line first
    for directive in corefile.top_level_directives():
        if directive.name.text == RELOAD_DIRECTIVE and directive.block is None:
            edits.delete(directive.start, directive.end)
    if kubedns.upstream_nameservers:
        _drop_force_tcp_to_upstreams(corefile, edits)
    body = edits.text(tidy=True).strip("\n") + "\n"
    blocks = parse(body).servers
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
        body = with_serve_stale(body, serve_stale)
    return body


def serve_stale_directive(seconds: float, mode: str) -> str | None:
    """The ``serve_stale`` line for ``--serve-stale`` and ``--serve-stale-mode``; None when it is off."""
    if seconds <= 0:
        return None
    timeout = f" {STALE_VERIFY_TIMEOUT}" if mode == "verify" else ""
    return f"serve_stale {seconds:g}s {mode}{timeout} {STALE_RESPONSE_TTL} {STALE_FAILURE_RECHECK}"


def with_serve_stale(text: str, directive: str) -> str:
    """``directive`` in every ``cache`` of a server block or snippet: ``cache 30`` gets a block holding it; a
    ``cache { … }`` block gets it as its first line, unless it has a ``serve_stale`` of its own (the
    template's wins)."""
    source = lex(text)
    edits = Splice(source)
    index = {token.start: n for n, token in enumerate(source.tokens)}
    for cache in parse(source).top_level_directives():
        if cache.name.text != "cache":
            continue
        indent = source.indent(cache.name)
        if cache.block is None:
            edits.insert(cache.end, f" {{\n{indent}    {directive}\n{indent}}}")
        elif not cache.block.has("serve_stale"):
            opening = cache.block.open
            after = source.tokens[index[opening.start] + 1]
            if after.line > opening.line:  # "{" ends its line, as usual
                edits.insert(opening.end, f"\n{indent}    {directive}")
            else:  # "cache { success 9984 30": the option on the brace's line moves below the directive
                tail = indent if after is cache.block.close else f"{indent}    "
                edits.replace(opening.end, after.start, f"\n{indent}    {directive}\n{tail}")
    return edits.text()


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


def _fill_placeholders(
    source: Lexed, edits: Splice, local_ips: Sequence[IPAddress], values: Mapping[str, str | None]
) -> None:
    """Each token's placeholders filled in (quoted strings included: the text between the quotes is the
    template's too). Line by line, so that an error names the first template line at fault."""
    lines: dict[int, list[Token]] = {}
    for token in source.tokens:
        lines.setdefault(token.line, []).append(token)
    for number, tokens in lines.items():
        filled: list[tuple[Token, int, str]] = []
        for token in tokens:
            raw = source.text[token.start : token.end]
            if "__PILLAR__" not in raw and PROMETHEUS_ENDPOINT not in raw:
                continue
            # Before ":PORT" only one address fits (health LOCALIP:8080): the first, node-cache's link-local.
            code = raw.replace(f"{LOCAL_DNS}:", f"{_host(local_ips[0])}:")
            code = code.replace(LOCAL_DNS, " ".join(map(str, local_ips)))
            start = token.start
            if code.startswith(DNS_SERVER):  # "bind A __PILLAR__DNS__SERVER__": the space before goes too
                spaces = _SPACES_BEFORE.search(source.text, source.line_start(start), start)
                start = spaces.start() if spaces else start
            filled.append((token, start, _DNS_SERVER.sub("", code)))
        line_code = " ".join(code for _, _, code in filled)
        for placeholder, value in values.items():
            if placeholder in line_code and value is None:
                raise CorefileError(f"Corefile template line {number}: {placeholder} {_MISSING[placeholder]}")
        for token, start, partly in filled:
            code = partly
            for placeholder, value in values.items():
                code = code.replace(placeholder, value or "")
            if leftover := _PLACEHOLDER.search(code):
                raise CorefileError(
                    f"Corefile template line {number}: unknown placeholder {leftover.group(0)} "
                    f"(known: {', '.join(_KNOWN)})"
                )
            edits.replace(start, token.end, code)


_MISSING = {
    CLUSTER_DNS: "has no value: the kube-dns-upstream Service's IP is unknown "
    "(set its *_SERVICE_HOST variable through -upstreamsvc, or --cluster-dns-ip)",
    UPSTREAM_SERVERS: "has no value: no upstreamNameservers and no nameserver in resolv.conf",
}
_KNOWN = (LOCAL_DNS, DNS_SERVER, DNS_DOMAIN, CLUSTER_DNS, UPSTREAM_SERVERS, DNS_PORT, HEALTH_PORT,
          PROMETHEUS_ENDPOINT)  # fmt: skip


def _drop_force_tcp_to_upstreams(corefile: Corefile, edits: Splice) -> None:
    """node-cache's switch of the ``.`` forward to UDP when the ConfigMap names the upstreams: its
    ``force_tcp`` goes, and its block too when nothing else is left in it."""
    for forward in corefile.top_level_directives():
        if (
            forward.name.text != "forward"
            or forward.arg_texts != (".", UPSTREAM_SERVERS)
            or not forward.block
        ):
            continue
        options = forward.block.directives
        if all(option.name.text == "force_tcp" for option in options):
            edits.delete(forward.args[-1].end, forward.block.close.end)  # a one-line forward
        else:
            for option in options:
                if option.name.text == "force_tcp":
                    edits.delete(option.start, option.end)


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
