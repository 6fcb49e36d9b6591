"""The agent's metrics endpoint: its own series and CoreDNS's current ones on one port, as node-cache has.

node-cache serves CoreDNS's metrics and its own from one registry, so dashboards and ``prometheus.io/port``
annotations find everything on one port. Here CoreDNS is a child process with its own listener (the
Corefile's ``prometheus`` address): at each scrape the agent fetches CoreDNS's exposition, within a short
timeout, and serves it after its own. A failed fetch (CoreDNS restarting, hung) never fails the scrape: it
sets ``nodelocaldns_agent_coredns_metrics_up`` to 0 and counts
``nodelocaldns_agent_coredns_metrics_fetch_failures_total``, and the agent's own series are served anyway.
CoreDNS's text is passed through unchanged (parsing and re-exposing it would cost CPU on every scrape and
could rename Go counters); the agent's process series carry its prefix, so no name appears twice.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import requests
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.observe.logs import get_logger
from agent.observe.metrics import Metrics
from agent.settings import parse_host_port

log = get_logger("metrics")

# How long one scrape waits for CoreDNS's metrics: far below Prometheus's default 10 s scrape timeout, far
# above a healthy CoreDNS's few milliseconds.
COREDNS_FETCH_TIMEOUT = 1.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class CoreDnsMetrics:
    """Fetches CoreDNS's exposition at scrape time; records in ``metrics`` whether it could."""

    def __init__(
        self, metrics: Metrics, url: Callable[[], str | None], timeout: float = COREDNS_FETCH_TIMEOUT
    ) -> None:
        self.metrics, self.url, self.timeout = metrics, url, timeout
        self._session = requests.Session()
        self._lock = threading.Lock()  # a Session is not safe for concurrent use

    def fetch(self) -> bytes:
        url = self.url()
        if url is None:
            return self._failed("no prometheus listener in the Corefile")
        try:
            with self._lock:
                response = self._session.get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return self._failed(f"{url} answered {response.status_code}")
        self.metrics.coredns_metrics_up.set(1)
        body = response.content
        return body if body.endswith(b"\n") or not body else body + b"\n"

    def _failed(self, why: str) -> bytes:
        self.metrics.coredns_metrics_up.set(0)
        self.metrics.coredns_metrics_failures.inc()
        log.debug("coredns metrics not fetched", error=why)
        return b""


def metrics_app(
    metrics: Metrics, coredns: CoreDnsMetrics
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        theirs = coredns.fetch()  # first: its outcome is one of our series
        body = generate_latest(metrics.registry) + theirs
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_port = True  # a second agent on the node (a surge upgrade) listens on the same port


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def listen_address(
    address: str, flag: str = "-metrics-listen-address"
) -> tuple[socket.AddressFamily, str, int]:
    """Where to listen for ``HOST:PORT``, as Go's listener does: an empty host is every IPv4 address here (as
    before), a name is resolved and its first IPv4 address preferred."""
    host, port = parse_host_port(address, flag)
    if not host:
        return socket.AF_INET, "0.0.0.0", port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    chosen = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
    return chosen[0], str(chosen[4][0]), port


def serve_metrics(address: str, metrics: Metrics, coredns_url: Callable[[], str | None]) -> WSGIServer:
    """Start the endpoint in a thread; raises OSError when it cannot listen."""
    family, host, port = listen_address(address)
    server_class: type[_Server] = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, metrics_app(metrics, CoreDnsMetrics(metrics, coredns_url)),
                         server_class=server_class, handler_class=_QuietHandler)  # fmt: skip
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
