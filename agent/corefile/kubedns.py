"""The kube-dns ConfigMap (``stubDomains``, ``upstreamNameservers``): parsed and validated before any use.

Everything a cluster admin can put in the ConfigMap is checked here, so a typo is reported with the key and
the problem, and never reaches CoreDNS (which would refuse to start, or worse, try to resolve a host name as
an upstream through the node's resolver). The accepted forms are kube-dns's (``ip``, ``ip:port``,
``[ip6]:port``) plus the transports CoreDNS's *forward* plugin speaks (``dns://``, ``tls://``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.settings import ConfigError

STUB_DOMAINS = "stubDomains"
UPSTREAM_NAMESERVERS = "upstreamNameservers"
KEYS = (STUB_DOMAINS, UPSTREAM_NAMESERVERS)

# kube-dns allows at most 3 upstream nameservers (glibc's MAXNS); CoreDNS's forward at most 15 per block.
MAX_UPSTREAMS = 3
MAX_SERVERS_PER_STUB = 15
# A ConfigMap holds at most 1 MiB in all; a value this large is a mistake, not a configuration. Each stub
# domain costs CoreDNS a server block with its own cache, so their number is bounded too.
MAX_VALUE_BYTES = 128 * 1024
MAX_STUB_DOMAINS = 500
TRANSPORTS = ("dns://", "tls://")

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ConfigMapError(ConfigError):
    """The kube-dns ConfigMap is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class KubeDnsConfig:
    """The validated ConfigMap: domains lower-case, no trailing dot, sorted; servers as CoreDNS takes them.

    An empty config means "no ConfigMap": no stub domains, and the node's resolver as the upstream."""

    stub_domains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    upstream_nameservers: tuple[str, ...] = ()


def parse_kubedns(data: Mapping[str, bytes | str]) -> KubeDnsConfig:
    """Validate the ConfigMap's data (keys other than the two kube-dns keys are ignored, as kube-dns does)."""
    stubs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    upstreams: tuple[str, ...] = ()
    if (raw := data.get(STUB_DOMAINS)) is not None and (doc := _load_json(STUB_DOMAINS, raw)) is not None:
        stubs = _parse_stub_domains(doc)
    if (raw := data.get(UPSTREAM_NAMESERVERS)) is not None and (
        doc := _load_json(UPSTREAM_NAMESERVERS, raw)
    ) is not None:
        upstreams = _parse_upstreams(doc)
    return KubeDnsConfig(stub_domains=stubs, upstream_nameservers=upstreams)


def read_kubedns_dir(path: Path) -> KubeDnsConfig:
    """The ConfigMap mounted as a directory; a missing directory or key means an empty config.

    The kubelet swaps the ``..data`` symlink to publish a new version; both keys are read through one resolved
    ``..data`` so a swap between two reads cannot mix two versions (it is retried when the version we resolved
    is deleted under us)."""
    if not path.exists():
        return KubeDnsConfig()
    if not path.is_dir():
        raise ConfigMapError(f"{path}: not a directory (the kube-dns ConfigMap is mounted as one)")
    for _ in range(5):
        data_link = path / "..data"
        base = Path(os.path.realpath(data_link)) if data_link.is_symlink() else path
        try:
            raw = {key: value for key in KEYS if (value := _read_key(base, key)) is not None}
        except _VersionGoneError:
            continue
        return parse_kubedns(raw)
    raise ConfigMapError(f"{path}: the directory kept changing while it was read")


class _VersionGoneError(Exception):
    """The ``..data`` version being read was removed by a newer swap."""


def _read_key(base: Path, key: str) -> bytes | None:
    try:
        with (base / key).open("rb") as f:
            return f.read(MAX_VALUE_BYTES + 1)
    except FileNotFoundError:
        if base.is_dir():
            return None
        raise _VersionGoneError from None
    except IsADirectoryError:
        raise ConfigMapError(f"{key}: {base / key} is a directory, not a ConfigMap key") from None
    except OSError as exc:
        raise ConfigMapError(f"{key}: cannot read {base / key}: {exc.strerror}") from None


