"""The Kubernetes API source against a real kube-apiserver and etcd (harness/controlplane.py): list then
watch, resume after a dropped watch, bookmarks, list again after 410 Gone from a real etcd compaction, the
Service's clusterIP. What the watcher asked for is read from the apiserver's audit log.

Faults a real apiserver does not produce on demand (HTTP 5xx answers, a 410 as the watch request's HTTP
status) are in test_api_source_faults.py, against harness/fakeapiserver.py."""

from __future__ import annotations

import gc
import ipaddress
import queue
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.cli import main
from agent.sources import SourceError
from agent.sources.api import ApiConfigMapWatcher, read_configmap, read_service_cluster_ip
from harness import controlplane
from harness.controlplane import CLIENT, ControlPlane
from harness.waiting import poll

# These tests end watches every few seconds and cut connections on purpose. Now and then a TLS socket of the
# kubernetes client's urllib3 pool, cut mid-way, is left for the garbage collector, whose ResourceWarning then
# fires in whichever test runs the collection. The agent closes its own connections (sources.close_api_client,
# and a watch's connection is closed when the watch ends); this is about a third-party pool's cut sockets.
pytestmark = [
    pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(autouse=True)
def _collect_cut_sockets() -> Iterator[None]:
    """Collect after each test, so such a socket is collected here and not in another module's test."""
    yield
    gc.collect()


NAME = "kube-dns"
STUBS_A = {"stubDomains": '{"acme.local": ["10.0.0.1"]}'}
STUBS_B = {"stubDomains": '{"acme.local": ["10.0.0.2"]}'}
STUBS_C = {"stubDomains": '{"acme.local": ["10.0.0.3"]}'}
Received = queue.Queue[dict[str, str] | None]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    """An apiserver as clusters run it: watches served from its watch cache, which sends bookmarks."""
    yield from controlplane.started()


@pytest.fixture(scope="module")
def uncached_cluster() -> Iterator[ControlPlane]:
    """An apiserver serving ConfigMap watches straight from etcd: a compacted resourceVersion is 410 Gone."""
    yield from controlplane.started(uncached=["configmaps"])


@pytest.fixture
def ns(cluster: ControlPlane) -> str:
    """A namespace of the test's own: the watched ConfigMap is ``ns/kube-dns``."""
    name = f"t-{secrets.token_hex(4)}"
    cluster.create_namespace(name)
    return name


@pytest.fixture
def received() -> Received:
    return queue.Queue()


class Watching:
    """An ApiConfigMapWatcher in the control plane's namespace, as the CLIENT user, and its requests."""

    def __init__(self, cp: ControlPlane, namespace: str, received: Received, kubeconfig: Path, **kw: Any):
        self.cp = cp
        self.namespace = namespace
        self.received = received
        cp.write_kubeconfig(kubeconfig, cp.client_token, cp.url)
        self.watcher = ApiConfigMapWatcher(
            namespace, NAME, received.put, kubeconfig, backoff_initial=0.05, backoff_max=0.4, **kw
        )

    def start(self) -> None:
        with self.cp.inside():  # the watcher's thread, and its connections, live there
            self.watcher.start()

    def next_data(self) -> dict[str, str] | None:
        return self.received.get(timeout=10)

    def requests(self, verb: str) -> list[dict[str, Any]]:
        """The watcher's completed lists, or its watches that started streaming, in order."""
        stage = "ResponseStarted" if verb == "watch" else "ResponseComplete"
        return [
            e
            for e in self.cp.audit(CLIENT)
            if e["verb"] == verb
            and e["stage"] == stage
            and e.get("objectRef", {}).get("namespace") == self.namespace
        ]

    def wait_for(self, verb: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        found = poll(lambda: len(self.requests(verb)) >= count, timeout)
        assert found, f"{count} {verb} requests not seen within {timeout}s: {self.requests(verb)}"
        return self.requests(verb)

    def start_watching(self) -> None:
        """The ConfigMap holds STUBS_A; the watcher has delivered it and its watch is streaming."""
        self.cp.set_configmap(self.namespace, NAME, STUBS_A)
        self.start()
        assert self.next_data() == STUBS_A
        self.wait_for("watch", 1)


def query(event: dict[str, Any]) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(event["requestURI"]).query).items()}


