"""Taking over a node node-cache ran on: its leftover rules (ungated NOTRACK on the local addresses) are found
and removed at start and by ``agent --teardown``, in both iptables flavours, and nothing else is touched.

node-cache leaves its rules behind when it is SIGKILLed, OOM-killed, stopped with a 0 s grace period or run
with -skipteardown. Left in place, its ungated PREROUTING NOTRACK rule would keep sending pod queries to the
local address while CoreDNS is dead: the blackhole the agent exists to prevent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from harness import sandbox as sb
from harness.agentproc import REPO, SERVICE, AgentProcess, kill_coredns_under_load, local_answers
from harness.sandbox import KUBE_DNS_IP, KUBE_DNS_IP6, LOCAL_IP, LOCAL_IP6

NODE_CACHE = "NodeLocal DNS Cache"
# Another program's rule in the same chains, close to node-cache's: it must stay.
FOREIGN = ["-t", "raw", "-I", "PREROUTING", "-p", "udp", "-d", "169.254.20.99", "--dport", "53",
           "-j", "NOTRACK", "-m", "comment", "--comment", "NodeLocal DNS Cache: skip conntrack"]  # fmt: skip


@pytest.fixture
def box(flavour: sb.Flavour) -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour=flavour) as sandbox:
        yield sandbox


def node_cache_lines(box: sb.Sandbox, family: int = 4) -> list[str]:
    return [line for line in box.save_rules(family).splitlines() if NODE_CACHE in line]


def test_node_cache_leftovers_are_removed_at_start_and_sigkill_of_coredns_still_fails_over(
    box: sb.Sandbox,
) -> None:
    box.install_node_cache_rules([LOCAL_IP, KUBE_DNS_IP])
    box.exec(box.node, [box.iptables(), *FOREIGN])
    assert len(node_cache_lines(box)) == 2 * 12 + 1
    # With node-cache's rules in place and no cache running, the ClusterIP is a blackhole.
    assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE, check=False) == ""
    with AgentProcess(box) as agent:
        agent.wait_serving()
        assert node_cache_lines(box) == [
            line for line in box.save_rules().splitlines() if "169.254.20.99" in line
        ]
        removed = [e for e in agent.events() if e.get("event") == "node-cache rules removed"]
        assert removed and removed[0]["mode"] == box.flavour and removed[0]["removed"] == 24, removed
        assert "nodelocaldns_agent_node_cache_rules_removed_total 24.0" in agent.metrics()
        assert local_answers(box)
        _, result = kill_coredns_under_load(box, agent, rate=400, duration=5)
        assert int(result["failed"]) <= 5, result  # only what CoreDNS had read; the rest went to kube-dns
        assert float(result["longest_gap"]) < 0.5, result


def test_teardown_removes_node_cache_rules_of_both_families_and_nothing_else(box: sb.Sandbox) -> None:
    box.install_node_cache_rules([LOCAL_IP, KUBE_DNS_IP])
    box.install_node_cache_rules([LOCAL_IP6, KUBE_DNS_IP6])
    box.exec(box.node, [box.iptables(), *FOREIGN])
    before = {family: box.save_rules(family) for family in (4, 6)}
    ips = f"{LOCAL_IP},{KUBE_DNS_IP},{LOCAL_IP6},{KUBE_DNS_IP6}"
    argv = [sys.executable, "-m", "agent", "--teardown", "-localip", ips,
            "-interfacename", "nldtest0", "--xtables-lock", str(box.workdir / "xtables.lock"),
            "--log-format", "json"]  # fmt: skip
    done = subprocess.run(["ip", "netns", "exec", box.node, *argv], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"event": "node-cache rules removed"' in done.stdout, done.stdout
    for family in (4, 6):
        after = box.save_rules(family).splitlines()
        expected = [
            line for line in before[family].splitlines() if NODE_CACHE not in line or "169.254.20.99" in line
        ]
        assert after == expected, family
