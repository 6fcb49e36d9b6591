"""The real node-cache (the program the agent replaces) in a node sandbox, as the benchmarks' baseline.

The binary is node-cache 1.26.7 built from the upstream kubernetes/dns tag, kept beside the repository in
``../shared/bin/node-cache`` (its README there gives the build and the sha256); ``NODE_CACHE_BINARY`` names
another. It is never copied into the repository. :func:`unavailable` says why it cannot run.

node-cache is started as the upstream DaemonSet starts it (``-localip LOCAL,CLUSTER -conf …
-upstreamsvc kube-dns-upstream`` with ``KUBE_DNS_UPSTREAM_SERVICE_HOST`` set), with every path moved into
the sandbox's work directory so it never writes the host's ``/etc``. Two things differ from a real node,
both because of the sandbox, not of node-cache:

- this kernel has no dummy link driver, so node-cache cannot create ``nodelocaldns`` (it logs "operation not
  supported" and CoreDNS exits on the bind). An empty bridge of that name is created first; node-cache finds
  it and adds its addresses, as it does with an existing dummy link.

node-cache runs ``iptables`` from ``PATH``; a directory of links to the sandbox's flavour (``iptables-nft`` or
``iptables-legacy``) is put first on its ``PATH`` so it writes the same backend as the sandbox's kube-proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.sandbox import (
    KUBE_DNS_IP,
    KUBE_DNS_UPSTREAM_IP,
    LOCAL_IP,
    Sandbox,
    SandboxError,
)

REPO = Path(__file__).resolve().parents[1]
NODE_CACHE_BINARY = os.environ.get("NODE_CACHE_BINARY", str(REPO.parent / "shared" / "bin" / "node-cache"))
# The version the figures in docs/benchmarks.md were taken with (kubernetes/dns tag 1.26.7, CoreDNS v1.13.1
# inside).
NODE_CACHE_VERSION = "1.26.7"
INTERFACE = "nodelocaldns"
HEALTH_PORT = 8080
METRICS_PORT = 9253
# node-cache tags every rule it owns with one of these two comments.
RULE_COMMENTS = ("NodeLocal DNS Cache: skip conntrack", "NodeLocal DNS Cache: allow DNS traffic")
# Per local address: 4 raw PREROUTING/OUTPUT pairs for DNS, 2 for the health port, 4 filter ACCEPTs.
RULES_PER_ADDRESS = 12
PROBE_NAME = "kube-dns.kube-system.svc.cluster.local"


class NodeCacheError(RuntimeError):
    """node-cache did not start, or did not become ready; the message carries the tail of its log."""


def unavailable(binary: str | None = None) -> str | None:
    """Why node-cache cannot be run here, or None when it can. Never runs the binary: node-cache sets up
    networking in its ``init()``, even for ``-h``, so it may only ever run inside a sandbox namespace."""
    path = binary or NODE_CACHE_BINARY
    if not os.access(path, os.X_OK):
        return (
            f"no node-cache binary at {path}: put node-cache 1.26.7 there (../shared/bin beside the "
            "repository) or set NODE_CACHE_BINARY"
        )
    return None


def base_corefile(local_ip: str = LOCAL_IP) -> str:
    """A node-local-dns ConfigMap ``Corefile`` in the shape of the upstream manifest, pillars left for
    node-cache to fill: ``__PILLAR__LOCAL__DNS__`` (its listen addresses), ``__PILLAR__CLUSTER__DNS__``
    (kube-dns-upstream), ``__PILLAR__UPSTREAM__SERVERS__`` (``/etc/resolv.conf``, the sandbox's own)."""
    cluster_cache = "cache {\n        success 9984 30\n        denial 9984 5\n    }"
    blocks = []
    for zone in ("cluster.local", "in-addr.arpa", "ip6.arpa"):
        health = f"\n    health {local_ip}:{HEALTH_PORT}" if zone == "cluster.local" else ""
        blocks.append(
            f"{zone}:53 {{\n    errors\n    {cluster_cache}\n    reload\n    loop\n"
            f"    bind __PILLAR__LOCAL__DNS__\n"
            f"    forward . __PILLAR__CLUSTER__DNS__ {{\n        force_tcp\n    }}\n"
            f"    prometheus :{METRICS_PORT}{health}\n}}\n"
        )
    blocks.append(
        ".:53 {\n    errors\n    cache 30\n    reload\n    loop\n    bind __PILLAR__LOCAL__DNS__\n"
        "    forward . __PILLAR__UPSTREAM__SERVERS__\n"
        f"    prometheus :{METRICS_PORT}\n}}\n"
    )
    return "".join(blocks)


@dataclass
class NodeCache:
    """A node-cache process in a sandbox's node namespace, made by :func:`start`. :meth:`stop` sends SIGTERM
    (node-cache removes its rules and the interface); :meth:`kill` sends SIGKILL (nothing is removed)."""

    box: Sandbox
    process: subprocess.Popen[bytes]
    workdir: Path
    local_ips: tuple[str, ...]
    _log: IO[bytes] | None = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "node-cache.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def rules(self) -> list[str]:
        """The node's rules carrying node-cache's comments, as ``iptables-save`` prints them, each prefixed
        with its table (``raw -A PREROUTING …``)."""
        found: list[str] = []
        table = ""
        for line in self.box.save_rules().splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif any(c in line for c in RULE_COMMENTS):
                found.append(f"{table} {line}")
        return found

    def answers(self, ns: str, server: str, name: str = PROBE_NAME) -> str:
        """One ``dig`` from ``ns``; the answer, or "" when nothing answered (dig's error text is not one)."""
        try:
            return self.box.dig(ns, server, name)
        except SandboxError:
            return ""

    def wait_ready(self, timeout: float = 15) -> None:
        """Until CoreDNS answers on every local address and node-cache has installed all its rules (it does so
        once the pidfile exists, polling it every second)."""
        deadline = time.monotonic() + timeout
        want = RULES_PER_ADDRESS * len(self.local_ips)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NodeCacheError(
                    f"node-cache exited {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            if len(self.rules()) >= want and all(self.answers(self.box.node, ip) for ip in self.local_ips):
                return
            time.sleep(0.1)
        raise NodeCacheError(
            f"node-cache not ready within {timeout}s ({len(self.rules())}/{want} rules):\n{self.log_tail()}"
        )

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL, as an OOM kill does: node-cache gets no chance to remove anything."""
        self.signal(signal.SIGKILL)
        return self._reap(5)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM (a DaemonSet rollout), then SIGKILL if it has not exited within ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self._reap(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def _reap(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _iptables_shim(box: Sandbox, directory: Path) -> Path:
    """Links named ``iptables``, ``iptables-save``… to the sandbox's flavour, for node-cache's ``PATH``."""
    directory.mkdir(exist_ok=True)
    for family in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            target = shutil.which(f"{family}-{box.flavour}{suffix}")
            if target is None:
                raise NodeCacheError(f"{family}-{box.flavour}{suffix} is not installed")
            link = directory / f"{family}{suffix}"
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return directory


def start(
    box: Sandbox,
    *,
    binary: str | None = None,
    local_ips: Sequence[str] = (LOCAL_IP, KUBE_DNS_IP),
    stub_domains: dict[str, list[str]] | None = None,
    setup_interface: bool = True,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    timeout: float = 15,
    cgroup: Path | None = None,
) -> NodeCache:
    """Start node-cache in ``box``'s node namespace with the upstream manifest's arguments; wait until it is
    ready unless ``wait`` is false. ``stub_domains`` becomes the kube-dns ConfigMap's ``stubDomains``. With
    ``setup_interface`` false, node-cache runs with ``-setupinterface=false`` and the addresses are put on the
    bridge here (then SIGTERM leaves the interface alone). With ``cgroup`` (a cgroup v1 directory), node-cache
    starts inside it, as in a container of its own."""
    path = binary or NODE_CACHE_BINARY
    reason = unavailable(path)
    if reason:
        raise NodeCacheError(reason)
    workdir = box.workdir / "node-cache"
    (workdir / "coredns").mkdir(parents=True, exist_ok=True)
    (workdir / "kube-dns").mkdir(exist_ok=True)
    (workdir / "coredns" / "Corefile.base").write_text(base_corefile(local_ips[0]))
    if stub_domains:
        (workdir / "kube-dns" / "stubDomains").write_text(json.dumps(stub_domains))
    shim = _iptables_shim(box, workdir / "bin")
    if not box.exec(box.node, ["ip", "-o", "link", "show", INTERFACE], check=False).strip():
        box.exec(box.node, ["ip", "link", "add", INTERFACE, "type", "bridge"])
    if not setup_interface:
        for ip in local_ips:
            prefix = 128 if ":" in ip else 32
            box.exec(box.node, ["ip", "addr", "replace", f"{ip}/{prefix}", "dev", INTERFACE])
    argv = [
        path,
        "-localip", ",".join(local_ips),
        "-conf", str(workdir / "Corefile"),
        "-basecorefile", str(workdir / "coredns" / "Corefile.base"),
        "-kubednscm", str(workdir / "kube-dns"),
        "-upstreamsvc", "kube-dns-upstream",
        "-pidfile", str(workdir / "node-cache.pid"),
        "-health-port", str(HEALTH_PORT),
        f"-setupinterface={'true' if setup_interface else 'false'}",
        *extra_args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{shim}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "KUBE_DNS_UPSTREAM_SERVICE_HOST": KUBE_DNS_UPSTREAM_IP,
    }
    log = (workdir / "node-cache.log").open("ab")
    try:
        if cgroup is None:
            process = box.popen(
                box.node, argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir)
            )
        else:  # enter the cgroup outside the namespace (`ip netns exec` remounts /sys), then exec: same pid
            enter = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
            process = subprocess.Popen([*enter, "ip", "netns", "exec", box.node, *argv], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=str(workdir))  # fmt: skip
    except BaseException:
        log.close()
        raise
    handle = NodeCache(box=box, process=process, workdir=workdir, local_ips=tuple(local_ips), _log=log)
    if wait:
        try:
            handle.wait_ready(timeout)
        except BaseException:
            handle.kill()
            raise
    return handle


@contextlib.contextmanager
def running(box: Sandbox, **kwargs: Any) -> Iterator[NodeCache]:
    """:func:`start`, and SIGKILL on the way out if the caller has not stopped it (the sandbox removes the
    namespace, and with it whatever node-cache left behind)."""
    handle = start(box, **kwargs)
    try:
        yield handle
    finally:
        if handle.process.poll() is None:
            handle.kill()
        else:
            handle._reap(1)