def listed_version(event: dict[str, Any]) -> str:
    return str(event["responseObject"]["metadata"]["resourceVersion"])


@pytest.fixture
def watching(cluster: ControlPlane, ns: str, received: Received, tmp_path: Path) -> Iterator[Watching]:
    w = Watching(cluster, ns, received, tmp_path / "kubeconfig", watch_timeout=30)
    yield w
    w.watcher.stop()


def test_list_then_watch_delivers_each_change(watching: Watching, cluster: ControlPlane, ns: str) -> None:
    cluster.set_configmap(ns, NAME, STUBS_A)
    cluster.set_configmap(ns, "other", STUBS_C)  # another ConfigMap of the namespace is not ours
    watching.start()
    assert watching.next_data() == STUBS_A
    [watch] = watching.wait_for("watch", 1)
    [listed] = watching.requests("list")
    assert query(listed)["fieldSelector"] == f"metadata.name={NAME}"
    assert query(watch)["fieldSelector"] == f"metadata.name={NAME}"
    assert query(watch)["resourceVersion"] == listed_version(listed)  # from the list on, nothing missed
    cluster.set_configmap(ns, NAME, STUBS_B)
    assert watching.next_data() == STUBS_B
    time.sleep(0.5)
    assert watching.received.empty()  # "other" changed nothing


def test_a_dropped_watch_resumes_from_the_last_resource_version(
    watching: Watching, cluster: ControlPlane, ns: str
) -> None:
    watching.start_watching()
    seen = cluster.set_configmap(ns, NAME, STUBS_B)
    assert watching.next_data() == STUBS_B
    assert cluster.drop_connections()
    watches = watching.wait_for("watch", 2)
    assert query(watches[1])["resourceVersion"] == str(seen)
    assert len(watching.requests("list")) == 1  # resumed, not listed again
    cluster.set_configmap(ns, NAME, STUBS_C)
    assert watching.next_data() == STUBS_C
    assert watching.received.empty()


def test_a_bookmark_moves_the_resume_point(
    cluster: ControlPlane, ns: str, received: Received, tmp_path: Path
) -> None:
    """The apiserver ends each watch after timeoutSeconds and sends a bookmark 2 s before: the next watch
    starts from the bookmark's resourceVersion, past changes the field selector hid, without a list."""
    w = Watching(cluster, ns, received, tmp_path / "kubeconfig", watch_timeout=4)
    try:
        w.start_watching()
        [first] = w.requests("watch")
        assert query(first)["allowWatchBookmarks"] == "true"
        hidden = cluster.set_configmap(ns, "other", STUBS_C)  # not ours: no event, but a newer version

        def resumed_past_hidden() -> bool:
            return any(int(query(e)["resourceVersion"]) >= hidden for e in w.requests("watch")[1:])

        # Within two watch periods (a bookmark sent before this write moves the point only up to it).
        assert poll(resumed_past_hidden, 12), w.requests("watch")
        assert len(w.requests("list")) == 1
        assert received.empty()
    finally:
        w.watcher.stop()


