"""A hand-written Kubernetes API server on loopback, for the faults a real kube-apiserver does not produce on
demand. Everything else about the API source is tested against the real one (harness/controlplane.py).

- A request answered with an HTTP error status (``fail_next``): a 500 or 503 from an overloaded or
  restarting apiserver (the real one answers those only under conditions a test cannot set up cheaply), and a
  410 as the watch request's own HTTP status (the real one sends its 410 as an ``ERROR`` event in a 200
  stream, which the real-server tests cover).

It speaks the wire format of ConfigMap list (``ConfigMapList`` with its ``resourceVersion``) and watch
(chunked newline-delimited ``{"type", "object"}`` events from a ``resourceVersion``, the server-side
``timeoutSeconds``), and can drop its watch connections. Every request is recorded so tests can assert what
the client asked.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from harness.controlplane import write_kubeconfig
from harness.waiting import poll


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    at: float

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


class FakeApiServer:
    def __init__(self) -> None:
        self.version = 1000
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, object)
        self.requests: list[Request] = []
        self.fail_next: list[int] = []  # HTTP statuses for the next requests, in order
        self.streaming = 0  # watch streams past the resourceVersion check, waiting for events
        self._cond = threading.Condition()
        self._drops = 0
        self._stopping = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.block_on_close = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake apiserver", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        self._thread.join(5)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def write_kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.url, "fake-token")

    # Changing the cluster -------------------------------------------------------------------------------
    def set_configmap(self, namespace: str, name: str, data: dict[str, str]) -> int:
        """Create or update."""
        with self._cond:
            self.version += 1
            key = (namespace, name)
            kind = "MODIFIED" if key in self.configmaps else "ADDED"
            obj = {
                "kind": "ConfigMap", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(self.version),
                             "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{namespace}/{name}"))},
                "data": dict(data),
            }  # fmt: skip
            self.configmaps[key] = obj
            self.events.append((self.version, kind, obj))
            self._cond.notify_all()
            return self.version

    def drop_watches(self) -> None:
        """Break every open watch connection (no final chunk), as a restarting API server or a LB would."""
        with self._cond:
            self._drops += 1
            self._cond.notify_all()

    def lists(self) -> list[Request]:
        return [r for r in self.requests if not r.is_watch and r.path.endswith("/configmaps")]

    def wait_for_streams(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` watches are streaming (past their request, waiting for events)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.streaming >= count, timeout)

    def wait_for_requests(self, predicate: Any, timeout: float = 5.0) -> bool:
        return bool(poll(lambda: predicate(self.requests), timeout, every=0.01))


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"
    drops = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api = self.api
        request = Request(url.path, query, time.monotonic())
        with api._cond:
            api.requests.append(request)
            failure = api.fail_next.pop(0) if api.fail_next else None
            self.drops = api._drops  # a drop_watches() from now on ends this request's watch
        self.close_connection = True
        if failure is not None:
            self._json(
                failure, _status(failure, "InternalError" if failure >= 500 else "Expired", "injected")
            )
            return
        parts = url.path.strip("/").split("/")
        if len(parts) < 5 or parts[:3] != ["api", "v1", "namespaces"]:
            self._json(404, _status(404, "NotFound", f"no route {url.path}"))
            return
        namespace, resource, name = parts[3], parts[4], parts[5] if len(parts) > 5 else None
        if resource == "configmaps" and name is None:
            selected = query.get("fieldSelector", "").removeprefix("metadata.name=") or None
            if request.is_watch:
                self._watch(namespace, selected, query)
            else:
                self._list(namespace, selected)
            return
        self._json(404, _status(404, "NotFound", f'{resource} "{name}" not found'))

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _matches(self, namespace: str, name: str | None, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return bool(meta["namespace"] == namespace and (name is None or meta["name"] == name))

    def _list(self, namespace: str, name: str | None) -> None:
        api = self.api
        with api._cond:
            items = [obj for obj in api.configmaps.values() if self._matches(namespace, name, obj)]
            body = {"kind": "ConfigMapList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(api.version)}, "items": items}  # fmt: skip
        self._json(200, body)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, namespace: str, name: str | None, query: dict[str, str]) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client went away
            self._stream(namespace, name, query)

    def _stream(self, namespace: str, name: str | None, query: dict[str, str]) -> None:
        api = self.api
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        with api._cond:
            api.streaming += 1
            api._cond.notify_all()
            try:
                dropped = self._send_events(since, deadline, namespace, name)
            finally:
                api.streaming -= 1
        if dropped:
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)  # abrupt: no final chunk
        else:
            self.wfile.write(b"0\r\n\r\n")

    def _send_events(self, since: int, deadline: float, namespace: str, name: str | None) -> bool:
        """Send the events after ``since`` as they come until the deadline; True if drop_watches() ended it.
        The caller holds the lock."""
        api = self.api
        sent = since
        while not api._stopping:
            if api._drops != self.drops:
                return True
            for version, kind, obj in [e for e in api.events if e[0] > sent]:
                sent = version
                if self._matches(namespace, name, obj):
                    self._chunk({"type": kind, "object": obj})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            api._cond.wait(min(remaining, 0.5))
        return False
