"""The Kubernetes API source against a real HTTP server on loopback speaking the ConfigMap list/watch wire
format: list then watch, resume after a dropped watch, list again after 410 Gone, retries with backoff."""

from __future__ import annotations

import ipaddress
import itertools
import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.sources import ApiConfigMapWatcher, SourceError, read_configmap, read_service_cluster_ip
from tests.fakeapiserver import FakeApiServer

NS, NAME = "kube-system", "kube-dns"
STUBS_A = {"stubDomains": '{"acme.local": ["10.0.0.1"]}'}
STUBS_B = {"stubDomains": '{"acme.local": ["10.0.0.2"]}'}
STUBS_C = {"stubDomains": '{"acme.local": ["10.0.0.3"]}'}
Received = queue.Queue[dict[str, str] | None]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.write_kubeconfig(tmp_path / "kubeconfig")
        yield server


@pytest.fixture
def received() -> Received:
    return queue.Queue()


@pytest.fixture
def watcher(api: FakeApiServer, received: Received, tmp_path: Path) -> Iterator[ApiConfigMapWatcher]:
    w = ApiConfigMapWatcher(
        NS,
        NAME,
        received.put,
        tmp_path / "kubeconfig",
        watch_timeout=30,
        backoff_initial=0.05,
        backoff_max=0.4,
    )
    yield w
    w.stop()


def next_data(received: Received) -> dict[str, str] | None:
    return received.get(timeout=5)


def start_watching(api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received) -> None:
    """The ConfigMap holds STUBS_A; the watcher has delivered it and its watch is streaming."""
    api.set_configmap(NS, NAME, STUBS_A)
    watcher.start()
    assert next_data(received) == STUBS_A
    assert api.wait_for_streams(1)  # a streaming watch: its request is in api.watches()


def test_list_then_watch_delivers_each_change(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    listed_at = api.set_configmap(NS, NAME, STUBS_A)
    api.set_configmap(NS, "other", STUBS_C)  # another ConfigMap of the namespace is not ours
    watcher.start()
    assert next_data(received) == STUBS_A
    assert api.wait_for_requests(lambda _: api.watches())
    first = api.requests[0]
    assert not first.is_watch and first.query["fieldSelector"] == f"metadata.name={NAME}"
    assert api.watches()[0].query["resourceVersion"] == str(listed_at + 1)
    api.set_configmap(NS, NAME, STUBS_B)
    assert next_data(received) == STUBS_B
    assert received.empty()


def test_a_dropped_watch_resumes_from_the_last_resource_version(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    start_watching(api, watcher, received)
    seen = api.set_configmap(NS, NAME, STUBS_B)
    assert next_data(received) == STUBS_B
    api.drop_watches()
    assert api.wait_for_requests(lambda _: len(api.watches()) == 2)
    assert api.watches()[1].query["resourceVersion"] == str(seen)
    assert len(api.lists()) == 1  # resumed, not listed again
    api.set_configmap(NS, NAME, STUBS_C)
    assert next_data(received) == STUBS_C
    assert received.empty()


def test_a_watch_from_a_compacted_version_gets_410_and_lists_again(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    start_watching(api, watcher, received)
    api.set_configmap(NS, NAME, STUBS_B, emit=False)  # a change whose event the watcher never saw
    api.compact()
    api.drop_watches()
    assert next_data(received) == STUBS_B  # found by listing again
    assert len(api.lists()) == 2
    api.set_configmap(NS, NAME, STUBS_C)
    assert next_data(received) == STUBS_C


def test_an_http_410_on_the_watch_request_lists_again(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    start_watching(api, watcher, received)
    api.fail_next = [410]
    api.drop_watches()
    assert api.wait_for_requests(lambda _: len(api.lists()) == 2)
    api.set_configmap(NS, NAME, STUBS_B)
    assert next_data(received) == STUBS_B
    assert received.empty()  # the second list found nothing new: no call


def test_a_bookmark_moves_the_resume_point(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    start_watching(api, watcher, received)
    assert api.watches()[0].query["allowWatchBookmarks"].lower() == "true"
    mark = api.bookmark()
    api.compact()  # history before the bookmark is gone, but the watcher resumes from the bookmark
    assert api.wait_for_requests(lambda _: mark in api.sent)
    api.drop_watches()
    assert api.wait_for_requests(lambda _: len(api.watches()) == 2)
    assert api.watches()[1].query["resourceVersion"] == str(mark)
    assert len(api.lists()) == 1
    assert received.empty()


def test_a_missing_configmap_is_none_until_created_and_again_when_deleted(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    watcher.start()
    assert next_data(received) is None
    api.set_configmap(NS, NAME, STUBS_A)
    assert next_data(received) == STUBS_A
    api.delete_configmap(NS, NAME)
    assert next_data(received) is None


def test_server_errors_are_retried_with_a_growing_backoff(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    api.set_configmap(NS, NAME, STUBS_A)
    api.fail_next = [500, 503, 500]
    watcher.start()
    assert next_data(received) == STUBS_A
    times = [r.at for r in api.lists()]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.04 and gaps[2] > gaps[0] * 2  # 0.05, 0.1, 0.2 s


def test_stop_returns_promptly_while_a_watch_is_open(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    import time

    start_watching(api, watcher, received)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0


def test_one_shot_reads_of_a_configmap_and_a_service(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    assert read_configmap(NS, NAME, kubeconfig) is None
    api.set_configmap(NS, NAME, STUBS_A)
    assert read_configmap(NS, NAME, kubeconfig) == STUBS_A
    api.set_service(NS, "kube-dns-upstream", "10.96.0.11")
    assert read_service_cluster_ip(NS, "kube-dns-upstream", kubeconfig) == ipaddress.ip_address("10.96.0.11")
    api.set_service(NS, "headless", "None")
    with pytest.raises(
        SourceError, match="service kube-system/headless: clusterIP 'None' is not an IP address"
    ):
        read_service_cluster_ip(NS, "headless", kubeconfig)
    with pytest.raises(SourceError, match="service kube-system/missing: HTTP 404"):
        read_service_cluster_ip(NS, "missing", kubeconfig)


def test_a_broken_kubeconfig_is_a_source_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("{}")
    with pytest.raises(SourceError, match=f"^--kubeconfig {broken}: "):
        read_configmap(NS, NAME, broken)


def test_print_corefile_reads_the_configmap_through_the_api(
    api: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api.set_configmap(NS, NAME, {**STUBS_A, "upstreamNameservers": '["10.0.0.53"]'})
    api.set_service(NS, "kube-dns-upstream", "10.96.0.11")
    monkeypatch.delenv("KUBE_DNS_UPSTREAM_SERVICE_HOST", raising=False)
    template = Path(__file__).resolve().parents[2] / "corefile" / "Corefile.base"
    argv = ["--print-corefile", "-localip", "169.254.20.10", "-basecorefile", str(template),
            "--kubedns-configmap-api", f"{NS}/{NAME}", "-upstreamsvc", "kube-dns-upstream",
            "--kubeconfig", str(tmp_path / "kubeconfig")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "acme.local:53 {" in out and "forward . 10.0.0.53\n" in out
    assert "forward . 10.96.0.11 {" in out  # the Service's clusterIP, read through the API
