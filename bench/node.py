"""One node under benchmark: the sandbox, the agents started in it, background loads, and the reset that
gives every scenario the same starting point.

Two kinds of server run here. ``ours`` is the agent as shipped, supervising CoreDNS. ``node_cache`` is the
real node-cache 1.26.7 (:mod:`harness.nodecache`), started as the upstream DaemonSet starts it, in the same
sandbox and the same run: one process with CoreDNS compiled in, its own rules, its own teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from harness import nodecache
from harness import sandbox as sb
from harness.agentproc import REPO, AgentProcess
from harness.configmapdir import publish

Kind = Literal["ours", "node_cache"]
KINDS: tuple[Kind, ...] = ("ours", "node_cache")
LABELS: dict[Kind, str] = {"ours": "agent", "node_cache": f"node-cache {nodecache.NODE_CACHE_VERSION}"}
SERVICE = "web.default.svc.cluster.local"
SERVICE_IP = "10.96.10.20"
LOCAL_IPS = (sb.LOCAL_IP, sb.KUBE_DNS_IP)
# Every rule the agent writes carries this tag (agent/node/rules.py).
RULE_TAG = "NodeLocal DNS agent"


# The original direction's packet counter of a flow in ``conntrack -L`` (the first ``packets=`` on the line).
_ORIGINAL_PACKETS = re.compile(r"\bdport=53 packets=(\d+)")


class BenchError(RuntimeError):
    """A benchmark step did not do what it must (the node did not reset, a load printed nothing…)."""


class Server(Protocol):
    """What the scenarios ask of a node's DNS server, the agent or node-cache."""

    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...
    def agent_pid(self) -> int: ...
    def coredns_pid(self) -> int | None: ...
    def coredns_pids(self) -> list[int]: ...
    def wait_serving(self, timeout: float = 20.0) -> None: ...
    def stop(self, timeout: float = 15.0) -> int: ...
    def kill(self) -> None: ...
    def write_kubedns(self, data: dict[str, str]) -> None: ...


