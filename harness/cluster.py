"""A real single-node Kubernetes cluster in the sandbox: the test bed for the DaemonSet end to end.

    with Cluster(proxy_mode="iptables") as cluster:
        cluster.kubectl("apply", "-f", "-", input=manifest)
        cluster.in_pod("client", ["dig", "@10.96.0.10", "web.default.svc.cluster.local"])

What runs, and where (every name carries the sandbox prefix ``nldsb-<run>-``, so the leak check finds it):

- etcd and kube-apiserver: :class:`harness.controlplane.ControlPlane`, in a network namespace of their own,
  linked to the node by a veth; the apiserver publishes itself as the ``kubernetes`` Service.
- the node: the network namespace ``nldsb-<run>-node`` and, inside it, one private mount namespace (held by a
  ``sleep`` process) with its own tmpfs on ``/run``, private directories bound on ``/var/lib`` and
  ``/var/log`` and the machine's cgroup hierarchies mounted again (``ip netns exec`` hides them).
  containerd (Debian's 1.6, private configuration and root), the kubelet (``cgroupDriver: cgroupfs``, its
  own ``cgroupRoot`` ``/nldsb-<run>``), kube-proxy (``iptables`` or ``nftables`` mode),
  kube-controller-manager and kube-scheduler all run there. Pods get addresses from 10.244.0.0/24 through
  the ``ptp`` CNI plugin: every packet between pods is routed by the node, as on a node whose pods sit behind
  a routed interface.
- images: the pause image (Debian's catatonit), the agent's image, CoreDNS's, moved from the project's podman
  storage into containerd (``podman save``; pause and CoreDNS cached under :data:`IMAGE_CACHE`).
- cluster DNS: the real thing, a CoreDNS Deployment ``kube-dns`` with the ``kubernetes`` plugin and its RBAC,
  the Service ``kube-dns`` at 10.96.0.10 (the kubelet's ``clusterDNS``), and ``upstream-dns`` at 10.96.0.53
  (the nameserver of pods with ``dnsPolicy: Default``, the node-local cache's upstream): the same pods answer
  ``example.org`` from a template, so no query leaves the sandbox.
- a client pod ``client`` in ``default`` (not hostNetwork) and two test Services.

What it changes outside its namespaces, and undoes in :meth:`Cluster.stop` (exit, failure, Ctrl-C): the
directories ``/sys/fs/cgroup/<hierarchy>/nldsb-<run>`` (every process in them is killed, then they are
removed), and the host-wide sysctls the kubelet sets at start (``vm.overcommit_memory``, ``kernel.panic``,
``kernel.panic_on_oops``: recorded before, written back after). kube-proxy's conntrack settings are 0, so it
leaves ``nf_conntrack_max`` and the timeouts alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from harness import controlplane
from harness import sandbox as sb
from harness.waiting import poll

ProxyMode = Literal["iptables", "nftables"]

REPO = Path(__file__).resolve().parents[1]
IMAGE_CACHE = Path("/var/cache/node-local-dns-agent/cluster-images")
NODE_NAME = "node"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
KUBE_DNS_IP = sb.KUBE_DNS_IP  # 10.96.0.10, the kube-dns Service (the ClusterIP the pods use)
UPSTREAM_DNS_IP = "10.96.0.53"  # the nameserver of dnsPolicy: Default pods: kube-dns's pods again
STUB_DNS_IP = "10.96.0.100"  # the stub-domain server, a pod behind this Service
STUB_ZONES = ("acme.local", "beta.local")  # what it serves (as stub domains of the kube-dns ConfigMap)
STUB_NAMES = {"www.acme.local": "198.51.100.7", "www.beta.local": "198.51.100.9"}
AGENT_IMAGE = "node-local-dns-agent:0.1.0"  # as the shipped manifest names it
COREDNS_IMAGE = "docker.io/coredns/coredns:" + (REPO / "image" / "coredns.version").read_text().strip()[1:]
EXTERNAL = {"example.org": "192.0.2.80"}  # what upstream-dns answers for names outside the cluster
SERVICES = {"web.default": "10.96.10.20", "db.prod": "10.96.20.30"}  # test Services: name.namespace → IP

IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}  # iptables-nft's tables, saved by it
# The sysctls the kubelet writes outside its namespaces (host-wide), restored on stop.
HOST_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
# The node components; their command lines carry the run's work dir, so the leak check finds them.
COMPONENTS = (b"containerd", b"kubelet", b"kube-proxy", b"kube-controller-manager", b"kube-scheduler")


# runc for containerd: a container's oom_score_adj no lower than runc's own. The kubelet asks for -998 (pause)
# and -997 (Guaranteed pods); lowering it needs CAP_SYS_RESOURCE, which root lacks on these machines (runc's
# init then dies: "failed to update /proc/self/oom_score_adj: Permission denied").
RUNC_WRAPPER = """#!/bin/sh
own=$(cat /proc/self/oom_score_adj)
prev=""
for arg in "$@"; do
  case "$prev" in
    --bundle|-b) spec="$arg/config.json" ;;
    --process|-p) spec="$arg" ;;
    *) spec="" ;;
  esac
  if [ -n "$spec" ] && [ -f "$spec" ]; then
    jq -c --argjson own "$own" '
      if (.process.oomScoreAdj // $own) < $own then .process.oomScoreAdj = $own
      elif (.oomScoreAdj // $own) < $own then .oomScoreAdj = $own else . end' "$spec" >"$spec.tmp"
    mv "$spec.tmp" "$spec"
  fi
  prev="$arg"
done
exec runc "$@"
"""


SYSCTL_RECORD = Path("/run/node-local-dns-agent/cluster-sysctls.json")


SYSCTL_ROOT = Path("/proc/sys")


def host_sysctls() -> dict[str, str]:
    """The host-wide sysctls the kubelet changes, as they are now."""
    return {key: (SYSCTL_ROOT / key).read_text().strip() for key in HOST_SYSCTLS}


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        path = SYSCTL_ROOT / key
        if path.read_text().strip() != value:
            path.write_text(value)


@contextlib.contextmanager
def _sysctl_record() -> Iterator[dict[str, Any]]:
    """The machine-wide record (under a lock): the original values and the clusters running now. A run
    whose work dir is gone (it crashed, and the leak check removed what it left) no longer counts."""
    SYSCTL_RECORD.parent.mkdir(parents=True, exist_ok=True)
    with open(SYSCTL_RECORD.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record: dict[str, Any] = {"original": {}, "runs": []}
        with contextlib.suppress(FileNotFoundError, ValueError):
            record = json.loads(SYSCTL_RECORD.read_text())
        tmp = Path(tempfile.gettempdir())
        live = [r for r in record["runs"] if any(tmp.glob(f"{sb.PREFIX}-{r}-*"))]
        if record["runs"] and not live:  # every cluster that recorded them is gone: put them back
            _write_sysctls(record["original"])
        record["runs"] = live
        yield record
        if record["runs"]:
            SYSCTL_RECORD.write_text(json.dumps(record))
        else:
            SYSCTL_RECORD.unlink(missing_ok=True)


def join_sysctl_record(run_id: str) -> dict[str, str]:
    """Join the machine-wide record of the sysctls as they were before any cluster ran (made by the first of
    concurrent clusters: a later one starts after the first kubelet changed them); returns those values."""
    with _sysctl_record() as record:
        if not record["runs"]:
            record["original"] = host_sysctls()
        record["runs"].append(run_id)
        return dict(record["original"])


def leave_sysctl_record(run_id: str) -> None:
    """Leave the record; the last cluster to go writes the original values back."""
    with _sysctl_record() as record:
        if run_id in record["runs"]:
            record["runs"].remove(run_id)
        if not record["runs"]:
            _write_sysctls(record["original"])


class ClusterError(RuntimeError):
    """The cluster did not come up, or a command in it failed (the message has the output)."""


@cache
def pause_image() -> str:
    return sb.run(["bash", str(REPO / "scripts" / "setup-cluster.sh"), "--pause-image"]).strip()


def unavailable() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    reason = controlplane.unavailable()
    if reason:
        return reason
    for tool in ("containerd", "ctr", "runc", "nsenter", "/usr/lib/cni/ptp", "/usr/lib/cni/loopback"):
        if not (os.access(tool, os.X_OK) if tool.startswith("/") else _which(tool)):
            return f"needs {tool} (run make setup)"
    return None


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def podman(*args: str, timeout: float = 300) -> str:
    return sb.run([str(REPO / "scripts" / "podman"), *args], timeout=timeout)


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """The machine's cgroup hierarchies as (mount point, fstype, options): mounted again inside the node."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ")
        point = left.split()[4]
        fstype, _source, options = right.split()[:3]
        if fstype in ("cgroup", "cgroup2") and point.startswith("/sys/fs/cgroup/"):
            opts = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
            mounts.append((point, fstype, opts))
    return mounts


def leftovers(run_ids: set[str]) -> list[str]:
    """What cluster runs left: cgroups and node components (namespaces, work dirs: :func:`sb.leftovers`)."""
    found = []
    for point, _fstype, _opts in _cgroup_mounts():
        for run_id in run_ids:
            path = Path(point) / f"{sb.PREFIX}-{run_id}"
            if path.exists():
                found.append(f"cgroup {path}")
    prefixes = [f"{sb.PREFIX}-{r}-".encode() for r in run_ids]
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            if cmdline and cmdline[0].endswith(COMPONENTS) and any(p in a for a in cmdline for p in prefixes):
                found.append(f"{b' '.join(cmdline).decode(errors='replace')} (pid {proc.name})")
    return found


def remove_leftovers_of(run_ids: set[str]) -> None:
    for run_id in run_ids:
        remove_cgroups(f"/{sb.PREFIX}-{run_id}")


def _cgroup_dirs(root: str) -> list[Path]:
    """Every directory of cgroup ``root`` in every hierarchy, deepest first."""
    dirs: list[Path] = []
    for point, _fstype, _opts in _cgroup_mounts():
        top = Path(point) / root.lstrip("/")
        if top.is_dir():
            dirs += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda d: len(d.parts), reverse=True)


def remove_cgroups(root: str, timeout: float = 20) -> None:
    """Kill every process in cgroup ``root`` (all hierarchies) and remove its directories (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = _cgroup_dirs(root)
        if not dirs:
            return
        for d in dirs:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                d.rmdir()
        time.sleep(0.05)
    left = _cgroup_dirs(root)
    if left:
        raise ClusterError(f"cgroups not removed within {timeout}s: {', '.join(map(str, left[:5]))}")


@dataclass
class Cluster(sb.Run):
    """The whole node and its control plane; a context manager (see the module docstring)."""

    proxy_mode: ProxyMode = "iptables"
    cp: controlplane.ControlPlane = field(init=False)
    node_ip: str = field(default="", init=False)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _sysctls: dict[str, str] = field(default_factory=dict, init=False)
    _holder: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _netns_added: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cp = controlplane.ControlPlane(
            run_id=self.run_id,
            apiserver_args=(
                "--endpoint-reconciler-type=lease",  # the `kubernetes` Service's endpoint: the apiserver
                "--kubelet-preferred-address-types=InternalIP",  # exec and logs reach the node's address
                "--allow-privileged=true",
            ),
        )

    @property
    def node(self) -> str:
        return self.name("node")

    @property
    def cgroup_root(self) -> str:
        return f"/{sb.PREFIX}-{self.run_id}"

    # Lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        started = time.monotonic()
        self._record_sysctls()
        self.cp.start()
        sb.run(["ip", "netns", "add", self.node])
        self._netns_added = True
        Path(f"/etc/netns/{self.node}").mkdir(parents=True, exist_ok=True)
        Path(f"/etc/netns/{self.node}/resolv.conf").write_text(f"nameserver {UPSTREAM_DNS_IP}\n")
        self.node_exec(["ip", "link", "set", "lo", "up"], mount=False)
        # Pods' traffic is routed by the node; addresses usable at once (no IPv6 duplicate address detection).
        self.node_exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0"], mount=False)  # fmt: skip
        self.node_ip = self.cp.link(self.node)
        api_side = self.node_ip.rsplit(".", 1)[0] + ".2"
        # Replies from the apiserver to pods; Service traffic the node itself sends (routed before DNAT).
        sb.run(["ip", "-n", self.cp.namespace, "route", "add", CLUSTER_CIDR, "via", self.node_ip])
        self.node_exec(["ip", "route", "add", controlplane.SERVICE_CIDR, "via", api_side], mount=False)
        self._make_cgroups()
        self._start_holder()
        self._write_configs()
        self._start("containerd", ["containerd", "--config", str(self.workdir / "containerd.toml")])
        if not poll(lambda: self.ctr("version", check=False), 30, every=0.2):
            raise ClusterError(f"containerd did not answer within 30 s:\n{self.log_tail('containerd')}")
        self._import_images()
        self._start_node_components()
        if not poll(self._node_ready, 90, every=0.5):
            raise ClusterError(f"node not Ready within 90 s:\n{self.log_tail('kubelet')}")
        self._install_cluster_dns()
        self.startup_seconds = time.monotonic() - started

    startup_seconds: float = field(default=0.0, init=False)

    def stop(self) -> None:
        """Remove everything the cluster created and restore what it changed. Safe twice and after a partial
        start; the node components go first (nothing restarts a container), containers with the cgroups."""
        for name in ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "containerd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        errors: list[str] = []
        try:
            remove_cgroups(self.cgroup_root)
        except ClusterError as exc:
            errors.append(str(exc))
        if self._netns_added:
            sb.remove_namespace(self.node)  # containerd's shims and the hostNetwork pods live there
            self._netns_added = False
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=5)
            self._holder = None
        self.cp.stop()
        self._restore_sysctls()
        import shutil

        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    def _record_sysctls(self) -> None:
        self._sysctls = join_sysctl_record(self.run_id)

    def _restore_sysctls(self) -> None:
        if self._sysctls:
            leave_sysctl_record(self.run_id)

    def sysctls_restored(self) -> bool:
        """The host-wide sysctls are as before any cluster ran (or another cluster still runs)."""
        with _sysctl_record() as record:
            return bool(record["runs"]) or host_sysctls() == self._sysctls

    def _make_cgroups(self) -> None:
        """The kubelet's cgroupRoot in every hierarchy (cpuset's needs its parent's CPUs and memory nodes)."""
        for point, _fstype, _opts in _cgroup_mounts():
            path = Path(point) / self.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            if Path(point).name == "cpuset":
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (path / key).write_text((Path(point) / key).read_text())

    def _start_holder(self) -> None:
        """The node's mount namespace, held by a sleep: private /run, /var/lib, /var/log, cgroups mounted."""
        w = self.workdir
        for d in ("varlib", "varlog"):
            (w / d).mkdir()
        script = [
            "set -e",
            "mount --make-rslave /",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            f"mount --bind {w / 'varlib'} /var/lib",
            f"mount --bind {w / 'varlog'} /var/log",
            "mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup",
        ]
        for point, fstype, opts in _cgroup_mounts():
            script.append(f"mkdir -p {point}")
            script.append(f"mount -t {fstype} -o {opts or 'rw'} {fstype} {point}")
        script.append("touch /run/.node-ready")
        script.append("exec sleep infinity")
        with (w / "holder.log").open("wb") as log:
            self._holder = subprocess.Popen(
                ["ip", "netns", "exec", self.node, "sh", "-c", "\n".join(script)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        marker = f"/proc/{self._holder.pid}/root/run/.node-ready"
        if not poll(lambda: os.path.exists(marker), 10, every=0.05):
            raise ClusterError(f"node mount namespace not ready: {(w / 'holder.log').read_text()}")

    # Running things in the node ----------------------------------------------------------------------
    def _enter(self, mount: bool = True) -> list[str]:
        if mount:
            assert self._holder is not None
            return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--"]
        return ["ip", "netns", "exec", self.node]

    def node_exec(
        self, argv: Sequence[str], *, mount: bool = True, check: bool = True, timeout: float = 60,
        input: str | None = None,
    ) -> str:  # fmt: skip
        """Run ``argv`` in the node (its network namespace, and its mount namespace unless ``mount``)."""
        return sb.run([*self._enter(mount), *argv], check=check, timeout=timeout, input=input)

    def _start(self, name: str, argv: Sequence[str]) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self._procs[name] = subprocess.Popen(
                [*self._enter(), *argv], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.node_exec(
            ["ctr", "-a", "/run/containerd/containerd.sock", "-n", "k8s.io", *args],
            check=check,
            timeout=timeout,
        )

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        return self.cp.kubectl(*args, input=input, check=check, timeout=timeout)

    def get(self, kind: str, name: str, namespace: str = "kube-system") -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json"))
        return result

    def pod_pid(self, namespace: str, name: str, container: str | None = None) -> int:
        """The host PID of the first process of pod ``name``: of ``container``, or of any of its containers
        (a container's network namespace is its pod's)."""
        labels = f'labels."io.kubernetes.pod.name"=={name},labels."io.kubernetes.pod.namespace"=={namespace}'
        if container:
            labels += f',labels."io.kubernetes.container.name"=={container}'
        containers = self.ctr("containers", "ls", "-q", labels).split()
        tasks = {
            parts[0]: int(parts[1])
            for parts in (line.split() for line in self.ctr("tasks", "ls").splitlines()[1:])
            if len(parts) >= 3 and parts[2] == "RUNNING"
        }
        pids = [tasks[c] for c in containers if c in tasks]
        if not pids:
            raise ClusterError(f"no running container {container or ''} of pod {namespace}/{name}")
        return pids[0]

    def in_pod(
        self, name: str, argv: Sequence[str], *, namespace: str = "default", check: bool = True,
        timeout: float = 60,
    ) -> str:  # fmt: skip
        """Run a host command (dig, Python) in pod ``name``'s network namespace, as that pod's traffic."""
        pid = self.pod_pid(namespace, name)
        return sb.run(["nsenter", "-t", str(pid), "-n", "--", *argv], check=check, timeout=timeout)

    def popen_in_pod(self, name: str, argv: Sequence[str], namespace: str = "default",
                     **kwargs: Any) -> subprocess.Popen[bytes]:  # fmt: skip
        pid = self.pod_pid(namespace, name)
        return subprocess.Popen(["nsenter", "-t", str(pid), "-n", "--", *argv], **kwargs)

    def conntrack(self, *args: str) -> str:
        """``conntrack -L`` in the node's network namespace (where kube-proxy's DNAT tracks pod traffic)."""
        return self.node_exec(["conntrack", "-L", *args], mount=False, check=False)

    def normalized_tables(self) -> str:
        """The node's packet filter as sorted lines (kube-proxy writes rules in map order, not a fixed one):
        the saves of iptables-legacy and iptables-nft, and every other nftables table (kube-proxy's in
        nftables mode) listed by nft. A table with no rule and only built-in chains that accept is left out:
        iptables creates one on first use and never removes it (an empty ``raw`` table does nothing); so is
        an empty nftables chain."""
        lines: list[str] = []
        for tool in (
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
        ):
            table: list[str] = []
            for line in self.node_exec([tool], mount=False, check=False).splitlines():
                if line.startswith("*"):
                    table = [line]
                elif line == "COMMIT":
                    if any(not re.fullmatch(r":[A-Z]+ ACCEPT", entry) for entry in table[1:]):
                        lines += [f"{tool} {table[0]} {entry}" for entry in table[1:]]
                elif line and not line.startswith("#"):
                    table.append(line.split(" [")[0] if line.startswith(":") else line)
        for listed in self.node_exec(["nft", "list", "tables"], mount=False).splitlines():
            _, family, name = listed.split()
            if family in ("ip", "ip6") and name in IPTABLES_TABLES:
                continue  # iptables-nft's, in its save above
            text = self.node_exec(["nft", "-s", "list", "table", family, name], mount=False)
            # kube-proxy's nftables mode flushes a removed Service's chain at once and deletes it in a later
            # full sync (up to half a minute): an empty chain does nothing, so it is left out.
            text = re.sub(r"\n\s*chain [^\n]* \{\s*\}", "", text)
            lines += [f"nft {family} {name} {line.strip()}" for line in text.splitlines() if line.strip()]
        return "\n".join(sorted(lines))

    def node_cache_up(self) -> bool:
        """The node's CoreDNS (the agent's child) serves its metrics."""
        out = self.node_exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "http://127.0.0.1:9253/metrics"], mount=False, check=False)  # fmt: skip
        return out.strip() == "200"

    def node_cache_requests(self) -> float:
        """Requests the node's CoreDNS (the agent's child, ``prometheus :9253`` in the node) has served."""
        out = self.node_exec(["curl", "-s", "http://127.0.0.1:9253/metrics"], mount=False, timeout=10)
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in out.splitlines()
            if line.startswith("coredns_dns_requests_total{")
        )

    def dig(self, server: str, name: str, pod: str = "client") -> str:
        """``dig +short`` from a pod's network namespace; one try, one second; "" without an answer."""
        out = self.in_pod(pod, ["dig", f"@{server}", name, "+short", "+time=1", "+tries=1"], check=False)
        return "\n".join(line for line in out.splitlines() if line and not line.startswith(";"))

    def start_load(
        self, *, rate: float, duration: float, names: str, server: str = KUBE_DNS_IP
    ) -> subprocess.Popen[str]:
        """A bounded ``harness.dnsload`` run from the client pod's network namespace; its stdout is the
        summary (JSON)."""
        load = ["--server", server, "--rate", str(rate), "--duration", str(duration), "--names", names]
        return self.popen_in_pod(
            "client",
            [sys.executable, "-m", "harness.dnsload", *load],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def links(self) -> str:
        return self.node_exec(["ip", "-o", "addr", "show"], mount=False)

    # Waiting ---------------------------------------------------------------------------------------------
    def _node_ready(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited {proc.returncode}:\n{self.log_tail(name)}")
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        try:
            conditions = json.loads(out)["status"]["conditions"]
        except (ValueError, KeyError):
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def wait_rollout(
        self, kind: str, name: str, namespace: str = "kube-system", timeout: float = 120
    ) -> None:
        proc = self.kubectl(
            "rollout",
            "status",
            f"{kind}/{name}",
            "-n",
            namespace,
            f"--timeout={int(timeout)}s",
            check=False,
            timeout=timeout + 10,
        )
        if "successfully rolled out" not in proc:
            raise ClusterError(f"{kind}/{name} did not roll out: {proc}\n{self.describe_pods(namespace)}")

    def kubectl_edit(self, namespace: str, what: str, sed: str) -> str:
        """``kubectl edit`` as a person runs it, the editor being ``sed -i -e SED`` on the object's YAML."""
        editor = self.workdir / "editor"
        editor.write_text(f'#!/bin/sh\nexec sed -i -e {shlex.quote(sed)} "$1"\n')
        editor.chmod(0o755)
        argv = ["ip", "netns", "exec", self.cp.namespace, "env", f"KUBE_EDITOR={editor}",
                str(controlplane.binaries()["kubectl"]), f"--kubeconfig={self.cp.admin_kubeconfig}",
                "edit", "-n", namespace, what]  # fmt: skip
        return sb.run(argv)

    def wait_gone(self, namespace: str, selector: str, timeout: float = 60) -> None:
        """Wait until no pod matching ``selector`` is left in ``namespace``."""

        def gone() -> bool:
            return not self.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "name").strip()

        if not poll(gone, timeout, every=0.5):
            raise ClusterError(f"pods {selector} still in {namespace} after {timeout}s")

    def describe_pods(self, namespace: str) -> str:
        return self.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)

    def wait_pod_ready(self, namespace: str, name: str, timeout: float = 120) -> None:
        out = self.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                           f"--timeout={int(timeout)}s", check=False, timeout=timeout + 10)  # fmt: skip
        if "condition met" not in out:
            raise ClusterError(f"pod {namespace}/{name} not Ready: {out}\n{self.describe_pods(namespace)}")

    # Configuration -----------------------------------------------------------------------------------
    def _write_configs(self) -> None:
        w = self.workdir
        (w / "cni").mkdir()
        (w / "cni" / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0",
            "name": "pods",
            "plugins": [{
                "type": "ptp",
                "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }))  # fmt: skip
        (w / "runc").write_text(RUNC_WRAPPER)
        (w / "runc").chmod(0o755)
        (w / "containerd.toml").write_text(
            "version = 2\n"
            f'root = "{w / "containerd"}"\n'
            'state = "/run/containerd"\n'
            'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
            ' "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]\n'
            "[grpc]\n"
            '  address = "/run/containerd/containerd.sock"\n'
            '[plugins."io.containerd.grpc.v1.cri"]\n'
            f'  sandbox_image = "{pause_image()}"\n'
            "  enable_selinux = false\n"
            '[plugins."io.containerd.grpc.v1.cri".cni]\n'
            '  bin_dir = "/usr/lib/cni"\n'
            f'  conf_dir = "{w / "cni"}"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            '  runtime_type = "io.containerd.runc.v2"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
            "  SystemdCgroup = false\n"
            f'  BinaryName = "{w / "runc"}"\n'
        )
        kubeconfig = self.cp.write_kubeconfig(w / "node.kubeconfig", self.cp.admin_token, self.cp.url)
        (w / "resolv.conf").write_text(f"nameserver {UPSTREAM_DNS_IP}\n")
        (w / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": self.node_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "clusterDNS": [KUBE_DNS_IP],
            "clusterDomain": sb.CLUSTER_DOMAIN,
            "resolvConf": str(w / "resolv.conf"),
            # ConfigMap volumes reach pods within a few seconds (the default is a minute).
            "syncFrequency": "5s",
            # A shared machine's disks and memory must not evict the node's pods or its images.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False,
            "serializeImagePulls": False,
            "protectKernelDefaults": False,
        }))  # fmt: skip
        conntrack = {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"}
        (w / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": self.proxy_mode,
            "clusterCIDR": CLUSTER_CIDR,
            "hostnameOverride": NODE_NAME,
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
            "conntrack": conntrack,
        }))  # fmt: skip

    def _start_node_components(self) -> None:
        w = self.workdir
        bins = controlplane.binaries()
        kubeconfig = str(w / "node.kubeconfig")
        self._start("kubelet", [
            str(bins["kubelet"]), f"--config={w / 'kubelet.yaml'}", f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={self.node_ip}", "--v=1",
        ])  # fmt: skip
        self._start("kube-proxy", [str(bins["kube-proxy"]), f"--config={w / 'kube-proxy.yaml'}", "--v=1"])
        self._start("kube-controller-manager", [
            str(bins["kube-controller-manager"]), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            f"--root-ca-file={self.cp.ca}",
            f"--service-account-private-key-file={self.cp.workdir / 'sa.key'}",
            "--use-service-account-credentials=false", "--bind-address=127.0.0.1",
            f"--cert-dir={w / 'kcm-certs'}", "--controllers=*,-nodeipam",
            "--concurrent-deployment-syncs=2", "--node-monitor-grace-period=40s",
        ])  # fmt: skip
        self._start("kube-scheduler", [
            str(bins["kube-scheduler"]), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--cert-dir={w / 'scheduler-certs'}",
        ])  # fmt: skip

    def _import_images(self) -> None:
        """The pause, agent and CoreDNS images from podman into containerd, under the names pods use. The
        archives of the two that rarely change are cached; the agent's, rebuilt with every change to the
        agent, is saved into the work dir."""
        from harness.agentcontainer import ensure_image

        ensure_image()  # the working tree's image (built only when its build context changed)
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        cached: set[Path] = set()
        for source, name, keep in (
            (pause_image(), pause_image(), True),
            (f"localhost/{AGENT_IMAGE}", f"docker.io/library/{AGENT_IMAGE}", False),
            (COREDNS_IMAGE, COREDNS_IMAGE, True),
        ):
            image_id = podman("image", "inspect", "--format", "{{.Id}}", source).strip()
            tar = IMAGE_CACHE / f"{image_id[:16]}.tar" if keep else self.workdir / "agent-image.tar"
            if not tar.exists():
                tmp = tar.with_suffix(f".{self.run_id}.tmp")
                podman("save", "--format", "docker-archive", "-o", str(tmp), source)
                tmp.rename(tar)
            if keep:
                tar.touch()
                cached.add(tar)
            self.ctr("images", "import", str(tar), timeout=300)
            if name != source:
                self.ctr("images", "tag", "--force", source, name)
        for old in IMAGE_CACHE.iterdir():  # archives of images since rebuilt (unused for a day) go
            if old not in cached and time.time() - old.stat().st_mtime > 86400:
                old.unlink(missing_ok=True)

    def _install_cluster_dns(self) -> None:
        self.kubectl("apply", "-f", "-", input=cluster_dns_manifest())
        self.wait_rollout("deployment", "kube-dns")
        self.wait_rollout("deployment", "stub-dns")
        self.kubectl("apply", "-f", "-", input=client_manifest())
        self.wait_pod_ready("default", "client")
        # kube-proxy has written every Service (tests compare the node's tables against this state).
        ips = [KUBE_DNS_IP, UPSTREAM_DNS_IP, STUB_DNS_IP, *SERVICES.values()]
        if not poll(lambda: all(ip in self.normalized_tables() for ip in ips), 30, every=0.5):
            raise ClusterError(f"kube-proxy did not write rules for {ips}:\n{self.log_tail('kube-proxy')}")


