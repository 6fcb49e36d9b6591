"""Where CoreDNS answers the agent's probes and serves its metrics, read from the rendered Corefile itself, so
they are right for any template (the default one, or a node-cache ConfigMap with its literal ``:8080``)."""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass

from agent.corefile.parse import server_blocks

# CoreDNS's defaults when `health` / `prometheus` name no address.
DEFAULT_HEALTH_ADDRESS = ":8080"
DEFAULT_PROMETHEUS_ADDRESS = "localhost:9153"


@dataclass(frozen=True)
class ProbeEndpoints:
    health_url: str | None
    metrics_url: str | None = None


def probe_endpoints(text: str) -> ProbeEndpoints:
    """The ``/health`` and ``/metrics`` URLs of the first ``health`` and ``prometheus`` directives, if any
    (directives a server block imports from a snippet count too)."""
    found: dict[str, str] = {}
    for block in server_blocks(text):
        for name, args in block.directives:
            if name in _DEFAULT_ADDRESSES and name not in found:
                address = args[0] if args else _DEFAULT_ADDRESSES[name]
                found[name] = _url(address, "metrics" if name == "prometheus" else name)
    return ProbeEndpoints(found.get("health"), found.get("prometheus"))


_DEFAULT_ADDRESSES = {"health": DEFAULT_HEALTH_ADDRESS, "prometheus": DEFAULT_PROMETHEUS_ADDRESS}


def _url(address: str, path: str) -> str:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"  # an empty host listens everywhere, loopback included
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return f"http://{host}:{port}/{path}"
