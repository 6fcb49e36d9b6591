"""The fault matrix: a constant query rate from a pod through the kube-dns ClusterIP while something goes
wrong, for the agent and for the real node-cache, in the same sandbox and the same run. Per run: queries
sent, failed, the longest gap without an answer, and the answers per 100 ms.

What each fault is for node-cache (one process: CoreDNS is compiled in):

- "SIGKILL CoreDNS" kills node-cache; its rules stay behind (no socket match: the ClusterIP and the
  link-local address are a blackhole) until the kubelet restarts the container. The kubelet is a model: a
  new node-cache starts ``kubelet_delay`` seconds after the old one is gone (its own start-up is real).
- "SIGSTOP CoreDNS" stops node-cache; nothing notices within the run (its liveness probe is an httpGet with
  periodSeconds 10 and failureThreshold 3: about 30 s).
- "CoreDNS frozen" is a hang without the kernel's stop notice, as a deadlock looks: the cgroup freezer. The
  agent's CoreDNS is thawed as soon as the agent has taken the node off the local path (a frozen process
  dies of the agent's SIGKILL only once thawed); node-cache stays frozen until the load ends, since nothing
  notices.
- A rolling restart is SIGTERM (node-cache removes its rules and exits), then a new one after the kubelet's
  delay.
- A surge upgrade, measured on the link-local address (where no kube-dns stands behind the cache): the
  agent's new pod starts next to the old one, serves, then the old one gets SIGTERM. node-cache's manifest
  cannot surge (its container ports are host ports, so the scheduler refuses a second pod on the node, and a
  second node-cache would remove the first one's rules at its start), so its upgrade is the rolling restart,
  here measured on the link-local address too.
- A stub-domain change reaches node-cache through its own kube-dns ConfigMap poll and then its Corefile's
  ``reload`` plugin (every 30 s ± 7.5 s); the time until the new domain answers is measured, up to
  ``STUB_WAIT_NODE_CACHE``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.node import KINDS, SERVICE, Kind, Node, Server
from harness import sandbox as sb
from harness.agentproc import AgentProcess, own_files
from harness.freezer import frozen

# The kubelet notices a dead container at its next PLEG relist (every 1 s) and restarts it at once the first
# time (CrashLoopBackOff delays only later restarts: 10 s, doubling to 5 min). Container start-up itself is
# not modelled, which favours the baseline.
KUBELET_RESTART_DELAY = 1.0
# node-cache's stub-domain reload path: the kube-dns ConfigMap poll (kube-dns options ConfigPeriod, 10 s),
# then the reload plugin's check interval (30 s, jitter ±7.5 s). The measured wait is bounded past the worst.
CONFIGMAP_POLL = 10.0
RELOAD_INTERVAL = 30.0
RELOAD_JITTER = 15.0
STUB_WAIT_AGENT = 10.0
STUB_WAIT_NODE_CACHE = 60.0
STUB_NAME = f"www.{sb.STUB_DOMAIN}"
STUB_ANSWER = sb.SERVICES.stub[STUB_NAME]

SCENARIOS = (
    "sigkill_coredns",
    "sigstop_coredns",
    "frozen_coredns",
    "sigkill_agent_and_coredns",
    "rolling_restart",
    "surge_upgrade_link_local",
    "stub_domain_reload",
)
TITLES = {
    "sigkill_coredns": "SIGKILL CoreDNS",
    "sigstop_coredns": "SIGSTOP CoreDNS",
    "frozen_coredns": "CoreDNS frozen (a hang with no stop notice, as a deadlock)",
    "sigkill_agent_and_coredns": "SIGKILL agent and CoreDNS together",
    "rolling_restart": "rolling restart (SIGTERM, then a new agent)",
    "surge_upgrade_link_local": "upgrade, link-local address (ours: surge; node-cache: rolling restart)",
    "stub_domain_reload": "stub-domain reload",
}


@dataclass(frozen=True)
class FailoverPlan:
    rate: float = 1000.0  # queries per second from the pod
    duration: float = 10.0  # seconds of load per run
    fault_at: float = 3.0  # seconds into the load
    kubelet_delay: float = KUBELET_RESTART_DELAY


def stub_reload_model() -> dict[str, float]:
    """node-cache's delay until a new stub domain answers, from its two periodic checks: the ConfigMap
    poll's wait is uniform on [0, 10 s); the reload plugin's interval is fixed per process, uniform on
    30 s ± 7.5 s, and its wait uniform on [0, interval). Mean 5 + 15 s, worst 10 + 37.5 s."""
    jitter = min(RELOAD_JITTER, RELOAD_INTERVAL / 2) / 2
    return {
        "mean_s": CONFIGMAP_POLL / 2 + RELOAD_INTERVAL / 2,
        "max_s": CONFIGMAP_POLL + RELOAD_INTERVAL + jitter,
    }


Fault = Callable[[Node, Kind, Server, FailoverPlan], dict[str, Any]]


def _restart_later(node: Node, kind: Kind, old: Server, plan: FailoverPlan) -> dict[str, Any]:
    """The kubelet's part: once the old process is gone, a new one after ``kubelet_delay``."""
    assert old.proc is not None
    old.proc.wait(timeout=15)
    time.sleep(plan.kubelet_delay)
    node.start_server(kind, wait=False)
    return {"restarted_at": time.monotonic()}


def _coredns(agent: Server, what: str) -> int:
    coredns = agent.coredns_pid()
    if coredns is None:
        raise RuntimeError(f"the agent has no CoreDNS to {what}")
    return coredns