def _yaml_stream(objects: list[dict[str, Any]]) -> str:
    return "\n---\n".join(json.dumps(o) for o in objects) + "\n"


KUBE_SYSTEM = {"namespace": "kube-system"}


def _template(name: str, ip: str) -> str:
    return f'    template IN A {name} {{\n        answer "{{{{ .Name }}}} 300 IN A {ip}"\n    }}\n'


def _dns_server(name: str, labels: dict[str, str], corefile: str, ips: dict[str, str],
                account: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """A CoreDNS Deployment in kube-system, its Corefile in the ConfigMap ``NAME-corefile`` (``kube-dns`` is
    the name of the ConfigMap of stub domains), and a Service per name → ClusterIP."""
    meta = KUBE_SYSTEM
    ports = [
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
    ]
    pod: dict[str, Any] = {
        "priorityClassName": "system-cluster-critical",
        "dnsPolicy": "Default",
        "containers": [{
            "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never",
            "args": ["-conf", "/etc/coredns/Corefile"],
            "ports": [{"containerPort": 53, "protocol": p} for p in ("UDP", "TCP")],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
        }],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-corefile"}}],
    }  # fmt: skip
    if account:
        pod["serviceAccountName"] = account
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-corefile", **meta},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels, **meta},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod},
            },
        },
    ] + [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "labels": labels, **meta},
            "spec": {"clusterIP": ip, "selector": labels, "ports": ports},
        }
        for service, ip in ips.items()
    ]


