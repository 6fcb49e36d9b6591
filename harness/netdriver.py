"""Drive the agent's networking code inside a sandbox namespace, one JSON request per line.

The code under test works on the *current* network namespace, as the agent does inside the node. So the
integration tests start ``python -m harness.netdriver SETTINGS`` in the node namespace (``NetDriver``) and
call the real objects through it: they keep their state between calls, exactly as in the agent. The
``watch_start`` request runs the reconcile path the way the supervisor will: watcher events and a
sync-interval tick, each followed by ``NetworkReconciler.reconcile``.

On SIGTERM the driver interrupts a packet-filter operation in progress, removes the rules and the
interface and exits 0 (the supervisor's shutdown, reduced to the networking part).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ReconcileLoop:
    """Watcher events and a tick feeding ``reconcile`` from one thread (the supervisor's shape)."""

    reconciler: Any
    watchers: Any
    interval: float
    lock: threading.Lock
    events: list[tuple[float, str]] = field(default_factory=list)
    changes: list[tuple[float, list[str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _queue: queue.Queue[str] = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def post(self, source: str) -> None:
        self.events.append((time.monotonic(), source))
        self._queue.put(source)

    def start(self) -> None:
        self.watchers.start()
        self._thread = threading.Thread(target=self._run, name="reconcile-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put("stop")
        if self._thread is not None:
            self._thread.join(10)
        self.watchers.stop()

    def _run(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self._stop.is_set():
            try:
                source = self._queue.get(timeout=max(0.0, next_tick - time.monotonic()))
                if source == "stop":
                    return
                self.reconciler.note_change(source)
            except queue.Empty:
                next_tick = time.monotonic() + self.interval
            with self.lock:
                try:
                    done = self.reconciler.reconcile()
                except Exception as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
            if done:
                self.changes.append((time.monotonic(), done))


class _TerminateError(Exception):
    pass


class Driver:
    """The server side: holds the agent's objects and answers requests."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from agent.node.interface import Interface
        from agent.observe.metrics import Metrics
        from agent.settings import Settings

        spec = dict(spec)
        spec["local_ips"] = tuple(ipaddress.ip_address(i) for i in spec.get("local_ips", ()))
        if "xtables_lock" in spec:
            spec["xtables_lock"] = Path(spec["xtables_lock"])
        self.settings = Settings(**spec)
        self.metrics = Metrics()
        self.interface = Interface(self.settings.interface_name, self.settings.local_ips, self.metrics)
        self._pf: Any = None
        self.loop: ReconcileLoop | None = None
        self.lock = threading.Lock()
        self.terminating = False
        self.busy = False

    @property
    def pf(self) -> Any:
        from agent.node.packetfilter import PacketFilter

        if self._pf is None:
            self._pf = PacketFilter(self.settings, self.metrics)
        return self._pf

    def on_sigterm(self, signum: int, frame: object) -> None:
        self.terminating = True
        if self._pf is not None:
            self._pf.stop.request("SIGTERM")
        if not self.busy:
            raise _TerminateError  # out of the blocking read of the next request

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        if self._pf is not None:
            self._pf.remove_all(deadline=time.monotonic() + 5)
        self.interface.remove()
        self.interface.close()

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.pop("op")
        self.busy = True
        try:
            with self.lock:
                return getattr(self, f"op_{op}")(**req)
        finally:
            self.busy = False

    def op_ensure(self) -> list[str]:
        return self.interface.ensure()

    def op_check(self) -> list[str]:
        return self.interface.check()

    def op_mode(self) -> str:
        return str(self.pf.mode)

    def op_install(self, host_rules: bool) -> list[str]:
        return list(self.pf.install(host_rules))

    def op_set_host_rules(self, enabled: bool) -> list[str]:
        return list(self.pf.set_host_rules(enabled))

    def op_reconcile(self, force: bool = False) -> list[str]:
        return list(self.pf.reconcile(force=force))

    def op_installed(self) -> bool:
        return bool(self.pf.installed)

    def op_remove_all(self) -> list[str]:
        return list(self.pf.remove_all())

    def op_remove_leftovers(self) -> list[str]:
        from agent.node.teardown import remove_leftover_rules

        return remove_leftover_rules(self.settings, self.metrics)

    def op_metric(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def op_fingerprint(self, family: int) -> str:
        return repr(self.pf.fingerprint(family))

    def op_watch_start(self) -> None:
        from agent.node.netwatch import watchers_for
        from agent.node.reconcile import NetworkReconciler

        reconciler = NetworkReconciler(self.interface, self.pf, self.metrics)
        self.loop = ReconcileLoop(reconciler, None, self.settings.sync_interval, self.lock)
        self.loop.watchers = watchers_for(
            interface_name=self.settings.interface_name,
            nftables=self.pf.mode == "nft",
            callback=self.loop.post,
        )
        self.loop.start()

    def op_watch_report(self) -> dict[str, Any]:
        assert self.loop is not None
        return {"events": self.loop.events, "changes": self.loop.changes, "errors": self.loop.errors}


def serve(spec: dict[str, Any]) -> int:
    # Requests on stdin, answers on the original stdout; everything else printed goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    driver = Driver(spec)
    signal.signal(signal.SIGTERM, driver.on_sigterm)
    with contextlib.suppress(_TerminateError):
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("op") == "exit":
                break
            try:
                answer = {"ok": True, "result": driver.handle(req)}
            except Exception as exc:
                answer = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
            if driver.terminating:
                break
            answers.write(json.dumps(answer) + "\n")
    if driver.terminating:
        driver.shutdown()
    elif driver.loop is not None:
        driver.loop.stop()
    driver.interface.close()
    answers.close()
    return 0


class DriverError(RuntimeError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class NetDriver:
    """The client side, in the test process: ``NetDriver(box, local_ips=[...], iptables_mode=...)``."""

    def __init__(self, box: Any, log: Path, **spec: Any) -> None:
        self.log = log.open("ab")
        self.proc = box.popen(
            box.node,
            [sys.executable, "-m", "harness.netdriver", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            bufsize=0,
        )
        self._buf = b""

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())

    def receive(self, timeout: float = 30) -> Any:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"netdriver gave no answer within {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"netdriver exited {self.proc.poll()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        answer = json.loads(line)
        if not answer["ok"]:
            raise DriverError(answer["type"], answer["error"])
        return answer["result"]

    def call(self, op: str, timeout: float = 30, **args: Any) -> Any:
        self.send(op, **args)
        return self.receive(timeout)

    def metric(self, name: str, **labels: str) -> float:
        return float(self.call("metric", name=name, labels=labels))

    def close(self) -> None:
        """Exit without cleaning up (the rules and the interface stay, as after a crash)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("exit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.log.close()

    def __enter__(self) -> NetDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1])))
