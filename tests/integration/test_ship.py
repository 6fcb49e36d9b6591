"""What the shipped files promise, run for real: the capabilities they grant are enough for every privileged
step of the agent and each is needed; the ConfigMap's Corefile serves through the real CoreDNS and answers
the DaemonSet's readiness probe."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from harness import sandbox as sb
from harness.agentproc import REPO, http_status
from harness.waiting import poll
from tests.unit.test_manifest import LOCALDNS, run_sed
from tests.unit.test_systemd_unit import UNIT, load_unit

CAPABILITIES = sorted(
    c.removeprefix("CAP_").lower()
    for c in load_unit(UNIT.read_text())["Service"]["CapabilityBoundingSet"][0].split()
)
KUBE_DNS_CLUSTER_IP = sb.KUBE_DNS_IP


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace named like the sandbox's, so the session's leak check covers it."""
    run_id = secrets.token_hex(3)
    sb.CREATED_RUNS.add(run_id)
    ns = f"{sb.PREFIX}-{run_id}-caps"
    sb.run(["ip", "netns", "add", ns])
    try:
        sb.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        yield ns
    finally:
        sb.remove_namespace(ns)


def with_capabilities(ns: str, caps: Sequence[str], argv: Sequence[str]) -> list[str]:
    """``argv`` in ``ns`` as root holding only ``caps``, as in the container and under the unit."""
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    return ["ip", "netns", "exec", ns, "setpriv", "--no-new-privs", f"--bounding-set={bounding}",
            "--inh-caps=-all", "--", *argv]  # fmt: skip


def interface_steps() -> list[list[str]]:
    return [
        ["ip", "link", "add", "nodelocaldns", "type", "bridge"],
        ["ip", "addr", "add", f"{LOCALDNS}/32", "dev", "nodelocaldns"],
        ["ip", "link", "set", "nodelocaldns", "up"],
    ]


def rule_step(iptables: str) -> list[str]:
    return [iptables, "-w", "5", "-t", "raw", "-A", "PREROUTING", "-d", f"{LOCALDNS}/32", "-p", "udp",
            "--dport", "53", "-m", "socket", "-j", "CT", "--notrack"]  # fmt: skip


