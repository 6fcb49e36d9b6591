"""The Kubernetes API: a ConfigMap watched (list, then watch); the one-off reads of --print-corefile."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.observe.logs import get_logger
from agent.settings import IPAddress
from agent.sources import SourceError

log = get_logger("sources")


class _GoneError(Exception):
    """410 Gone: the resourceVersion the watch asked for is no longer in the API server's history."""


class _Unset:
    pass


_UNSET = _Unset()


class ApiConfigMapWatcher:
    """Calls ``on_data(data)`` with a ConfigMap's ``data`` whenever it changes, ``on_data(None)`` while it
    does not exist.

    List, then watch from the list's resourceVersion; a watch that ends (server timeout, dropped connection)
    resumes from the last resourceVersion seen; ``410 Gone`` (history compacted) lists again. Errors are
    retried with a doubling backoff from ``backoff_initial`` to ``backoff_max`` seconds. The first call comes
    after the first successful list; a list or watch that shows unchanged data calls nothing.

    Credentials: the in-cluster service account, or ``kubeconfig``."""

    def __init__(
        self,
        namespace: str,
        name: str,
        on_data: Callable[[dict[str, str] | None], None],
        kubeconfig: Path | None = None,
        *,
        watch_timeout: float = 60.0,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.on_data = on_data
        self.kubeconfig = kubeconfig
        # The API server ends a watch after this many seconds; the read timeout is a little longer, so a
        # silent connection (a partition) is noticed within it.
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self._last: dict[str, str] | _Unset | None = _UNSET
        self._thread: threading.Thread | None = None
        self._api_client: Any = None

    @property
    def _what(self) -> str:
        return f"configmap {self.namespace}/{self.name}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch {self._what}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            if self._response is not None:
                self._response.shutdown()  # unblocks the read the watch thread is waiting in
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("configmap_watch_stop_timed_out", configmap=self._what, timeout=timeout)
            self._thread = None
        if self._api_client is not None:
            close_api_client(self._api_client)
            self._api_client = None

    def _run(self) -> None:
        delay = self.backoff_initial
        relisted_for_gone = False
        while not self._stopping.is_set():
            try:
                if self._api_client is None:
                    self._api_client = api_client(self.kubeconfig)
                version = self._list()
                log.info("configmap_listed", configmap=self._what, resource_version=version)
                while not self._stopping.is_set():
                    started = time.monotonic()
                    version, events = self._watch(version)
                    if events:
                        relisted_for_gone = False
                    if events or time.monotonic() - started >= 1.0:
                        delay = self.backoff_initial
                    elif not self._stopping.is_set():
                        # A watch that ends at once without news: do not hammer the API server.
                        self._stopping.wait(delay)
                        delay = min(delay * 2, self.backoff_max)
            except _GoneError as exc:
                log.info("configmap_watch_expired", configmap=self._what, cause=str(exc), action="list again")
                if relisted_for_gone:  # 410 again straight after a list: back off
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                relisted_for_gone = True
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning(
                    "configmap_source_failed", configmap=self._what, error=_describe(exc), retry_in=delay
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max)
        log.info("configmap_watch_stopped", configmap=self._what)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api_client)

    def _list(self) -> str:
        resp = self._core().list_namespaced_config_map(
            self.namespace,
            field_selector=f"metadata.name={self.name}",
            _preload_content=False,
            _request_timeout=self.request_timeout,
        )
        try:
            doc = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = doc.get("items") or []
        self._deliver((items[0].get("data") or {}) if items else None)
        return str(doc["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> tuple[str, int]:
        """One watch from ``version``; returns the last resourceVersion seen and the number of events."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._core().list_namespaced_config_map(
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(self.watch_timeout)),
                _preload_content=False,
                _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _GoneError(exc.reason) from None
            raise
        with self._lock:
            self._response = resp
        events = 0
        try:
            if self._stopping.is_set():
                return version, events
            for line in _lines(resp):
                version = self._on_event(json.loads(line), version)
                events += 1
        except (_GoneError, SourceError):
            raise
        except Exception as exc:  # the connection broke: resume from the last version seen
            if not self._stopping.is_set():
                log.info(
                    "configmap_watch_interrupted",
                    configmap=self._what,
                    cause=_describe(exc),
                    resource_version=version,
                )
        finally:
            with self._lock:
                self._response = None
            # A watch's connection is not reused: closed here (broken or ended by the server's timeout), not
            # handed back to the pool in whatever state the stream left it. One TLS handshake a minute.
            resp.close()
            resp.release_conn()
        return version, events

    def _on_event(self, event: dict[str, Any], version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _GoneError(obj.get("message", "410 Gone"))
            raise SourceError(f"{self._what}: watch error {obj.get('code')}: {obj.get('message')}")
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if kind in ("ADDED", "MODIFIED"):
            self._deliver(obj.get("data") or {})
        elif kind == "DELETED":
            self._deliver(None)
        return new_version

    def _deliver(self, data: dict[str, str] | None) -> None:
        if data == self._last:
            return
        self._last = data
        log.info("configmap_changed", configmap=self._what, exists=data is not None)
        try:
            self.on_data(data)
        except Exception as exc:
            log.error("configmap_change_handler_failed", configmap=self._what, error=repr(exc))


def _lines(resp: Any) -> Iterator[bytes]:
    """The newline-delimited JSON events of a watch response, as they arrive."""
    pending = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def api_client(kubeconfig: Path | None) -> Any:
    """A Kubernetes ApiClient from ``kubeconfig``, or from the pod's service account when it is None."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig is not None else "in-cluster config"
        raise SourceError(f"{where}: {exc}") from None
    return client.ApiClient(configuration)


@contextlib.contextmanager
def _core_api(kubeconfig: Path | None) -> Iterator[Any]:
    from kubernetes import client

    api = api_client(kubeconfig)
    try:
        yield client.CoreV1Api(api)
    finally:
        close_api_client(api)


def close_api_client(api: Any) -> None:
    """The client's thread pool *and* its connections: ``ApiClient.close()`` leaves the keep-alive TLS
    connections in urllib3's pool open until the garbage collector finds them."""
    api.close()
    api.rest_client.pool_manager.clear()


def read_configmap(
    namespace: str, name: str, kubeconfig: Path | None, timeout: float = 10.0
) -> dict[str, str] | None:
    """A ConfigMap's ``data`` read once (``None`` when it does not exist), for ``agent --print-corefile``."""
    from kubernetes.client.exceptions import ApiException

    with _core_api(kubeconfig) as core:
        try:
            resp = core.read_namespaced_config_map(
                name, namespace, _preload_content=False, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise SourceError(f"configmap {namespace}/{name}: {_describe(exc)}") from None
        except Exception as exc:
            raise SourceError(f"configmap {namespace}/{name}: {_describe(exc)}") from None
        try:
            data: dict[str, str] = json.loads(resp.data).get("data") or {}
        finally:
            resp.release_conn()
        return data


def read_service_cluster_ip(
    namespace: str, name: str, kubeconfig: Path | None, timeout: float = 10.0
) -> IPAddress:
    """A Service's clusterIP through the API: the cluster DNS IP when ``<SVC>_SERVICE_HOST`` is not set."""
    what = f"service {namespace}/{name}"
    with _core_api(kubeconfig) as core:
        try:
            resp = core.read_namespaced_service(
                name, namespace, _preload_content=False, _request_timeout=timeout
            )
        except Exception as exc:
            raise SourceError(f"{what}: {_describe(exc)}") from None
        try:
            cluster_ip = (json.loads(resp.data).get("spec") or {}).get("clusterIP") or ""
        finally:
            resp.release_conn()
    try:
        return ipaddress.ip_address(cluster_ip)
    except ValueError:
        raise SourceError(
            f"{what}: clusterIP {cluster_ip!r} is not an IP address (a headless Service?)"
        ) from None
