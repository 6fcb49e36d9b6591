"""In the node sandbox: the kubelet swaps ``..data`` of the kube-dns ConfigMap directory to add
``acme.local``, and a pod resolves the stub domain through the node's cache.

The supervisor is not part of this test: the test plays it, the way the agent will -- the directory watcher
posts an event, the main thread re-renders, writes the Corefile if it changed and sends CoreDNS SIGUSR1.
CoreDNS runs in the node namespace, bound to the link-local address on an (empty) bridge, and the pod asks
that address directly (the IPVS-mode setup: no packet-filter rules needed).
"""

from __future__ import annotations

import ipaddress
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.corefile.files import write_if_changed
from agent.corefile.inputs import CorefileBuilder
from agent.corefile.render import HEALTH_PROBE_ANSWER, HEALTH_PROBE_NAME
from agent.settings import Settings
from agent.sources.directory import DirectoryWatcher
from harness import sandbox as sb
from harness.configmapdir import publish
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="nft") as sandbox:
        yield sandbox


def test_a_data_swap_adding_acme_local_makes_it_resolvable_from_a_pod(box: sb.Sandbox) -> None:
    run = ["ip", "-n", box.node]
    sb.run([*run, "link", "add", "nodelocaldns", "type", "bridge"])
    sb.run([*run, "addr", "add", f"{sb.LOCAL_IP}/32", "dev", "nodelocaldns"])
    sb.run([*run, "link", "set", "nodelocaldns", "up"])
    kube_dns = box.workdir / "kube-dns"
    publish(kube_dns, {"upstreamNameservers": "[]"})  # the ConfigMap exists, without stub domains
    settings = Settings(
        local_ips=(ipaddress.ip_address(sb.LOCAL_IP),),
        cluster_dns_ip=ipaddress.ip_address(sb.KUBE_DNS_UPSTREAM_IP),
        base_corefile=REPO / "corefile" / "Corefile.base",
        corefile=box.workdir / "Corefile",
        kubedns_configmap_dir=kube_dns,
        resolv_conf=Path(f"/etc/netns/{box.node}/resolv.conf"),
    )
    builder = CorefileBuilder(settings, environ={})
    assert write_if_changed(settings.corefile, builder.build().text)
    with (box.workdir / "cache.log").open("wb") as log:
        cache = box.popen(box.node, [sb.COREDNS, "-conf", str(settings.corefile)], stdout=log, stderr=log)
    events: queue.Queue[str] = queue.Queue()
    watcher = DirectoryWatcher(kube_dns, lambda: events.put("kube-dns changed"))
    try:
        assert _wait_for_answer(box, box.node, HEALTH_PROBE_NAME, timeout=5) == HEALTH_PROBE_ANSWER
        pod = box.pod(0)
        assert _answer(box, pod, "web.default.svc.cluster.local") == "10.96.10.20"
        assert _answer(box, pod, "www.acme.local") == ""  # kube-dns's "." zone knows no acme.local
        watcher.start()

        swapped_at = time.monotonic()
        publish(
            kube_dns, {"upstreamNameservers": "[]", "stubDomains": f'{{"acme.local": ["{box.stub_ip}"]}}'}
        )
        assert events.get(timeout=5) == "kube-dns changed"
        assert write_if_changed(settings.corefile, builder.build().text)
        cache.send_signal(signal.SIGUSR1)
        answer = _wait_for_answer(box, pod, "www.acme.local", timeout=5)
        took = time.monotonic() - swapped_at

        assert answer == sb.SERVICES.stub["www.acme.local"], (box.workdir / "cache.log").read_text()
        assert _answer(box, pod, "api.acme.local") == sb.SERVICES.stub["api.acme.local"]
        assert _answer(box, pod, "web.default.svc.cluster.local") == "10.96.10.20"
        assert took < 3.0, f"the stub domain answered {took:.2f}s after the swap"
        assert cache.poll() is None  # reloaded in place, not restarted
    finally:
        watcher.stop()
        cache.kill()
        cache.wait(timeout=5)


def _answer(box: sb.Sandbox, ns: str, name: str) -> str:
    """The records the cache answers from ``ns`` ("" when it does not answer)."""
    return box.dig(ns, sb.LOCAL_IP, name, check=False)


def _wait_for_answer(box: sb.Sandbox, ns: str, name: str, timeout: float) -> str:
    return poll(lambda: _answer(box, ns, name), timeout)