class NodeCacheServer:
    """The real node-cache behind the :class:`Server` interface. It is one process: CoreDNS is compiled in, so
    its "CoreDNS" is node-cache itself, and a signal to either is a signal to both."""

    def __init__(self, box: sb.Sandbox) -> None:
        self.box = box
        self.handle: nodecache.NodeCache | None = None

    def start(
        self, *, wait: bool, timeout: float, binary: str | None = None, cgroup: Path | None = None
    ) -> None:
        self.handle = nodecache.start(self.box, wait=wait, timeout=timeout, binary=binary, cgroup=cgroup)

    def _started(self) -> nodecache.NodeCache:
        if self.handle is None:
            raise BenchError("node-cache was not started")
        return self.handle

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.handle is None else self.handle.process

    def agent_pid(self) -> int:
        return self._started().pid

    def coredns_pid(self) -> int | None:
        handle = self._started()
        return handle.pid if handle.process.poll() is None else None

    def coredns_pids(self) -> list[int]:
        pid = self.coredns_pid()
        return [] if pid is None else [pid]

    def wait_serving(self, timeout: float = 20.0) -> None:
        self._started().wait_ready(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        return self._started().stop(timeout) if self.handle is not None else 0

    def kill(self) -> None:
        if self.handle is not None and self.handle.process.poll() is None:
            self.handle.kill()

    def write_kubedns(self, data: dict[str, str]) -> None:
        """node-cache's ``-kubednscm`` directory, updated the way the kubelet does (a ``..data`` swap)."""
        publish(self._started().workdir / "kube-dns", data)


def python_in(module: str, *args: str) -> list[str]:
    """argv running ``python -m module`` from this checkout inside a namespace (``ip netns exec`` keeps the
    environment, but PYTHONPATH must name the checkout for the ``tests`` and ``bench`` packages)."""
    return ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", module, *args]


class LineReader:
    """Reads a child's stdout lines on a thread, so that waiting for one is bounded (a plain ``readline``
    would block for as long as the child stays silent)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                with self._changed:
                    self.lines.append(raw.decode(errors="replace").strip())
                    self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str | None:
        """The first line starting with ``prefix``, waiting up to ``timeout`` s; None if none came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    return None
                self._changed.wait(left)

    def finish(self, timeout: float) -> list[str]:
        """Wait for the child to exit (SIGKILL after ``timeout``) and return all its lines."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.proc.args!r} overran its {timeout:.0f}s bound") from None
        self._thread.join(timeout=5)
        return list(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=5)


def spawn(box: sb.Sandbox, ns: str, argv: list[str], stderr_name: str) -> LineReader:
    """Start ``argv`` in namespace ``ns`` with its stdout read line by line; stderr goes to a file."""
    with (box.workdir / f"{stderr_name}.stderr").open("ab") as err:
        return LineReader(box.popen(ns, argv, stdout=subprocess.PIPE, stderr=err))


class Load:
    """A background ``bench.loadgen`` run from a namespace: :meth:`started` gives its start on
    CLOCK_MONOTONIC, :meth:`result` its summary (with ``start`` added)."""

    def __init__(self, box: sb.Sandbox, ns: str, *, server: str, rate: float, duration: float,
                 names: str = SERVICE, tag: str = "load", per_second: bool = False) -> None:  # fmt: skip
        self.duration = duration
        argv = python_in("bench.loadgen", "--server", server, "--rate", f"{rate:g}",
                         "--duration", f"{duration:g}", "--names", names)  # fmt: skip
        if per_second:
            argv.append("--per-second")  # see bench.loadgen: one line per second of the load
        self.reader = spawn(box, ns, argv, tag)

    def started(self, timeout: float = 15.0) -> float:
        line = self.reader.wait_line("start ", timeout)
        if line is None:
            self.reader.kill()
            raise BenchError(f"the load did not start within {timeout}s")
        return float(line.split()[1])

    def result(self) -> dict[str, object]:
        lines = self.reader.finish(self.duration + 20)
        start = next((float(x.split()[1]) for x in lines if x.startswith("start ")), None)
        summaries = [x for x in lines if x.startswith("{")]
        if not summaries:
            raise BenchError(f"the load printed no summary (exit {self.reader.proc.returncode})")
        out: dict[str, object] = json.loads(summaries[-1])
        out["start"] = start
        return out

    def kill(self) -> None:
        self.reader.kill()


class Node:
    """A started sandbox and the agents this benchmark started in it."""

    def __init__(self, box: sb.Sandbox) -> None:
        self.box = box
        self.agents: list[Server] = []
        self._names = itertools.count()

    # Agents -------------------------------------------------------------------------------------------
    def start_agent(
        self, kind: Kind, *, wait: bool = True, timeout: float = 20.0, extra: Sequence[str] = ()
    ) -> AgentProcess:
        """The agent as shipped (with ``extra`` flags), serving unless ``wait`` is false."""
        if kind != "ours":
            raise BenchError(f"start_agent starts the agent, not {kind}: use start_server")
        agent = AgentProcess(self.box, name=f"{kind}-{next(self._names)}", extra=list(extra))
        self.agents.append(agent)
        agent.start()
        if wait:
            agent.wait_serving(timeout)
        return agent

    def start_server(
        self, kind: Kind, *, wait: bool = True, timeout: float = 20.0, extra: Sequence[str] = ()
    ) -> Server:
        """The node's DNS server of ``kind``: the agent (with ``extra`` flags) or the real node-cache."""
        if kind == "ours":
            return self.start_agent(kind, wait=wait, timeout=timeout, extra=extra)
        if extra:
            raise BenchError(f"node-cache takes no agent flags: {list(extra)}")
        return self.start_node_cache(wait=wait, timeout=timeout)

    def start_node_cache(
        self,
        *,
        wait: bool = True,
        timeout: float = 20.0,
        binary: str | None = None,
        cgroup: Path | None = None,
    ) -> NodeCacheServer:
        """The real node-cache (``binary``: another copy of it), in ``cgroup`` when given."""
        server = NodeCacheServer(self.box)
        self.agents.append(server)
        server.start(wait=wait, timeout=timeout, binary=binary, cgroup=cgroup)
        return server

    def start_pod_like_agent(
        self, *, coredns: str, cgroup: Path, python: str, timeout: float = 20.0
    ) -> AgentProcess:
        """The agent as a container runs it: in ``cgroup``, with ``python`` (the runtime dependencies only)
        and the CoreDNS binary ``coredns``."""
        agent = AgentProcess(self.box, name=f"pod-{next(self._names)}", cgroup=cgroup, python=python,
                             extra=["--coredns-binary", coredns])  # fmt: skip
        self.agents.append(agent)
        agent.start()
        agent.wait_serving(timeout)
        return agent

    def kill_agent_and_coredns(self, agent: Server, signum: int = signal.SIGKILL) -> list[int]:
        """Signal the agent and its CoreDNS at once (node-cache is one process: CoreDNS is compiled in)."""
        pids = [agent.agent_pid()]
        coredns = agent.coredns_pid()
        if coredns is not None and coredns not in pids:
            pids.append(coredns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    # Loads and queries --------------------------------------------------------------------------------
    def load(self, *, rate: float, duration: float, server: str = sb.KUBE_DNS_IP, names: str = SERVICE,
             ns: str | None = None, per_second: bool = False) -> Load:  # fmt: skip
        return Load(self.box, ns or self.box.pod(0), server=server, rate=rate, duration=duration, names=names,
                    tag=f"load-{next(self._names)}", per_second=per_second)  # fmt: skip

    def warm(self, ns: str, server: str, names: list[str]) -> None:
        """One query per name, so the figures that follow are for cached names."""
        for name in names:
            self.box.dig(ns, server, name, check=False)

    def count_conntrack(self) -> None:
        """Per-flow packet counters in the node's conntrack table (a per-namespace sysctl)."""
        self.box.exec(self.box.node, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1"])

    def dns_flows(self) -> tuple[int, int]:
        """(conntrack entries of UDP DNS flows, queries they carried) in the node. A client that opens a
        fresh socket per query reuses a source port now and then, and a query on a port whose entry is still
        there joins that entry: entries undercount the queries conntrack handled; the packet counters do not
        (see :meth:`count_conntrack`)."""
        out = self.box.exec(self.box.node, ["conntrack", "-L", "-p", "udp", "--orig-port-dst", "53"])
        entries = queries = 0
        for line in out.splitlines():
            m = _ORIGINAL_PACKETS.search(line)
            if m:
                entries += 1
                queries += int(m.group(1))
        return entries, queries

    # Reset --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Every agent, node-cache and CoreDNS gone, the agent's and node-cache's rules and the interface
        removed (``agent --teardown``, which removes both rule sets),
        the kube-dns ConfigMap empty, conntrack flushed; checked, so no scenario inherits another's state."""
        self.kill_all()
        for kubedns_dir in (
            self.box.workdir / "kube-dns-configmap",
            self.box.workdir / "node-cache" / "kube-dns",
        ):
            if kubedns_dir.exists():
                publish(kubedns_dir, {})
        if self._clean():
            self.box.flush_conntrack()
            return
        self.box.exec(self.box.node, python_in(
            "agent", "--teardown", "-localip", ",".join(LOCAL_IPS), "--iptables-mode", self.box.flavour,
            "--xtables-lock", str(self.box.workdir / "xtables.lock"), "--log-format", "json",
        ))  # fmt: skip
        if not self._clean():
            raise BenchError(f"the node did not reset: {self._leftovers()}")
        self.box.flush_conntrack()

    def _leftovers(self) -> list[str]:
        """The agent's or node-cache's rules and the interface, where they are still on the node."""
        tags = (RULE_TAG, *nodecache.RULE_COMMENTS)
        left = [line for line in self.box.save_rules().splitlines() if any(tag in line for tag in tags)]
        link = self.box.exec(self.box.node, ["ip", "-o", "link", "show", "nodelocaldns"], check=False)
        return left + ([link.strip()] if link.strip() else [])

    def _clean(self) -> bool:
        return not self._leftovers()

    def kill_all(self) -> None:
        """SIGKILL every agent started here (reaped), then anything left in the node namespace (a CoreDNS
        whose agent was killed first)."""
        for agent in self.agents:
            agent.kill()
        self.agents.clear()
        sb._kill_netns_processes(self.box.node)  # the sandbox's own bounded kill-and-wait