def cluster_dns_manifest() -> str:
    """kube-dns as clusters run it: CoreDNS with the ``kubernetes`` plugin, its RBAC, the Services; and a
    stub-domain server (:data:`STUB_ZONES`) at :data:`STUB_DNS_IP`."""
    corefile = (
        ".:53 {\n"
        "    errors\n"
        "    health :8080\n"
        "    ready :8181\n"
        f"    kubernetes {sb.CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "        ttl 30\n"
        "    }\n" + "".join(_template(name, ip) for name, ip in EXTERNAL.items()) + "    cache 30\n"
        "    loop\n"
        "    reload 2s\n"
        "}\n"
    )
    stub = (
        f"{' '.join(STUB_ZONES)}:53 {{\n    errors\n    health :8080\n    ready :8181\n"
        + "".join(_template(name, ip) for name, ip in STUB_NAMES.items())
        + "}\n"
    )
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", **KUBE_SYSTEM}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        *_dns_server("kube-dns", {"k8s-app": "kube-dns"}, corefile,
                     {"kube-dns": KUBE_DNS_IP, "upstream-dns": UPSTREAM_DNS_IP}, account="coredns"),
        *_dns_server("stub-dns", {"k8s-app": "stub-dns"}, stub, {"stub-dns": STUB_DNS_IP}),
    ]  # fmt: skip
    return _yaml_stream(objects)


def client_manifest() -> str:
    """The client pod (the agent's image: glibc's getent, Python) and the test Services it resolves."""
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}}]
    for key, ip in SERVICES.items():
        name, namespace = key.split(".")
        objects.append({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        })  # fmt: skip
    objects.append({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "dnsConfig": {"options": [{"name": "timeout", "value": "1"}, {"name": "attempts", "value": "2"}]},
            "containers": [{"name": "client", "image": f"docker.io/library/{AGENT_IMAGE}",
                            "imagePullPolicy": "Never", "command": ["sleep", "86400"]}],
        },
    })  # fmt: skip
    return _yaml_stream(objects)


@contextlib.contextmanager
def started(proxy_mode: ProxyMode = "iptables") -> Iterator[Cluster]:
    """A started cluster, removed on the way out (SIGTERM too: it is turned into an exception)."""
    previous = signal.getsignal(signal.SIGTERM)

    def _on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    in_main = sb._in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with Cluster(proxy_mode=proxy_mode) as cluster:
            yield cluster
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
