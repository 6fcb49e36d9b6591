"""The demo: one node in network namespaces, a pod resolving names through it. Cleans up after itself."""

from __future__ import annotations

import sys

from tests import sandbox as sb
from tests.sandbox import KUBE_DNS_IP


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    with sb.sandbox("nft") as box:
        pod = box.pod(0)
        say(f"sandbox {box.run_id}: node, kube-dns, stub and {pod} in their own network namespaces")
        say(f"a pod resolves Services through the kube-dns ClusterIP {KUBE_DNS_IP}")
        for name in ("web.default.svc.cluster.local", "kube-dns.kube-system.svc.cluster.local"):
            print(f"  dig {name:45} -> {box.dig(pod, KUBE_DNS_IP, name)}")
        getent = box.exec(pod, ["getent", "hosts", "web.default"]).strip()
        print(f"  {'getent hosts web.default (glibc)':49} -> {getent}")
        say("the node's conntrack table shows the kube-proxy DNAT to the kube-dns pod")
        print(box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP).strip())
    say("sandbox removed")
    left = sb.leftovers(sb.CREATED_RUNS)
    if left:
        print("left behind:", *left, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
