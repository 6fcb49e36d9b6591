"""The API source against harness/fakeapiserver.py, for the faults a real kube-apiserver does not produce on
demand: HTTP 5xx answers (retried with a growing backoff) and a 410 as the watch request's HTTP status. The
rest of the API source is tested against the real one in test_api_source.py."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sources.api import ApiConfigMapWatcher
from harness.fakeapiserver import FakeApiServer

NS, NAME = "kube-system", "kube-dns"
STUBS_A = {"stubDomains": '{"acme.local": ["10.0.0.1"]}'}
STUBS_B = {"stubDomains": '{"acme.local": ["10.0.0.2"]}'}
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


def test_an_http_410_on_the_watch_request_lists_again(
    api: FakeApiServer, watcher: ApiConfigMapWatcher, received: Received
) -> None:
    api.set_configmap(NS, NAME, STUBS_A)
    watcher.start()
    assert next_data(received) == STUBS_A
    assert api.wait_for_streams(1)
    api.fail_next = [410]
    api.drop_watches()
    assert api.wait_for_requests(lambda _: len(api.lists()) == 2)
    api.set_configmap(NS, NAME, STUBS_B)
    assert next_data(received) == STUBS_B
    assert received.empty()  # the second list found nothing new: no call


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
