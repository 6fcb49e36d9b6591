"""node-cache's flags that belong to CoreDNS, and the next release's, through the real agent's command
line: ``-version`` and ``-plugins`` print what CoreDNS prints; ``-dns.port`` reaches CoreDNS (zones written
without a port follow it); ``-quiet`` drops CoreDNS's banner; ``-prometheus-listen-address`` fills the
template's ``__PROMETHEUS__ENDPOINT__``."""

from __future__ import annotations

import os
import subprocess
import sys

from harness import sandbox as sb
from harness.agentproc import REPO, SERVICE, SERVICE_IP, AgentProcess

# A template whose zones name no port, as CoreDNS allows: they follow -dns.port.
PORTLESS_TEMPLATE = """\
__PILLAR__DNS__DOMAIN__ {
    errors
    bind __PILLAR__LOCAL__DNS__
    forward . __PILLAR__CLUSTER__DNS__ {
        force_tcp
    }
    prometheus __PROMETHEUS__ENDPOINT__
}
. {
    errors
    bind __PILLAR__LOCAL__DNS__
    forward . __PILLAR__UPSTREAM__SERVERS__
}
"""


def agent_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", *argv, "--coredns-binary", sb.COREDNS], env=env,
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def test_version_and_plugins_print_what_coredns_prints_and_exit_0() -> None:
    coredns_version = subprocess.run(
        [sb.COREDNS, "-version"], capture_output=True, text=True, check=True
    ).stdout
    for spelling in ("-version", "--version"):
        out = agent_cli(spelling)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(coredns_version) and out.stdout.startswith("CoreDNS-")
        assert out.stdout.splitlines()[-1].startswith("node-local-dns-agent ")
    plugins = agent_cli("-plugins")
    assert plugins.returncode == 0
    listed = subprocess.run([sb.COREDNS, "-plugins"], capture_output=True, text=True, check=True).stdout
    assert plugins.stdout == listed and "\nforward\n" in listed


def test_dns_port_quiet_and_prometheus_endpoint_reach_coredns() -> None:
    with sb.Sandbox(flavour="nft") as box:
        dns_port_quiet_and_prometheus_endpoint(box)


def dns_port_quiet_and_prometheus_endpoint(box: sb.Sandbox) -> None:
    template = box.workdir / "Corefile.portless"
    template.write_text(PORTLESS_TEMPLATE)
    extra = ["-basecorefile", str(template), "-dns.port", "5353", "-quiet",
             "-prometheus-listen-address", "127.0.0.1:9263"]  # fmt: skip
    with AgentProcess(box, extra=extra) as agent:
        agent.wait_serving()
        assert box.dig(box.pod(0), sb.LOCAL_IP, SERVICE, port=5353) == SERVICE_IP
        assert box.dig(box.pod(0), sb.LOCAL_IP, "www.example.org", port=5353) == "192.0.2.81"
        assert box.dig(box.node, sb.LOCAL_IP, SERVICE, check=False) == ""  # nothing on 53
        rendered = (box.workdir / "Corefile").read_text()
        assert "prometheus 127.0.0.1:9263\n" in rendered and "__PROMETHEUS__" not in rendered
        assert "coredns_build_info" in box.http_get(box.node, "http://127.0.0.1:9263/metrics")
        log = agent.log_path.read_text()
        assert "CoreDNS-" not in log, log  # -quiet: no banner
