"""Two agents on one node, as a surge upgrade runs them: the new one starts next to the serving one, its
CoreDNS binds the same sockets, the old one is stopped once the new one serves. Neither removes what the
other relies on, and pods lose no query (at most what the old CoreDNS's socket had queued as it closed), on
the ClusterIP and on the link-local address alike.

Each agent has its own Corefile and pidfile, as each container has in the DaemonSet; they share the agents
lock, as both containers share its hostPath.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness import sandbox as sb
from harness.agentproc import (
    AgentProcess,
    Load,
    http_status,
    interface_exists,
    local_answers,
    our_rules,
    own_files,
)
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP

RATE, DURATION = 1000, 9.0


def slow_coredns(box: sb.Sandbox) -> list[str]:
    """A CoreDNS that binds two seconds late, as under load: the old one answers every probe meanwhile."""
    wrapper = box.workdir / "slow-coredns"
    wrapper.write_text(f'#!/bin/sh\nsleep 2\nexec {sb.COREDNS} "$@"\n')
    wrapper.chmod(0o755)
    return ["--coredns-binary", str(wrapper)]


def dns_listeners(box: sb.Sandbox, ip: str) -> int:
    """UDP sockets bound on ``ip``:53 in the node namespace (each CoreDNS has one)."""
    out = box.exec(box.node, ["ss", "-H", "-u", "-l", "-n", "src", f"{ip}:53"])
    return len(out.splitlines())


def event_names(agent: AgentProcess) -> list[str]:
    return [str(e.get("event")) for e in agent.events()]


@pytest.mark.parametrize("server", [KUBE_DNS_IP, LOCAL_IP], ids=["clusterip", "link-local"])
def test_a_surge_upgrade_hands_the_node_over_without_losing_a_query(
    node_sandbox: sb.Sandbox, server: str
) -> None:
    box = node_sandbox
    with AgentProcess(box, name="old") as old:
        old.wait_serving()
        installed = our_rules(box)
        load, began = Load(box, rate=RATE, duration=DURATION, server=server), time.monotonic()
        time.sleep(1.0)
        with AgentProcess(box, name="new", extra=own_files(box, "new") + slow_coredns(box)) as new:
            new.wait_serving()
            # Serving means its own CoreDNS listens, not only that the old one answered its probes.
            assert dns_listeners(box, LOCAL_IP) == 2 and dns_listeners(box, KUBE_DNS_IP) == 2
            assert our_rules(box) == installed  # the new agent's start removed none of the old one's rules
            stopping = time.monotonic() - began
            assert old.stop() == 0
            stopped = time.monotonic() - began
            assert "leaving the node to another agent" in event_names(old), old.tail()
            assert "joining another agent on this node" in event_names(new), new.tail()
            result = load.result()
            assert result["sent"] == RATE * DURATION, result
            when = f"failed at {result['failure_times']} s, old stopped in [{stopping:.2f}, {stopped:.2f}] s"
            # Usually none. Each CoreDNS socket has its own queue (SO_REUSEPORT): what the old one had queued
            # but not read when it closed is lost, a query now and then at 1000 qps.
            assert result["failed"] <= 2, when
            assert new.status()["serving"] is True
            assert our_rules(box) == installed and interface_exists(box)
            assert local_answers(box)
            assert new.stop() == 0  # the last agent out
        assert our_rules(box) == [] and not interface_exists(box)


def test_a_new_agent_that_crashes_at_start_leaves_the_serving_one_untouched(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    with AgentProcess(box, name="old") as old:
        old.wait_serving()
        installed = our_rules(box)
        load = Load(box, rate=RATE, duration=6.0, server=LOCAL_IP)
        time.sleep(1.0)
        with AgentProcess(box, name="new", extra=own_files(box, "new")) as new:
            new.wait_for(lambda s: s.get("state") in ("starting", "running"), 20, "starting")
            coredns = new.coredns_pid()
            new.kill()  # SIGKILL of the new pod's agent, as a crash at start
            if coredns is not None:
                os.kill(coredns, signal.SIGKILL)  # and its CoreDNS with it, as the whole pod dies
        # A new agent again, stopped in order this time: it is not the last, so it leaves the node as it was.
        with AgentProcess(box, name="next", extra=own_files(box, "next")) as retry:
            retry.wait_serving()
            assert retry.stop() == 0
        result = load.result()
        assert result["failed"] <= 5, result  # at most what the killed CoreDNS had read (SO_REUSEPORT share)
        assert our_rules(box) == installed and interface_exists(box)
        assert old.status()["serving"] is True and local_answers(box)
        assert old.stop() == 0
    assert our_rules(box) == [] and not interface_exists(box)


def test_a_new_agent_whose_coredns_never_serves_is_not_ready_though_the_shared_ready_port_answers(
    node_sandbox: sb.Sandbox,
) -> None:
    """A broken new version next to a serving agent: CoreDNS's /ready on the shared port is answered by the
    old CoreDNS, so only ``agent --ready`` (this pod's own status) keeps the rollout from moving on."""
    box = node_sandbox
    broken = box.workdir / "broken-coredns"
    broken.write_text("#!/bin/sh\necho 'plugin/forward: not a valid option' >&2\nexit 1\n")
    broken.chmod(0o755)
    with AgentProcess(box, name="old") as old:
        old.wait_serving()
        installed = our_rules(box)
        with AgentProcess(
            box, name="new", extra=[*own_files(box, "new"), "--coredns-binary", str(broken)]
        ) as new:
            new.wait_for(lambda s: s.get("state") == "backoff", 20, "its CoreDNS failing")
            assert http_status(box, f"http://{LOCAL_IP}:8181/ready").startswith("200")  # the old one answers
            ready = [sys.executable, "-m", "agent", "--ready", "--status-file", str(new.status_file)]
            unready = subprocess.run(ready, capture_output=True, text=True, check=False)
            assert unready.returncode == 1 and "not serving" in unready.stderr, unready
            old_ready = [sys.executable, "-m", "agent", "--ready", "--status-file", str(old.status_file)]
            assert subprocess.run(old_ready, capture_output=True, check=False).returncode == 0
            assert new.stop() == 0  # the rollout undone: the broken pod goes, the node stays as it was
        assert our_rules(box) == installed and interface_exists(box)
        assert old.status()["serving"] is True and local_answers(box)
        assert old.stop() == 0
    assert our_rules(box) == [] and not interface_exists(box)
