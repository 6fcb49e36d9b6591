"""The demo: the real agent on one node of network namespaces, a pod resolving through it, and a failover.

Runs on the embedded defaults (the shipped ``corefile/Corefile.base``), removes everything it created.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from harness import sandbox as sb
from harness.agentproc import SERVICE, AgentProcess, query_path
from harness.configmapdir import publish
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP, STUB_DOMAIN
from harness.waiting import poll


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def path_of_query(box: sb.Sandbox) -> str:
    """Where a pod's query to the ClusterIP went: the node's conntrack table tells."""
    answer, tracked = query_path(box)
    via = "kube-proxy DNAT to kube-dns (conntrack entry)" if tracked else "the local cache (not tracked)"
    return f"{answer or 'no answer':12} via {via}"


def load(box: sb.Sandbox, rate: int, duration: float, out: dict[str, object]) -> threading.Thread:
    argv = [sys.executable, "-m", "harness.dnsload", "--server", KUBE_DNS_IP, "--rate", str(rate),
            "--duration", str(duration), "--names", SERVICE]  # fmt: skip

    def run() -> None:
        out.update(json.loads(box.exec(box.pod(0), argv, timeout=duration + 15)))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def main() -> int:
    with sb.sandbox("nft") as box:
        pod = box.pod(0)
        say(f"sandbox {box.run_id}: node, kube-dns, stub and a pod in network namespaces")
        print(f"  before the agent, a pod's query:   {path_of_query(box)}")

        say(f"the agent starts on the node: -localip {LOCAL_IP},{KUBE_DNS_IP}")
        with AgentProcess(box) as agent:
            t0 = time.monotonic()
            agent.wait_serving()
            print(f"  serving {time.monotonic() - t0:.2f}s after start")
            print(f"  a pod's query to the ClusterIP:    {path_of_query(box)}")
            print(f"  a pod's query to {LOCAL_IP}: {box.dig(pod, LOCAL_IP, SERVICE)}")
            getent = box.exec(pod, ["getent", "hosts", "web.default"]).split()
            print(f"  getent hosts web.default (glibc):  {' '.join(getent)}")

            say("SIGKILL CoreDNS while the pod sends 500 queries/s for 4 s")
            result: dict[str, object] = {}
            thread = load(box, 500, 4, result)
            time.sleep(1.5)
            coredns = agent.coredns_pid()
            assert coredns is not None
            os.kill(coredns, signal.SIGKILL)
            thread.join()
            print(f"  sent {result['sent']}, answered {result['answered']}, failed {result['failed']}, "
                  f"longest gap without answers {float(result['longest_gap']) * 1000:.0f} ms")  # fmt: skip
            agent.wait_serving()
            seen = [
                e for e in agent.events() if e.get("event") == "coredns state" and e.get("to") == "backoff"
            ]
            print(f"  the agent saw: {seen[-1]['cause']}")
            print(f"  back on the local cache:           {path_of_query(box)}")

            say(f"the kube-dns ConfigMap gains the stub domain {STUB_DOMAIN} (a kubelet-style ..data swap)")
            publish(agent.kubedns_dir, {"stubDomains": json.dumps({STUB_DOMAIN: [box.stub_ip]})})
            answer = poll(lambda: box.dig(pod, KUBE_DNS_IP, f"www.{STUB_DOMAIN}", check=False), 5)
            print(f"  www.{STUB_DOMAIN} -> {answer or 'no answer'}")

            say("SIGTERM: the agent hands DNS back to kube-dns and removes what it installed")
            agent.stop()
            ours = [line for line in box.save_rules().splitlines() if "NodeLocal DNS agent" in line]
            print(f"  rules left: {len(ours)}; a pod's query: {path_of_query(box)}")
    say("sandbox removed")
    left = sb.leftovers(sb.CREATED_RUNS)
    if left:
        print("left behind:", *left, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