@contextlib.contextmanager
def coredns_serving(ns: str, caps: Sequence[str], workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """CoreDNS on the local address's port 53 (whoami answers), holding only ``caps``."""
    conf = workdir / "Corefile"
    conf.write_text(f".:53 {{\n    bind {LOCALDNS}\n    whoami\n}}\n")
    with (workdir / "coredns.log").open("wb") as log:
        proc = subprocess.Popen(with_capabilities(ns, caps, [sb.COREDNS, "-conf", str(conf)]), stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def answers(ns: str, server: str, name: str, timeout: float = 5) -> bool:
    """True once ``server`` answers NOERROR. (whoami answers in the additional section, so ``+short`` prints
    nothing; and dig prints its own errors on stdout, so "some output" is no answer.)"""
    dig = ["ip", "netns", "exec", ns, "dig", f"@{server}", name, "+time=1", "+tries=1"]
    return poll(lambda: "status: NOERROR" in sb.run(dig, check=False), timeout, every=0.1)


def test_the_granted_capabilities_are_enough_for_every_privileged_step(netns: str, tmp_path: Path) -> None:
    for step in [*interface_steps(), rule_step("iptables-legacy"), rule_step("iptables-nft")]:
        sb.run(with_capabilities(netns, CAPABILITIES, step))
    assert "-m socket -j CT --notrack" in sb.run(
        ["ip", "netns", "exec", netns, "iptables-legacy-save", "-t", "raw"]
    )
    assert "-m socket -j CT --notrack" in sb.run(
        ["ip", "netns", "exec", netns, "iptables-nft-save", "-t", "raw"]
    )
    with coredns_serving(netns, CAPABILITIES, tmp_path):
        assert answers(netns, LOCALDNS, "whoami.example")


@pytest.mark.parametrize(
    ("missing", "step"),
    [
        ("net_admin", ["ip", "link", "add", "nodelocaldns", "type", "bridge"]),
        ("net_admin", rule_step("iptables-nft")),
        ("net_raw", rule_step("iptables-legacy")),
    ],
)
def test_without_a_granted_capability_a_step_fails(netns: str, missing: str, step: list[str]) -> None:
    fewer = [c for c in CAPABILITIES if c != missing]
    refused = subprocess.run(
        with_capabilities(netns, fewer, step), capture_output=True, timeout=20, check=False
    )
    assert refused.returncode != 0
    subprocess.run(with_capabilities(netns, CAPABILITIES, step), check=True, capture_output=True, timeout=20)


def test_without_net_bind_service_coredns_cannot_serve_port_53(netns: str, tmp_path: Path) -> None:
    for step in interface_steps():
        sb.run(["ip", "netns", "exec", netns, *step])
    fewer = [c for c in CAPABILITIES if c != "net_bind_service"]
    with coredns_serving(netns, fewer, tmp_path) as proc:
        assert proc.wait(timeout=10) != 0
    assert "permission denied" in (tmp_path / "coredns.log").read_text()


def test_the_configmap_corefile_serves_and_answers_ready_on_the_local_address(tmp_path: Path) -> None:
    """The manifest's Corefile after the iptables-mode sed, rendered by the agent with the DaemonSet's args
    (it adds the `ready` the ConfigMap lacks, for manifests that probe /ready), in real CoreDNS."""
    text = run_sed("iptables", tmp_path)
    docs = {d["kind"]: d for d in yaml.safe_load_all(text) if d and d["kind"] in {"ConfigMap", "DaemonSet"}}
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    with sb.Sandbox(flavour="nft") as box:
        base, resolv = box.workdir / "Corefile.base", box.workdir / "resolv.conf"
        base.write_text(docs["ConfigMap"]["data"]["Corefile"])
        resolv.write_text(f"nameserver {box.kube_dns_pod_ip}\n")
        render = [sys.executable, "-m", "agent", "--print-corefile", *container["args"],
                  "-basecorefile", str(base), "--resolv-conf", str(resolv)]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "KUBE_DNS_UPSTREAM_SERVICE_HOST": sb.KUBE_DNS_UPSTREAM_IP,
        }
        corefile = subprocess.run(
            render, capture_output=True, text=True, env=env, check=True, timeout=30
        ).stdout
        (box.workdir / "Corefile.nodelocal").write_text(corefile)
        box.exec(box.node, ["ip", "link", "add", "nodelocaldns", "type", "bridge"])
        for ip in (LOCALDNS, KUBE_DNS_CLUSTER_IP):
            box.exec(box.node, ["ip", "addr", "add", f"{ip}/32", "dev", "nodelocaldns"])
        box.exec(box.node, ["ip", "link", "set", "nodelocaldns", "up"])
        ready_url = f"http://{LOCALDNS}:8181/ready"
        with (box.workdir / "nodelocal.log").open("wb") as log:
            proc = box.popen(box.node, [sb.COREDNS, "-conf", str(box.workdir / "Corefile.nodelocal")],
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            ready = poll(lambda: http_status(box, ready_url) == "200 OK", 10, every=0.1)
            assert ready, (box.workdir / "nodelocal.log").read_text()
            assert http_status(box, f"http://{LOCALDNS}:8080/health") == "200 OK"
            # Cluster names go to kube-dns-upstream over TCP, other names to the upstream servers.
            assert box.dig(box.node, LOCALDNS, "web.default.svc.cluster.local") == "10.96.10.20"
            assert box.dig(box.node, LOCALDNS, "example.org") == "192.0.2.80"
        finally:
            proc.kill()
            proc.wait(timeout=5)
        assert http_status(box, ready_url).startswith("error")
