"""The node sandbox: one Kubernetes node reproduced with network namespaces.

Used by the integration tests, the demo and the benchmarks. Layout (every name carries a per-run prefix, so
two runs never collide):

    pod-N  --veth--+
    kube-dns --veth-- node (router, kube-proxy-like DNAT, where the agent runs)
    stub   --veth--+

- ``node`` forwards between the others and DNATs the kube-dns ClusterIP and the kube-dns-upstream ClusterIP
  (UDP and TCP, IPv4 and IPv6) to the kube-dns pod, with iptables-legacy or iptables-nft as asked.
- ``kube-dns`` runs a real CoreDNS serving ``cluster.local``, the reverse zones and a ``.`` zone of its own.
- ``stub`` runs a real CoreDNS serving ``acme.local`` on ports 53 and 5353.
- each namespace has its own ``/etc/netns/NAME/resolv.conf``; nothing has a route out of the sandbox.

Everything is removed by :meth:`Sandbox.stop`, which the context manager calls on exit, on exceptions and on
Ctrl-C; :func:`leftovers` finds anything a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

from harness.waiting import poll

Flavour = Literal["legacy", "nft"]

PREFIX = "nldsb"
# Run ids of the sandboxes this process created, so a leak check looks only at its own.
CREATED_RUNS: set[str] = set()
COREDNS = os.environ.get("COREDNS_BINARY", "/usr/local/bin/coredns")

CLUSTER_DOMAIN = "cluster.local"
KUBE_DNS_IP = "10.96.0.10"
KUBE_DNS_UPSTREAM_IP = "10.96.0.11"
KUBE_DNS_IP6 = "fd00:96::a"
KUBE_DNS_UPSTREAM_IP6 = "fd00:96::b"
SERVICE_NET = "10.96.0.0/12"
SERVICE_NET6 = "fd00:96::/64"
LOCAL_IP = "169.254.20.10"
LOCAL_IP6 = "fd00::10"
STUB_DOMAIN = "acme.local"

# Link subnets: node is .1 / ::1 on every link, the peer is .10 / ::10.
KUBE_DNS_NET = 1
STUB_NET = 2
FIRST_POD_NET = 10


def _v4(net: int, host: int) -> str:
    return f"10.244.{net}.{host}"


def _v6(net: int, host: int) -> str:
    return f"fd00:244:{net:x}::{host:x}"


@dataclass(frozen=True)
class Services:
    """The Services of the sandbox's cluster and the addresses they resolve to (what tests assert on)."""

    records: dict[str, str] = field(
        default_factory=lambda: {
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}": "10.96.0.1",
            f"kube-dns.kube-system.svc.{CLUSTER_DOMAIN}": KUBE_DNS_IP,
            f"kube-dns-upstream.kube-system.svc.{CLUSTER_DOMAIN}": KUBE_DNS_UPSTREAM_IP,
            f"web.default.svc.{CLUSTER_DOMAIN}": "10.96.10.20",
            f"db.prod.svc.{CLUSTER_DOMAIN}": "10.96.20.30",
        }
    )
    headless: dict[str, list[str]] = field(
        default_factory=lambda: {
            f"cassandra.prod.svc.{CLUSTER_DOMAIN}": ["10.244.50.11", "10.244.50.12", "10.244.50.13"],
        }
    )
    external: dict[str, str] = field(
        default_factory=lambda: {"example.org": "192.0.2.80", "www.example.org": "192.0.2.81"}
    )
    stub: dict[str, str] = field(
        default_factory=lambda: {f"www.{STUB_DOMAIN}": "198.51.100.7", f"api.{STUB_DOMAIN}": "198.51.100.8"}
    )
    # Services whose records have a 1 s TTL: a cache keeps them for its minimum TTL (CoreDNS's 5 s), so they
    # expire soon after they were asked (the serve-stale tests and benchmark).
    short_lived: dict[str, str] = field(
        default_factory=lambda: {
            f"flaky-{i}.default.svc.{CLUSTER_DOMAIN}": f"10.96.30.{i}" for i in range(1, 21)
        }
    )


SERVICES = Services()
# Every name under this domain answers (a wildcard record): as many distinct names as a benchmark needs, e.g.
# to count what the cache sends on to kube-dns.
BULK_DOMAIN, BULK_IP = f"bulk.svc.{CLUSTER_DOMAIN}", "10.96.40.1"
# kube-dns's own metrics in its namespace (coredns_dns_requests_total: the queries that reached it).
KUBE_DNS_METRICS = "127.0.0.1:9153"


