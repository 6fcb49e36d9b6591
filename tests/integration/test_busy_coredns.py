"""A CoreDNS that is merely busy is never taken for a hung one: a burst of names nobody asked before, against
a kube-dns that answers slowly, fills CoreDNS's queues and slows its answers, but the agent must not kill or
restart it; a CoreDNS that is silent and idle (frozen, as a deadlock looks) is still killed as hung."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator

import pytest

from harness import dnsperf, kubednslink
from harness import sandbox as sb
from harness.agentproc import AgentProcess, Load
from harness.freezer import FREEZER, frozen

BURST_QPS = 10_000
# Long enough to matter: before the probe was resent within its round, CoreDNS's receive queue for the
# ClusterIP overflowed for the whole burst, about half the probe rounds found it "silent", and three in a row
# got the serving CoreDNS killed as hung, several seconds into the burst.
BURST_SECONDS = 10.0
# kube-dns "slow": every packet on its link held 100 ms each way, so each forwarded query waits 200 ms more
# (and a new TCP connection to kube-dns-upstream another 200 ms for its handshake).
ONE_WAY_MS = 100.0
_FAILED_ROUNDS = re.compile(r'^nodelocaldns_agent_probe_failures_total\{kind="dns"\} (\S+)$', re.M)
_RESTARTS = re.compile(r"^nodelocaldns_agent_coredns_restarts_total\{[^}]*\} (\S+)$", re.M)


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="nft") as sandbox:
        yield sandbox


def uncached_names(count: int) -> str:
    """dnsperf's data file: names nobody asked before, half in the cluster zone (forwarded over TCP to
    kube-dns-upstream), half outside it (forwarded over UDP to the node's upstream, the kube-dns pod)."""
    return dnsperf.data_file(
        (f"burst-{i}.default.svc.cluster.local" if i % 2 else f"burst-{i}.example.org", "A")
        for i in range(count)
    )


def test_a_10000_qps_burst_of_uncached_names_against_a_slow_kube_dns_kills_no_coredns(
    box: sb.Sandbox,
) -> None:
    names = box.workdir / "burst-names.txt"
    names.write_text(uncached_names(int(BURST_QPS * BURST_SECONDS)))
    with AgentProcess(box) as agent:
        agent.wait_serving()
        coredns = agent.coredns_pid()
        with kubednslink.delayed(box, ONE_WAY_MS) as link:
            started = time.monotonic()
            # Enough queries in flight for the rate (dnsperf's default, 100, would hold it to 500 qps).
            argv = [*dnsperf.argv(sb.KUBE_DNS_IP, str(names), seconds=BURST_SECONDS, max_qps=BURST_QPS,
                                  timeout=2.0), "-c", "4", "-q", "40000"]  # fmt: skip
            burst = dnsperf.parse(box.exec(box.pod(0), argv, timeout=BURST_SECONDS + 30))
            took = time.monotonic() - started
            # The prober keeps asking through the aftermath: queued forwards still draining.
            time.sleep(2.0)
        metrics, events = agent.metrics(), agent.events()
        restarts = [float(v) for v in _RESTARTS.findall(metrics)]
        failed_rounds = _FAILED_ROUNDS.findall(metrics)
        failed_probes = [e for e in events if e.get("event") == "coredns probe failed"]
        busy = [e for e in events if e.get("event") == "coredns busy, not hung"]
        summary = (
            f"burst: {burst.sent} sent in {took:.1f}s, {burst.completed} answered, {burst.lost} lost, "
            f"{burst.qps:.0f} qps; link: {link}; failed probe rounds {failed_rounds} in "
            f"{len(failed_probes)} streaks, {len(busy)} found busy"
        )
        print(summary)
        # The burst really was one: nearly every query sent at the asked rate.
        assert burst.sent >= 0.9 * BURST_QPS * BURST_SECONDS, summary
        assert link.get("delayed", 0) > burst.sent / 2, summary  # the slow link carried the forwards
        # ...and CoreDNS lived through it: the same process, no restart counted, no state change logged.
        assert agent.coredns_pid() == coredns, agent.tail()
        assert sum(restarts) == 0, agent.tail()
        changes = [e for e in events if e.get("event") == "coredns state" and e.get("from") == "running"]
        assert not changes, changes
        assert agent.status().get("serving") is True, agent.tail()


@pytest.mark.skipif(not FREEZER.is_dir(), reason="needs the cgroup v1 freezer")
def test_a_coredns_frozen_and_idle_is_caught_as_hung_within_its_first_silent_probe_round(
    box: sb.Sandbox,
) -> None:
    with AgentProcess(box) as agent:
        agent.wait_serving()
        coredns = agent.coredns_pid()
        assert coredns is not None
        with frozen(coredns, f"{sb.PREFIX}-{box.run_id}-freeze"):
            since = time.monotonic()
            agent.wait_for(lambda s: s.get("state") == "backoff", 4.0, "backoff after a hang")
            detected = time.monotonic() - since
        agent.wait_serving()
        causes = [str(e.get("cause", "")) for e in agent.events() if e.get("event") == "coredns state"]
        # Confirmed by the kernel within the first silent round (its sockets hold unread datagrams, no thread
        # runs), not after three: at most one probe interval (0.5 s) plus two resends (0.2 s), and a margin.
        assert any(c.startswith("hung: no answer from") and "read none of the" in c for c in causes), causes
        assert detected < 1.2, detected
        assert agent.coredns_pid() not in (None, coredns)


@pytest.mark.skipif(not FREEZER.is_dir(), reason="needs the cgroup v1 freezer")
def test_a_coredns_frozen_under_load_is_killed_within_0_3_s_wherever_the_freeze_falls(
    box: sb.Sandbox,
) -> None:
    """Pods' queries wait in a frozen CoreDNS's sockets: the prober sees them between its rounds (every
    0.1 s) and confirms the hang at once, rather than at its next round (every 0.5 s). Frozen three times, at
    random points between rounds, under 1000 qps on the ClusterIP."""
    rng = random.Random(7)
    with AgentProcess(box) as agent:
        agent.wait_serving()
        load = Load(box, rate=1000, duration=12.0, server=sb.KUBE_DNS_IP)
        took = []
        for attempt in range(3):
            time.sleep(1.0 + rng.uniform(0, 0.5))
            coredns = agent.coredns_pid()
            assert coredns is not None
            with frozen(coredns, f"{sb.PREFIX}-{box.run_id}-freeze{attempt}"):
                since = time.monotonic()
                agent.wait_for(lambda s: s.get("state") == "backoff", 3.0, "backoff after a hang")
                took.append(time.monotonic() - since)
            agent.wait_serving()
        result = load.result()
        causes = [str(e.get("cause", "")) for e in agent.events() if e.get("event") == "coredns state"]
    assert sum(c.startswith("hung:") and "read none of the" in c for c in causes) == 3, causes
    # The status file is read every 0.05 s: the kill itself came up to that much sooner.
    print(f"frozen under load: backoff after {[round(t, 3) for t in took]} s")
    assert max(took) < 0.35, took
    assert result["sent"] == 12000, result