def test_a_watch_from_a_compacted_version_gets_410_and_lists_again(
    uncached_cluster: ControlPlane, received: Received, tmp_path: Path
) -> None:
    """A change the watcher could not see (its watch was cut and its next one held up), then etcd
    compacts its history: the watch from the old resourceVersion gets 410 Gone, the watcher lists again
    and finds the change."""
    cp = uncached_cluster
    namespace = f"t-{secrets.token_hex(4)}"
    cp.create_namespace(namespace)
    w = Watching(cp, namespace, received, tmp_path / "kubeconfig", watch_timeout=30)
    hold = ["INPUT", "-p", "tcp", "-d", controlplane.API_IP, "--dport", str(controlplane.PORT), "--syn",
            "-j", "DROP"]  # fmt: skip
    try:
        w.start_watching()
        [first] = w.requests("watch")
        # New connections wait for a SYN retransmit (1 s); meanwhile the change and the compaction.
        cp.iptables("-I", *hold)
        try:
            assert cp.drop_connections()
            changed = cp.set_configmap(namespace, NAME, STUBS_B)
            # One more write, so the compaction passes the change itself (compacted exactly at the change,
            # etcd can still watch from it but has lost its previous value: the apiserver answers 500).
            cp.set_configmap(namespace, "other", STUBS_C)
            assert cp.compact() > changed
        finally:
            cp.iptables("-D", *hold)
        assert w.next_data() == STUBS_B  # found by listing again
        lists = w.requests("list")
        assert len(lists) == 2
        # Between the two lists, a watch from the compacted version; the apiserver answers it with 410 Gone.
        old = query(first)["resourceVersion"]
        assert any(query(e)["resourceVersion"] == old for e in w.requests("watch")[1:])
        status, body = cp.get(f"/api/v1/namespaces/{namespace}/configmaps?watch=1&resourceVersion={old}")
        assert status == 200 and body["type"] == "ERROR" and body["object"]["code"] == 410, body
        cp.set_configmap(namespace, NAME, STUBS_C)
        assert w.next_data() == STUBS_C
    finally:
        w.watcher.stop()


def test_a_missing_configmap_is_none_until_created_and_again_when_deleted(
    watching: Watching, cluster: ControlPlane, ns: str
) -> None:
    watching.start()
    assert watching.next_data() is None
    cluster.set_configmap(ns, NAME, STUBS_A)
    assert watching.next_data() == STUBS_A
    cluster.delete_configmap(ns, NAME)
    assert watching.next_data() is None


def test_stop_returns_promptly_while_a_watch_is_open(watching: Watching) -> None:
    watching.start_watching()
    started = time.monotonic()
    watching.watcher.stop()
    assert time.monotonic() - started < 1.0


def test_one_shot_reads_of_a_configmap_and_a_service(cluster: ControlPlane, ns: str, tmp_path: Path) -> None:
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig", cluster.client_token, cluster.url)
    with cluster.inside():
        assert read_configmap(ns, NAME, kubeconfig) is None
    cluster.set_configmap(ns, NAME, STUBS_A)
    upstream = cluster.create_service(ns, "kube-dns-upstream")
    cluster.create_service(ns, "headless", "None")
    with cluster.inside():
        assert read_configmap(ns, NAME, kubeconfig) == STUBS_A
        assert read_service_cluster_ip(ns, "kube-dns-upstream", kubeconfig) == ipaddress.ip_address(upstream)
        with pytest.raises(
            SourceError, match=f"service {ns}/headless: clusterIP 'None' is not an IP address"
        ):
            read_service_cluster_ip(ns, "headless", kubeconfig)
        with pytest.raises(SourceError, match=f"service {ns}/missing: HTTP 404"):
            read_service_cluster_ip(ns, "missing", kubeconfig)


def test_a_broken_kubeconfig_is_a_source_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("{}")
    with pytest.raises(SourceError, match=f"^--kubeconfig {broken}: "):
        read_configmap("kube-system", NAME, broken)


def test_print_corefile_reads_the_configmap_through_the_api(
    cluster: ControlPlane,
    ns: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster.set_configmap(ns, NAME, {**STUBS_A, "upstreamNameservers": '["10.0.0.53"]'})
    upstream = cluster.create_service(ns, "kube-dns-upstream")
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig", cluster.client_token, cluster.url)
    monkeypatch.delenv("KUBE_DNS_UPSTREAM_SERVICE_HOST", raising=False)
    template = Path(__file__).resolve().parents[2] / "corefile" / "Corefile.base"
    argv = ["--print-corefile", "-localip", "169.254.20.10", "-basecorefile", str(template),
            "--kubedns-configmap-api", f"{ns}/{NAME}", "-upstreamsvc", "kube-dns-upstream",
            "--kubeconfig", str(kubeconfig)]  # fmt: skip
    with cluster.inside():
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "acme.local:53 {" in out and "forward . 10.0.0.53\n" in out
    assert f"forward . {upstream} {{" in out  # the Service's clusterIP, read through the API