def _hang_detected(agent: Server, since: float) -> dict[str, Any]:
    """Once the agent has called the hang (its status names it: the node off the local path, or with twins
    the hung one in backoff while the other serves)."""
    assert isinstance(agent, AgentProcess)
    agent.wait_for(lambda s: "hung" in str(s.get("detail")), 10.0, "the hang called")
    return {"hang_detected_after_s": round(time.monotonic() - since, 3)}


def _sigkill_coredns(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    if kind == "node_cache":
        return _sigkill_agent_and_coredns(node, kind, agent, plan)
    os.kill(_coredns(agent, "kill"), signal.SIGKILL)
    return {}


def _sigstop_coredns(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    if kind == "node_cache":
        node.kill_agent_and_coredns(agent, signal.SIGSTOP)
        return {}
    coredns = _coredns(agent, "stop")
    stopped = time.monotonic()
    os.kill(coredns, signal.SIGSTOP)
    return _hang_detected(agent, stopped)


def _frozen_coredns(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    with frozen(_coredns(agent, "freeze"), f"{sb.PREFIX}-{node.box.run_id}-freeze"):
        if kind == "node_cache":
            # Nothing notices a frozen node-cache: it stays frozen until the load is over.
            time.sleep(max(0.0, plan.duration - plan.fault_at))
            return {}
        return _hang_detected(agent, time.monotonic())


def _sigkill_agent_and_coredns(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    node.kill_agent_and_coredns(agent, signal.SIGKILL)
    return _restart_later(node, kind, agent, plan)


def _rolling_restart(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    began = time.monotonic()
    agent.stop()
    stopped = {"old_agent_stopped_in_s": round(time.monotonic() - began, 3)}
    return {**stopped, **_restart_later(node, kind, agent, plan)}


def _surge_upgrade(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    if kind == "node_cache":
        return _rolling_restart(node, kind, agent, plan)
    began = time.monotonic()
    # Its own Corefile and pidfile, as each pod has; the agents lock is the sandbox's, shared.
    node.start_agent(kind, extra=own_files(node.box, "surge"))
    serving = time.monotonic()
    agent.stop()
    return {"new_agent_serving_after_s": round(serving - began, 3),
            "old_agent_stopped_in_s": round(time.monotonic() - serving, 3)}  # fmt: skip


def _stub_domain_reload(node: Node, kind: Kind, agent: Server, plan: FailoverPlan) -> dict[str, Any]:
    box = node.box
    changed = time.monotonic()
    agent.write_kubedns({"stubDomains": json.dumps({sb.STUB_DOMAIN: [box.stub_ip]})})
    wait = STUB_WAIT_NODE_CACHE if kind == "node_cache" else STUB_WAIT_AGENT
    deadline = changed + wait
    while time.monotonic() < deadline:
        if box.dig(box.pod(0), sb.KUBE_DNS_IP, STUB_NAME, check=False) == STUB_ANSWER:
            return {"stub_visible_after_s": round(time.monotonic() - changed, 3)}
        time.sleep(0.02 if kind == "ours" else 0.2)
    raise RuntimeError(f"{STUB_NAME} did not answer within {wait:.0f}s of the ConfigMap change ({kind})")


FAULTS: dict[str, Fault] = {
    "sigkill_coredns": _sigkill_coredns,
    "sigstop_coredns": _sigstop_coredns,
    "frozen_coredns": _frozen_coredns,
    "sigkill_agent_and_coredns": _sigkill_agent_and_coredns,
    "rolling_restart": _rolling_restart,
    "surge_upgrade_link_local": _surge_upgrade,
    "stub_domain_reload": _stub_domain_reload,
}
# Where the pod's load goes: the kube-dns ClusterIP unless the scenario says otherwise.
SERVERS = {"surge_upgrade_link_local": sb.LOCAL_IP}


def run_scenario(
    node: Node,
    kind: Kind,
    scenario: str,
    plan: FailoverPlan,
    *,
    server: str | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One run on a reset node: an agent of ``kind`` serving (with ``extra`` flags), the load (to ``server``
    or the scenario's address), the fault at ``plan.fault_at``. The node is reset afterwards, also on
    failure."""
    try:
        agent = node.start_server(kind, extra=extra)
        server = server or SERVERS.get(scenario, sb.KUBE_DNS_IP)
        node.warm(node.box.pod(0), server, [SERVICE])
        load = node.load(rate=plan.rate, duration=plan.duration, server=server)
        start = load.started()
        time.sleep(max(0.0, start + plan.fault_at - time.monotonic()))
        fault = time.monotonic()
        extra = FAULTS[scenario](node, kind, agent, plan)
        result = load.result()
        if "restarted_at" in extra:
            extra["restarted_at_s"] = round(extra.pop("restarted_at") - start, 3)
            node.agents[-1].wait_serving(20.0)  # the restarted agent must recover, or the run is void
        return {
            "sent": result["sent"],
            "answered": result["answered"],
            "failed": result["failed"],
            "longest_gap_s": result["longest_gap"],
            "fault_at_s": round(fault - start, 3),
            "errors": result["errors"],
            "answers_per_100ms": result["answers_per_100ms"],
            **extra,
        }
    finally:
        node.reset()


def run_matrix(node: Node, plan: FailoverPlan, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every scenario for both kinds, ours and the baseline back to back (one run of the matrix)."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in SCENARIOS:
        out[scenario] = {}
        for kind in KINDS:
            r = run_scenario(node, kind, scenario, plan)
            out[scenario][kind] = r
            log(f"  {scenario:26} {kind:10} failed {r['failed']:5}  longest gap {r['longest_gap_s']:.3f}s")
    return out


def plan_dict(plan: FailoverPlan) -> dict[str, Any]:
    return {**asdict(plan), "stub_reload_model": stub_reload_model()}