class SandboxError(RuntimeError):
    """A sandbox command failed; the message carries the command and its output."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command, return its stdout; raise SandboxError with its stderr when it fails and check is set."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _netns_list() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL every process living in namespace ``ns`` and wait until they are gone (bounded)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def kill_all(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGKILL the processes, wait for each (bounded) and forget them."""
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    procs.clear()


def remove_namespace(ns: str) -> None:
    _kill_netns_processes(ns)
    run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


# The servers the sandbox and the control plane (harness/controlplane.py) run with their work dir in argv.
SERVERS = (b"coredns", b"etcd", b"kube-apiserver")


def leftovers(run_ids: set[str] | None = None) -> list[str]:
    """What sandbox runs left behind: namespaces, /etc/netns dirs, work dirs and server processes.

    ``run_ids`` limits the search to those runs (a concurrent run's live sandbox is not a leak)."""
    prefixes = tuple(f"{PREFIX}-{r}-" for r in run_ids) if run_ids is not None else (PREFIX,)
    found = [f"namespace {ns}" for ns in _netns_list() if ns.startswith(prefixes)]
    netns_dir = Path("/etc/netns")
    if netns_dir.is_dir():
        found += [f"/etc/netns/{d.name}" for d in netns_dir.iterdir() if d.name.startswith(prefixes)]
    tmp = Path(tempfile.gettempdir())
    found += [f"work dir {d}" for d in tmp.iterdir() if d.name.startswith(prefixes)]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(SERVERS)
            and any(p.encode() in a for a in cmdline for p in prefixes)
        ):
            name = Path(cmdline[0].decode(errors="replace")).name
            found.append(f"{name} pid {proc.name}: {b' '.join(cmdline).decode(errors='replace')}")
    return found


def remove_leftovers_of(run_ids: set[str]) -> None:
    """Remove what the given runs left (only their prefixed objects, never anything else)."""
    prefixes = tuple(f"{PREFIX}-{r}-" for r in run_ids)
    for ns in _netns_list():
        if ns.startswith(prefixes):
            remove_namespace(ns)
    for parent in (Path("/etc/netns"), Path(tempfile.gettempdir())):
        if parent.is_dir():
            for d in parent.iterdir():
                if d.name.startswith(prefixes):
                    shutil.rmtree(d, ignore_errors=True)


