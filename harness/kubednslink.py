"""The sandbox's kube-dns link made slow or cut, as if kube-dns ran on another node (or that node were gone).

Both act inside the kube-dns namespace only (its own iptables, never the node's, where the agent's rules
live), on every packet of its link to the node: the ClusterIP path (kube-proxy's DNAT) and the cache's
forwards to kube-dns-upstream alike. IPv4 only: the paths the tests and benchmarks time are IPv4.

- :func:`delayed` holds each packet ``one_way_ms`` on its way in and again on its way out (so a round trip
  gains twice that), with :mod:`harness.linkdelay` on an NFQUEUE: this kernel has no ``tc netem``.
- :func:`unreachable` drops every DNS packet to kube-dns (UDP and TCP port 53): a blackhole, as a partitioned
  node or a dead kube-dns pod behind a stale endpoint looks; nothing answers, nothing is refused.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator

from harness import sandbox as sb
from harness.agentproc import REPO

QUEUE = 7
QUEUE_RULES = (
    ("INPUT", "-i", "eth0"),
    ("OUTPUT", "-o", "eth0"),
)
DROP_RULES = (("udp",), ("tcp",))


def _iptables(box: sb.Sandbox, action: str, chain: str, *spec: str) -> None:
    box.exec(box.kube_dns, [box.iptables(4), "-w", "5", action, chain, *spec])


@contextlib.contextmanager
def delayed(box: sb.Sandbox, one_way_ms: float) -> Iterator[dict[str, object]]:
    """Every packet on the kube-dns link held ``one_way_ms`` in each direction while inside. Yields a dict
    that holds the delayer's own figures (packets delayed, worst lateness) once the block is left."""
    argv = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "harness.linkdelay", "--queue", str(QUEUE),
            "--delay-ms", f"{one_way_ms:g}"]  # fmt: skip
    proc = box.popen(box.kube_dns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    figures: dict[str, object] = {}
    added: list[tuple[str, ...]] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode().strip()
        if first != "ready":
            raise sb.SandboxError(f"linkdelay did not start: {first!r}")
        for chain, direction, dev in QUEUE_RULES:
            spec = (chain, direction, dev, "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass")
            _iptables(box, "-A", *spec)
            added.append(spec)
        yield figures
    finally:
        for spec in added:
            _iptables(box, "-D", *spec)
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        if lines:
            figures.update(json.loads(lines[-1]))


@contextlib.contextmanager
def unreachable(box: sb.Sandbox) -> Iterator[None]:
    """kube-dns gets no DNS packet while inside: queries to it (and the cache's forwards) go unanswered."""
    added: list[tuple[str, ...]] = []
    try:
        for (proto,) in DROP_RULES:
            spec = ("INPUT", "-i", "eth0", "-p", proto, "--dport", "53", "-j", "DROP")
            _iptables(box, "-A", *spec)
            added.append(spec)
        yield
    finally:
        for spec in added:
            _iptables(box, "-D", *spec)
