"""The real agent, run inside a sandbox's node namespace, for integration tests, the demo and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from harness import sandbox as sb
from harness.configmapdir import publish

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "corefile" / "Corefile.base"
METRICS_ADDRESS = "127.0.0.1:9353"
SERVICE, SERVICE_IP = "web.default.svc.cluster.local", "10.96.10.20"


def query_path(box: sb.Sandbox) -> tuple[str, bool]:
    """A pod's query for SERVICE to the ClusterIP: its answer ("" for none), and whether the node's conntrack
    table tracked it (kube-proxy's DNAT path) or not (the local cache)."""
    box.flush_conntrack()
    answer = box.dig(box.pod(0), sb.KUBE_DNS_IP, SERVICE, check=False)
    tracked = "dport=53" in box.conntrack("-p", "udp", "--orig-dst", sb.KUBE_DNS_IP)
    return answer, tracked


def local_answers(box: sb.Sandbox) -> bool:
    """True when a pod's query to the ClusterIP was answered without a conntrack entry (the local cache)."""
    answer, tracked = query_path(box)
    return answer == SERVICE_IP and not tracked


def our_rules(box: sb.Sandbox) -> list[str]:
    """The agent's tagged rules in the node, in both backends and both families, sorted."""
    return sorted(
        line
        for flavour in ("legacy", "nft")
        for family in (4, 6)
        for line in box.save_rules(family, flavour).splitlines()  # type: ignore[arg-type]
        if "NodeLocal DNS agent" in line
    )


def interface_exists(box: sb.Sandbox) -> bool:
    return "nodelocaldns" in box.exec(box.node, ["ip", "-o", "link", "show"])


def own_files(box: sb.Sandbox, name: str) -> list[str]:
    """The flags that give a second agent its own Corefile and pidfile, as each pod has (later flags win)."""
    return [
        "-conf",
        str(box.workdir / f"Corefile.{name}"),
        "-pidfile",
        str(box.workdir / f"coredns.{name}.pid"),
    ]


def http_status(box: sb.Sandbox, url: str) -> str:
    """GET ``url`` from the node namespace (as the kubelet's httpGet probes do): "200 OK", or "error …"."""
    code = (
        "import sys, urllib.request\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=1)\n"
        "    print(r.status, r.read().decode())\n"
        "except OSError as e:\n"
        "    print('error', e)\n"
    )
    return box.exec(box.node, [sys.executable, "-c", code, url]).strip()


class Load:
    """A background ``dnsload`` run from a pod; ``result()`` waits for it and returns its summary."""

    def __init__(self, box: sb.Sandbox, *, rate: float = 400, duration: float = 6.0, names: str = SERVICE,
                 server: str = sb.KUBE_DNS_IP) -> None:  # fmt: skip
        self._out: dict[str, object] = {}
        argv = [sys.executable, "-m", "harness.dnsload", "--server", server, "--rate", str(rate),
                "--duration", str(duration), "--names", names]  # fmt: skip

        def run() -> None:
            self._out = json.loads(box.exec(box.pod(0), argv, timeout=duration + 15))

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def result(self) -> dict[str, object]:
        self._thread.join(timeout=60)
        return self._out


def kill_coredns_under_load(
    box: sb.Sandbox, agent: AgentProcess, *, rate: float, duration: float, kill_at: float = 2.0
) -> tuple[int, dict[str, object]]:
    """SIGKILL the agent's CoreDNS ``kill_at`` seconds into a pod's load; its pid and the load's summary."""
    coredns = agent.coredns_pid()
    assert coredns is not None, agent.tail()
    load = Load(box, rate=rate, duration=duration)
    time.sleep(kill_at)
    os.kill(coredns, signal.SIGKILL)
    result = load.result()
    assert result["sent"] == int(rate * duration), result
    return coredns, result


class AgentProcess:
    """``python -m agent`` in the node namespace with the sandbox's addresses; JSON logs to a file."""

    def __init__(
        self,
        box: sb.Sandbox,
        *,
        name: str = "agent",
        local_ips: Sequence[str] = (sb.LOCAL_IP, sb.KUBE_DNS_IP),
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cgroup: Path | None = None,
        fault: str | None = None,
        relay: bool = False,
        python: str | None = None,
    ) -> None:
        """``relay``: the agent's stdout is a pipe to a ``cat`` that appends to the log (``self.relay``), so a
        test can stall the reader of the agent's output (SIGSTOP) as a slow log pipeline would. ``python``:
        the interpreter to run the agent with (default this one), e.g. one with only the runtime
        dependencies."""
        self.box = box
        self.relay: subprocess.Popen[bytes] | None = None
        self._relay_wanted = relay
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        if fault is not None:  # see harness/faultinject/sitecustomize.py
            self.env["PYTHONPATH"] += f"{os.pathsep}{REPO / 'harness' / 'faultinject'}"
            self.env["AGENT_FAULT"] = fault
        self.cgroup = cgroup
        self.dir = box.workdir / name
        self.dir.mkdir(exist_ok=True)
        self.kubedns_dir = box.workdir / "kube-dns-configmap"
        self.kubedns_dir.mkdir(exist_ok=True)
        self.local_ips = list(local_ips)
        self.log_path = self.dir / "agent.log"
        self.status_file = self.dir / "status.json"
        self.argv = [
            python or sys.executable, "-m", "agent",
            "-localip", ",".join(self.local_ips),
            "-basecorefile", str(TEMPLATE),
            "-conf", str(box.workdir / "Corefile"),
            "-kubednscm", str(self.kubedns_dir),
            "-pidfile", str(box.workdir / "coredns.pid"),
            "-metrics-listen-address", METRICS_ADDRESS,
            "--cluster-dns-ip", sb.KUBE_DNS_UPSTREAM_IP,
            "--coredns-binary", sb.COREDNS,
            "--iptables-mode", box.flavour,
            "--status-file", str(self.status_file),
            "--xtables-lock", str(box.workdir / "xtables.lock"),
            "--agents-lock", str(box.workdir / "agents.lock"),
            "--log-format", "json",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    # Lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> AgentProcess:
        argv = ["ip", "netns", "exec", self.box.node, *self.argv]
        if self.cgroup is not None:
            # `ip netns exec` remounts /sys, which hides /sys/fs/cgroup from the agent; nsenter enters only
            # the network namespace, as a container's agent sees its cgroup. The node's resolv.conf is then
            # named explicitly (nothing may reach the machine's own resolver).
            resolv = f"/etc/netns/{self.box.node}/resolv.conf"
            argv = ["nsenter", f"--net=/run/netns/{self.box.node}", *self.argv, "--resolv-conf", resolv]
            # Enter the cgroup first, then exec: the agent's pid stays this one.
            argv = ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
        with self.log_path.open("ab") as log:
            if self._relay_wanted:
                self.relay = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
            out = self.relay.stdin if self.relay is not None else log
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=self.env
            )
        if self.relay is not None and self.relay.stdin is not None:
            self.relay.stdin.close()  # the agent holds the pipe now
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        self.wait_for(lambda s: s.get("serving") is True, timeout, "serving")

    def wait_for(self, predicate: object, timeout: float, what: str) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if callable(predicate) and predicate(status):
                return status
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode} waiting for {what}:\n{self.tail()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"agent not {what} within {timeout}s (status {status}):\n{self.tail()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.agent_pid()  # make sure it is there
        os.kill(self.agent_pid(), signum)

    def agent_pid(self) -> int:
        """The agent's own pid (``ip netns exec`` execs it, so it is the Popen's pid)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"agent did not stop within {timeout}s:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.relay is not None:
            self.relay.send_signal(signal.SIGCONT)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.stop()
        with contextlib.suppress(ProcessLookupError):
            self.kill()
        if self.relay is not None:
            self.relay.wait(timeout=5)

    # Observing ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def coredns_pid(self) -> int | None:
        """The CoreDNS child of this agent, if one runs."""
        pids = self.coredns_pids()
        return pids[0] if pids else None

    def coredns_pids(self) -> list[int]:
        """Every CoreDNS child of this agent (twins: one per instance), oldest first."""
        found: list[tuple[float, int]] = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.agent_pid()).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if Path(child.exe()).name == "coredns":
                        found.append((child.create_time(), child.pid))
        return [pid for _, pid in sorted(found)]

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> str:
        return self.box.http_get(self.box.node, f"http://{METRICS_ADDRESS}/metrics")

    def write_kubedns(self, data: dict[str, str]) -> None:
        """Update the kube-dns ConfigMap directory the way the kubelet does (a ``..data`` symlink swap)."""
        publish(self.kubedns_dir, data)