def _load_json(key: str, raw: bytes | str) -> Any:
    """JSON text of one key; ``None`` for an empty value (kube-dns treats it as absent)."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_VALUE_BYTES:
        raise ConfigMapError(f"{key}: {size} bytes is more than the {MAX_VALUE_BYTES} bytes allowed")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigMapError(
                f"{key}: not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
            ) from None
    else:
        text = raw
    if not text.strip():
        return None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for name, value in pairs:
            if name in seen:
                raise ConfigMapError(f"{key}: {name!r} appears twice")
            seen[name] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ConfigMapError:
        raise
    except json.JSONDecodeError as exc:
        raise ConfigMapError(
            f"{key}: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # huge numbers, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigMapError(f"{key}: malformed JSON: {reason}") from None


def _parse_stub_domains(doc: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(doc, dict):
        raise ConfigMapError(f"{STUB_DOMAINS}: must be a JSON object of domain -> list of nameservers, "
                             f"not {_json_type(doc)}")  # fmt: skip
    if len(doc) > MAX_STUB_DOMAINS:
        raise ConfigMapError(
            f"{STUB_DOMAINS}: {len(doc)} domains is more than the {MAX_STUB_DOMAINS} allowed"
        )
    stubs: dict[str, tuple[str, ...]] = {}
    for name, servers in doc.items():
        domain = normalize_domain(name, f"{STUB_DOMAINS}")
        where = f"{STUB_DOMAINS}[{name!r}]"
        if domain in stubs:
            raise ConfigMapError(f"{where}: the domain {domain!r} is given twice")
        if not isinstance(servers, list):
            raise ConfigMapError(f"{where}: must be a list of nameservers, not {_json_type(servers)}")
        if not servers:
            raise ConfigMapError(f"{where}: no nameserver given")
        if len(servers) > MAX_SERVERS_PER_STUB:
            raise ConfigMapError(
                f"{where}: {len(servers)} nameservers is more than the {MAX_SERVERS_PER_STUB} "
                "CoreDNS forwards to"
            )
        stubs[domain] = _parse_servers(servers, where)
    return tuple(sorted(stubs.items()))


def _parse_upstreams(doc: Any) -> tuple[str, ...]:
    if not isinstance(doc, list):
        raise ConfigMapError(
            f"{UPSTREAM_NAMESERVERS}: must be a JSON list of nameservers, not {_json_type(doc)}"
        )
    if len(doc) > MAX_UPSTREAMS:
        raise ConfigMapError(
            f"{UPSTREAM_NAMESERVERS}: {len(doc)} nameservers is more than the {MAX_UPSTREAMS} kube-dns allows"
        )
    return _parse_servers(doc, UPSTREAM_NAMESERVERS)


def _parse_servers(servers: list[Any], where: str) -> tuple[str, ...]:
    parsed: list[str] = []
    for server in servers:
        if not isinstance(server, str):
            raise ConfigMapError(f"{where}: {json.dumps(server)} is not a string")
        text = normalize_nameserver(server, where)
        if text in parsed:
            raise ConfigMapError(f"{where}: nameserver {server!r} is given twice")
        parsed.append(text)
    return tuple(parsed)


def normalize_domain(name: str, where: str, error: type[ConfigError] = ConfigMapError) -> str:
    """A DNS domain as kube-dns accepts it (RFC 1123 labels), lower-cased, without its trailing dot."""
    domain = name.strip().lower().removesuffix(".")
    if not domain:
        raise error(f"{where}: {name!r} is not a domain name (empty; the root '.' cannot be a stub domain)")
    if len(domain) > 253:
        raise error(f"{where}: {name[:40]!r}... is not a domain name (longer than 253 characters)")
    for label in domain.split("."):
        if not label:
            raise error(f"{where}: {name!r} is not a domain name (empty label)")
        if not _LABEL.match(label):
            raise error(
                f"{where}: {name!r} is not a domain name (label {label!r}: 1-63 letters, digits or '-', "
                "not starting or ending with '-')"
            )
    return domain


def normalize_nameserver(server: str, where: str, error: type[ConfigError] = ConfigMapError) -> str:
    """``ip``, ``ip:port``, ``[ip6]:port``, optionally ``dns://`` or ``tls://``; returned as CoreDNS's forward
    takes it, with the address in canonical form. Host names are refused: CoreDNS would resolve them through
    the node's resolver at start."""
    text = server.strip()
    scheme = ""
    if match := _SCHEME.match(text):
        scheme = match.group(0).lower()
        if scheme not in TRANSPORTS:
            raise error(
                f"{where}: {server!r} uses transport {match.group(1)!r}; CoreDNS forwards over dns:// or tls://"
            )
        text = text[match.end() :]
    host, port = _split_host_port(text, server, where, error)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise error(f"{where}: {server!r} is not an IP address (host names are not accepted)") from None
    if (
        ip.is_unspecified
        or ip.is_multicast
        or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"))
    ):
        raise error(f"{where}: {server!r} is not a usable nameserver address")
    if port is not None and not 1 <= port <= 65535:
        raise error(f"{where}: {server!r} has port {port}, not a port number (1-65535)")
    address = str(ip)
    if port is not None:
        address = f"[{address}]:{port}" if ip.version == 6 else f"{address}:{port}"
    return scheme + address


def _split_host_port(text: str, server: str, where: str, error: type[ConfigError]) -> tuple[str, int | None]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise error(f"{where}: {server!r} is not ip, ip:port or [ip6]:port")
        return host, _port(rest[1:], server, where, error) if rest else None
    if text.count(":") == 1:  # IPv4 with a port; bare IPv6 has at least two colons
        host, _, port_text = text.partition(":")
        return host, _port(port_text, server, where, error)
    return text, None


def _port(text: str, server: str, where: str, error: type[ConfigError]) -> int:
    if not text.isdigit() or len(text) > 5:
        raise error(f"{where}: {server!r} has port {text!r}, not a port number (1-65535)")
    return int(text)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
