"""The agent-side CPU cost of keeping the networking reconciled while nothing changes (budget: 0.2 % of a
core for the whole agent).

    sudo .venv/bin/python -m bench.reconcile_cost [--seconds 30] [--flavours nft,legacy]

For each iptables flavour, in a sandbox node: the interface and the full rule set (dual-stack, host rules
on) are set up, then the reconcile path runs as the supervisor will run it (watchers plus a 1 s sync tick,
each followed by ``NetworkReconciler.reconcile``) for ``--seconds``, and the CPU time the process and its
children used is read; then the same loop with a reconciler that does nothing, for comparison (the
supervisor's tick costs that anyway). Also measured: one cheap check, one full check (iptables-save per
table and family) and one interface check, and from those the steady cost with the 60 s safety checks.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from harness import sandbox as sb
from harness.sandbox import KUBE_DNS_IP, KUBE_DNS_IP6, LOCAL_IP, LOCAL_IP6

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> tuple[float, float]:
    """(this process incl. its threads, its waited-for children), in CPU seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def _cost(fn: Any, repeat: int) -> float:
    """CPU seconds per call, children included."""
    self0, kids0 = _cpu()
    for _ in range(repeat):
        fn()
    self1, kids1 = _cpu()
    return ((self1 - self0) + (kids1 - kids0)) / repeat


class _Nothing:
    """A reconciler and watchers that do nothing: the tick loop's own cost, for comparison."""

    def note_change(self, source: str) -> None:
        pass

    def reconcile(self) -> list[str]:
        return []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _idle(loop: Any, seconds: float) -> tuple[float, float, float]:
    """Run ``loop`` for ``seconds``; (CPU share, start, wall)."""
    loop.start()
    time.sleep(0.5)
    self0, kids0 = _cpu()
    start = time.monotonic()
    time.sleep(seconds)
    self1, kids1 = _cpu()
    wall = time.monotonic() - start
    loop.stop()
    return ((self1 - self0) + (kids1 - kids0)) / wall, start, wall


def inner(seconds: float, lock: str) -> dict[str, Any]:
    """Runs inside the node namespace."""
    import threading

    from agent.node.interface import Interface
    from agent.node.netwatch import watchers_for
    from agent.node.packetfilter import PacketFilter
    from agent.node.reconcile import NetworkReconciler
    from agent.observe.metrics import Metrics
    from agent.settings import Settings
    from harness.netdriver import ReconcileLoop

    ips = tuple(ipaddress.ip_address(i) for i in (LOCAL_IP, KUBE_DNS_IP, LOCAL_IP6, KUBE_DNS_IP6))
    settings = Settings(local_ips=ips, xtables_lock=Path(lock), sync_interval=1.0)
    metrics = Metrics()
    with Interface(settings.interface_name, ips, metrics) as interface:
        interface.ensure()
        pf = PacketFilter(settings, metrics)
        pf.install(host_rules=True)
        reconciler = NetworkReconciler(interface, pf, metrics)
        reconciler.reconcile()
        cheap = _cost(reconciler.reconcile, 2000)
        full = _cost(lambda: pf.reconcile(force=True), 10)
        iface = _cost(interface.ensure, 50)

        loop = ReconcileLoop(reconciler, None, settings.sync_interval, threading.Lock())
        loop.watchers = watchers_for(
            interface_name=settings.interface_name, nftables=pf.mode == "nft", callback=loop.post
        )
        idle, start, wall = _idle(loop, seconds)
        nothing = _Nothing()
        baseline, _, _ = _idle(
            ReconcileLoop(nothing, nothing, settings.sync_interval, threading.Lock()), seconds
        )
        pf.remove_all()
        interface.remove()
    steady = cheap / settings.sync_interval + (full + iface) / 60.0
    return {
        "mode": pf.mode,
        "cheap_check_us": round(cheap * 1e6, 1),
        "full_check_ms": round(full * 1e3, 2),
        "interface_check_ms": round(iface * 1e3, 2),
        "idle_window_s": round(wall, 1),
        "idle_percent_of_a_core": round(idle * 100, 4),
        "same_loop_doing_nothing_percent": round(baseline * 100, 4),
        "steady_percent_with_60s_checks": round(steady * 100, 4),
        "events_while_idle": [source for t, source in loop.events if start <= t <= start + wall],
        "loop_errors": loop.errors,
        "changes_while_idle": loop.changes,
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.reconcile_cost")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--flavours", default="nft,legacy")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lock", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        print(json.dumps(inner(a.seconds, a.lock)))
        return 0
    ok = True
    for flavour in a.flavours.split(","):
        with sb.sandbox(flavour) as box:  # type: ignore[arg-type]
            argv = [sys.executable, "-m", "bench.reconcile_cost", "--inner", "--seconds", str(a.seconds),
                    "--lock", str(box.workdir / "xtables.lock")]  # fmt: skip
            out = box.exec(box.node, ["env", f"PYTHONPATH={REPO}", *argv], timeout=a.seconds + 60)
            result = json.loads(out.strip().splitlines()[-1])
        ok = ok and not result["loop_errors"] and not result["changes_while_idle"]
        print(f"{flavour:6}", json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
