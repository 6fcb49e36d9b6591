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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

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
        # The standard library's client (prometheus_client loads it anyway): a loopback GET needs no more, and
        # ``requests`` would add its own modules to every agent's memory. No proxy: the address is local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(self) -> bytes:
        url = self.url()
        if url is None:
            return self._failed("no prometheus listener in the Corefile")
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as exc:
            return self._failed(f"{url} answered {exc.code}")
        except (OSError, ValueError) as exc:  # URLError is an OSError; a malformed URL a ValueError
            return self._failed(f"{type(exc).__name__}: {exc}")
        self.metrics.coredns_metrics_up.set(1)
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


class MetricsEndpoint:
    """The metrics listener, kept trying: when its port is taken (node-cache's, during a migration surge,
    which does not share it), the agent serves DNS without it and binds again every ``retry`` seconds until
    the port is free. The retrying thread owns the listener until :meth:`close`."""

    def __init__(self, address: str, metrics: Metrics, coredns_url: Callable[[], str | None],
                 retry: float = 5.0) -> None:  # fmt: skip
        self.address, self.retry = address, retry
        self._metrics, self._coredns_url = metrics, coredns_url
        self._server: WSGIServer | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        if not self._bind(first=True):
            threading.Thread(target=self._keep_trying, name="metrics-bind", daemon=True).start()

    def _bind(self, *, first: bool) -> bool:
        try:
            server = serve_metrics(self.address, self._metrics, self._coredns_url)
        except OSError as exc:
            if first:  # DNS matters more than metrics: report once and run on without them
                log.error("metrics not served", address=self.address, error=str(exc),
                          cause=f"cannot listen; tried again every {self.retry:g}s")  # fmt: skip
            return False
        with self._lock:
            if self._closed.is_set():
                _close(server)
                return True
            self._server = server
        if not first:
            log.info("metrics served", address=self.address, cause="the port is free again")
        return True

    def _keep_trying(self) -> None:
        while not self._closed.wait(self.retry):
            if self._bind(first=False):
                return

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            server, self._server = self._server, None
        if server is not None:
            _close(server)


def _close(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()


def serve_metrics(address: str, metrics: Metrics, coredns_url: Callable[[], str | None]) -> WSGIServer:
    """Start the endpoint in a thread; raises OSError when it cannot listen."""
    family, host, port = listen_address(address)
    server_class: type[_Server] = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, metrics_app(metrics, CoreDnsMetrics(metrics, coredns_url)),
                         server_class=server_class, handler_class=_QuietHandler)  # fmt: skip
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