@dataclass(kw_only=True)
class Run:
    """What one run creates carries ``PREFIX-<run_id>-`` (namespaces, the work dir), so the leak check finds
    it. A context manager: ``start()`` on entry (``stop()`` if it fails), ``stop()`` on exit."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    workdir: Path = field(init=False)

    def __post_init__(self) -> None:
        CREATED_RUNS.add(self.run_id)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.run_id}-"))

    def name(self, what: str) -> str:
        return f"{PREFIX}-{self.run_id}-{what}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Sandbox(Run):
    """One node and its neighbours. Use as a context manager; see the module docstring."""

    flavour: Flavour = "nft"
    pods: int = 1
    _created: list[str] = field(default_factory=list, init=False)
    _servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)

    # Names and addresses -------------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return self.name("node")

    @property
    def kube_dns(self) -> str:
        return self.name("kubedns")

    @property
    def stub(self) -> str:
        return self.name("stub")

    def pod(self, index: int = 0) -> str:
        return self.name(f"pod{index}")

    @property
    def all_namespaces(self) -> list[str]:
        return [self.node, self.kube_dns, self.stub] + [self.pod(i) for i in range(self.pods)]

    kube_dns_pod_ip = _v4(KUBE_DNS_NET, 10)
    kube_dns_pod_ip6 = _v6(KUBE_DNS_NET, 0x10)
    stub_ip = _v4(STUB_NET, 10)
    stub_ip6 = _v6(STUB_NET, 0x10)

    def pod_ip(self, index: int = 0) -> str:
        return _v4(FIRST_POD_NET + index, 10)

    def pod_ip6(self, index: int = 0) -> str:
        return _v6(FIRST_POD_NET + index, 0x10)

    # Running things inside ----------------------------------------------------------------------------
    def exec(self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
        """Run ``argv`` inside namespace ``ns`` (with its /etc/netns files) and return stdout."""
        return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``ns``; the caller owns the process (stop() kills it anyway)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)  # type: ignore[call-overload, no-any-return]

    def iptables(self, family: int = 4) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        return f"{base}-{self.flavour}"

    def save_rules(self, family: int = 4, flavour: Flavour | None = None) -> str:
        """``iptables-save`` of the node in the given flavour, with counters and timestamp lines removed."""
        base = "iptables" if family == 4 else "ip6tables"
        out = self.exec(self.node, [f"{base}-{flavour or self.flavour}-save"])
        return "\n".join(
            line.split(" [")[0] if line.startswith(":") else line
            for line in out.splitlines()
            if not line.startswith("#")
        )

    def install_node_cache_rules(
        self, addresses: Sequence[str], *, dns_port: int = 53, health_port: int = 8080
    ) -> None:
        """node-cache's rule set for ``addresses``, written as node-cache writes it: one ``iptables -I`` per
        rule (kubernetes' iptables util, ``EnsureRule(Prepend, …)``), the arguments in its order. The rule
        specs are facts from kubernetes-sigs/node-local-dns cmd/node-cache/app/cache_app.go (initIptables)."""
        skip, allow = "NodeLocal DNS Cache: skip conntrack", "NodeLocal DNS Cache: allow DNS traffic"
        dns, health = str(dns_port), str(health_port)
        # (table, chain, protocol, address match, port match, port, target, comment), in node-cache's order.
        shapes = [
            shape
            for proto in ("tcp", "udp")
            for shape in (
                ("raw", "PREROUTING", proto, "-d", "--dport", dns, "NOTRACK", skip),
                ("filter", "INPUT", proto, "-d", "--dport", dns, "ACCEPT", allow),
                ("raw", "OUTPUT", proto, "-s", "--sport", dns, "NOTRACK", skip),
                ("filter", "OUTPUT", proto, "-s", "--sport", dns, "ACCEPT", allow),
                ("raw", "OUTPUT", proto, "-d", "--dport", dns, "NOTRACK", skip),
            )
        ]
        shapes += [
            ("raw", "OUTPUT", "tcp", "-d", "--dport", health, "NOTRACK", skip),
            ("raw", "OUTPUT", "tcp", "-s", "--sport", health, "NOTRACK", skip),
        ]
        for address in addresses:
            iptables = self.iptables(6 if ":" in address else 4)
            for table, chain, proto, where, port_match, port, target, comment in shapes:
                args = ["-p", proto, where, address, port_match, port, "-j", target, "-m", "comment",
                        "--comment", comment]  # fmt: skip
                self.exec(self.node, [iptables, "-w", "5", "-t", table, "-I", chain, *args])

    def http_get(self, ns: str, url: str, *, timeout: float = 2.0) -> str:
        """The body of a GET of ``url`` from inside ``ns`` (loopback or sandbox addresses only)."""
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout={timeout}).read().decode())"
        return self.exec(ns, [sys.executable, "-c", code])

    def conntrack(self, *args: str) -> str:
        """``conntrack -L`` in the node, with filter arguments such as ``-p udp --orig-dst 10.96.0.10``."""
        return self.exec(self.node, ["conntrack", "-L", *args], check=False)

    def flush_conntrack(self) -> None:
        self.exec(self.node, ["conntrack", "-F"], check=False)

    # Lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for ns in self.all_namespaces:
            self._add_namespace(ns)
        self._link(self.kube_dns, KUBE_DNS_NET, "kdns0")
        self._link(self.stub, STUB_NET, "stub0")
        for i in range(self.pods):
            self._link(self.pod(i), FIRST_POD_NET + i, f"pod{i}")
        self._sysctl(self.node, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # A real node reaches the Service range through its default route; here, through the kube-dns link
        # (locally generated packets need a route before the OUTPUT DNAT rewrites them).
        run(["ip", "-n", self.node, "route", "add", SERVICE_NET, "via", self.kube_dns_pod_ip])
        run(["ip", "-n", self.node, "-6", "route", "add", SERVICE_NET6, "via", self.kube_dns_pod_ip6])
        self._write_resolv_confs()
        self._install_kube_proxy()
        self._start_kube_dns()
        self._start_stub()
        # Wait until every path answers (this also settles IPv6 neighbour discovery), then start from an
        # empty conntrack table so tests see only their own flows.
        probe = f"kube-dns.kube-system.svc.{CLUSTER_DOMAIN}"
        for server in (self.kube_dns_pod_ip, self.kube_dns_pod_ip6, KUBE_DNS_IP, KUBE_DNS_IP6):
            self.wait_for_dns(self.node, server, probe)
        for server in (self.stub_ip, self.stub_ip6):
            self.wait_for_dns(self.node, server, f"www.{STUB_DOMAIN}")
        for i in range(self.pods):
            for server in (KUBE_DNS_IP, KUBE_DNS_IP6, self.stub_ip):
                self.wait_for_dns(
                    self.pod(i), server, probe if server != self.stub_ip else f"www.{STUB_DOMAIN}"
                )
        self.flush_conntrack()

    def stop(self) -> None:
        """Remove everything this sandbox created. Safe to call twice and after a partial start."""
        kill_all(self._servers)
        for ns in reversed(self._created):
            remove_namespace(ns)
        self._created.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # Building blocks ---------------------------------------------------------------------------------
    def _add_namespace(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._created.append(ns)
        Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Addresses usable at once: no IPv6 duplicate address detection inside the sandbox.
        self._sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    def _sysctl(self, ns: str, *settings: str) -> None:
        self.exec(ns, ["sysctl", "-q", "-w", *settings])

    def _link(self, peer_ns: str, net: int, node_side: str) -> None:
        """A veth pair node:<node_side> <-> peer:eth0, addresses on both, default routes via the node."""
        run(["ip", "-n", self.node, "link", "add", node_side, "type", "veth", "peer", "name", "eth0",
             "netns", peer_ns])  # fmt: skip
        for ns, dev, host in ((self.node, node_side, 1), (peer_ns, "eth0", 0x10)):
            run(["ip", "-n", ns, "addr", "add", f"{_v4(net, 10 if host == 0x10 else 1)}/24", "dev", dev])
            run(["ip", "-n", ns, "addr", "add", f"{_v6(net, host)}/64", "dev", dev, "nodad"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        run(["ip", "-n", peer_ns, "route", "add", "default", "via", _v4(net, 1)])
        run(["ip", "-n", peer_ns, "-6", "route", "add", "default", "via", _v6(net, 1)])

    def _write_resolv_confs(self) -> None:
        pod_conf = (
            f"nameserver {KUBE_DNS_IP}\n"
            f"search default.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\n"
            "options ndots:5 timeout:1 attempts:2\n"
        )
        # The node's upstream resolver is the sandbox's own kube-dns pod (its "." zone plays the Internet).
        node_conf = f"nameserver {self.kube_dns_pod_ip}\noptions timeout:1 attempts:2\n"
        for ns in self.all_namespaces:
            conf = pod_conf if ns.startswith(f"{PREFIX}-{self.run_id}-pod") else node_conf
            Path(f"/etc/netns/{ns}/resolv.conf").write_text(conf)

    def _install_kube_proxy(self) -> None:
        """kube-proxy's iptables-mode shape for the two DNS Services, plus the kubelet canary chain."""
        for family, (cluster_ip, upstream_ip, backend) in (
            (4, (KUBE_DNS_IP, KUBE_DNS_UPSTREAM_IP, self.kube_dns_pod_ip)),
            (6, (KUBE_DNS_IP6, KUBE_DNS_UPSTREAM_IP6, self.kube_dns_pod_ip6)),
        ):
            to = backend if family == 4 else f"[{backend}]"
            lines = [
                "*mangle",
                ":KUBE-KUBELET-CANARY - [0:0]",
                "COMMIT",
                "*nat",
                ":KUBE-SERVICES - [0:0]",
                '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            ]
            for ip in (cluster_ip, upstream_ip):
                for proto in ("udp", "tcp"):
                    lines.append(
                        f"-A KUBE-SERVICES -d {ip} -p {proto} -m {proto} --dport 53 "
                        f"-j DNAT --to-destination {to}:53"
                    )
            lines.append("COMMIT")
            restore = ("iptables" if family == 4 else "ip6tables") + f"-{self.flavour}-restore"
            run(["ip", "netns", "exec", self.node, restore, "--noflush"], input="\n".join(lines) + "\n")

    def _start_server(self, ns: str, name: str, corefile: str) -> None:
        conf = self.workdir / f"Corefile.{name}"
        conf.write_text(corefile)
        with (self.workdir / f"{name}.log").open("wb") as log:
            self._servers[name] = self.popen(
                ns, [COREDNS, "-conf", str(conf), "-pidfile", str(self.workdir / f"{name}.pid")],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir),
            )  # fmt: skip

    def _start_kube_dns(self) -> None:
        zones = self.workdir / "zones"
        zones.mkdir()
        s = SERVICES
        cluster = [f"{name}. 30 IN A {ip}" for name, ip in sorted(s.records.items())]
        for name, ips in sorted(s.headless.items()):
            cluster += [f"{name}. 30 IN A {ip}" for ip in ips]
            cluster += [
                f"_cql._tcp.{name}. 30 IN SRV 0 33 9042 cassandra-{i}.{name}." for i in range(len(ips))
            ]
            cluster += [f"cassandra-{i}.{name}. 30 IN A {ip}" for i, ip in enumerate(ips)]
        cluster += [f"{name}. 1 IN A {ip}" for name, ip in sorted(s.short_lived.items())]
        cluster.append(f"*.{BULK_DOMAIN}. 30 IN A {BULK_IP}")
        cluster.append(f"_https._tcp.kubernetes.default.svc.{CLUSTER_DOMAIN}. 30 IN SRV 0 100 443 "
                       f"kubernetes.default.svc.{CLUSTER_DOMAIN}.")  # fmt: skip
        reverse = [
            f"{'.'.join(reversed(ip.split('.')))}.in-addr.arpa. 30 IN PTR {name}."
            for name, ip in sorted(s.records.items())
        ]
        external = [f"{name}. 300 IN A {ip}" for name, ip in sorted(s.external.items())]
        for zone, records in (
            (CLUSTER_DOMAIN, cluster),
            ("in-addr.arpa", reverse),
            ("ip6.arpa", []),
            (".", external),
        ):
            origin = "root" if zone == "." else zone
            (zones / f"db.{origin}").write_text(_zone_file(zone.rstrip(".") + ".", records))
        blocks = [
            f"{zone}:53 {{\n    errors\n    prometheus {KUBE_DNS_METRICS}\n"
            f"    file {zones}/db.{'root' if zone == '.' else zone} {zone}\n}}\n"
            for zone in (CLUSTER_DOMAIN, "in-addr.arpa", "ip6.arpa", ".")
        ]
        self._start_server(self.kube_dns, "kube-dns", "".join(blocks))

    def _start_stub(self) -> None:
        zone = self.workdir / f"db.{STUB_DOMAIN}"
        records = [f"{name}. 30 IN A {ip}" for name, ip in sorted(SERVICES.stub.items())]
        zone.write_text(_zone_file(f"{STUB_DOMAIN}.", records))
        corefile = "".join(
            f"{STUB_DOMAIN}:{port} {{\n    errors\n    file {zone} {STUB_DOMAIN}\n}}\n" for port in (53, 5353)
        )
        self._start_server(self.stub, "stub", corefile)

    def kube_dns_queries(self) -> int:
        """The queries kube-dns has received so far (its own count, every zone and protocol)."""
        text = self.http_get(self.kube_dns, f"http://{KUBE_DNS_METRICS}/metrics")
        return round(sum(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("coredns_dns_requests_total{")))  # fmt: skip

    def wait_for_dns(self, ns: str, server: str, name: str, *, timeout: float = 10, tcp: bool = False) -> str:
        """Query ``name`` at ``server`` from ``ns`` with dig until it answers; return the answer."""
        answer = poll(lambda: self.dig(ns, server, name, tcp=tcp, check=False), timeout, every=0.1)
        if answer:
            return answer
        raise SandboxError(f"{server} did not answer {name} from {ns} within {timeout}s")

    def dig(self, ns: str, server: str, name: str, rtype: str = "A", *, tcp: bool = False,
            check: bool = True, port: int = 53) -> str:  # fmt: skip
        """``dig +short`` from ``ns``; one try, one second. No answer (or a failure) gives ""."""
        argv = ["dig", f"@{server}", "-p", str(port), name, rtype, "+short", "+time=1", "+tries=1"]
        if tcp:
            argv.append("+tcp")
        out = self.exec(ns, argv, check=check)
        # dig prints its errors (";; communications error …") on stdout too.
        return "\n".join(line for line in out.splitlines() if line and not line.startswith(";")).strip()


def _zone_file(origin: str, records: list[str]) -> str:
    suffix = "" if origin == "." else origin
    soa = f"{origin} 30 IN SOA ns.dns.{suffix} hostmaster.{suffix} 1 7200 1800 86400 30"
    ns = f"{origin} 30 IN NS ns.dns.{suffix}"
    return "\n".join([f"$ORIGIN {origin}", soa, ns, *records]) + "\n"


@contextlib.contextmanager
def sandbox(flavour: Flavour = "nft", pods: int = 1) -> Iterator[Sandbox]:
    """A started sandbox, removed on the way out (also on Ctrl-C: SIGTERM is turned into an exception)."""
    previous = signal.getsignal(signal.SIGTERM)

    def _on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with Sandbox(flavour=flavour, pods=pods) as sb:
            yield sb
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
