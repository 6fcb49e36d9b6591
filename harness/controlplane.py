"""A real Kubernetes control plane for the tests: etcd and kube-apiserver in a network namespace of their own.

    with ControlPlane() as cp:
        cp.kubectl("apply", "-f", "manifest.yaml")   # the pinned kubectl, as the admin
        with cp.inside():                            # this thread and the threads it starts reach cp.url
            watcher.start()
        cp.link(box.node)                            # a sandbox's node reaches cp.url, as a kubelet would

Everything runs inside the namespace ``nldsb-<run>-api``: etcd on 127.0.0.1:2379 (a fresh data dir),
kube-apiserver on port 6443 with certificates made here by ``openssl``, RBAC authorization, a
service-account signing key, static tokens for an admin and for the clients under test (both
``system:masters``), and an audit log of their requests (which list and watch requests a client sent, with
which resourceVersion). The namespace has no route out; :meth:`ControlPlane.link` adds a veth to a sandbox's
node namespace. :meth:`ControlPlane.stop` kills both processes and removes the namespace and the work
directory; the session's leak check finds what a crashed run left (the names carry the sandbox prefix).

The binaries are the ones ``scripts/setup-controlplane.sh`` built from the modules pinned under
``controlplane/``; the same script says where they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from harness import sandbox as sb
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[1]
API_IP = "10.250.0.10"  # the apiserver's address as the linked nodes see it (on the namespace's loopback)
PORT = 6443
ETCD = "http://127.0.0.1:2379"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN = "nldsb-admin"
CLIENT = (
    "nldsb-client"  # a second system:masters user for the clients under test, told apart in the audit log
)
_CLONE_NEWNET = 0x40000000
SA_DIR = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run/secrets/… in a pod: /var/run is /run


def pod_token_path(pid: int) -> Path:
    """The token file a process started with :meth:`ControlPlane.pod_credentials` reads (to rotate it)."""
    return Path(f"/proc/{pid}/root{SA_DIR}/token")


class ControlPlaneError(RuntimeError):
    """The control plane did not start, or a kubectl command failed (the message has its output)."""


@cache
def binaries() -> dict[str, Path]:
    """kube-apiserver, kubectl, etcd and helm, as ``scripts/setup-controlplane.sh --paths`` names them."""
    out = sb.run(["bash", str(REPO / "scripts" / "setup-controlplane.sh"), "--paths"])
    return {name: Path(path) for name, path in (line.split("=", 1) for line in out.split())}


def unavailable() -> str | None:
    """Why the control-plane tests cannot run here, or None."""
    missing = [str(p) for p in binaries().values() if not os.access(p, os.X_OK)]
    if missing:
        return f"needs {', '.join(missing)} (run make setup)"
    if shutil.which("openssl") is None:
        return "needs openssl (run make setup)"
    return None


def helm(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The pinned helm, with its cache, config and data in a throw-away directory (inside ``netns`` if
    given); raises ControlPlaneError with its output when it fails and ``check`` is set."""
    with tempfile.TemporaryDirectory(prefix="helm-") as home:
        env = {**os.environ, **{f"HELM_{d}_HOME": f"{home}/{d.lower()}" for d in ("CACHE", "CONFIG", "DATA")}}
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = subprocess.run([*prefix, str(binaries()["helm"]), *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)  # fmt: skip
    if check and proc.returncode != 0:
        raise ControlPlaneError(f"helm {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def started(**kwargs: Any) -> Iterator[ControlPlane]:
    """A started ControlPlane for a fixture (skipped, which CI counts as a failure, without the binaries)."""
    import pytest

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with ControlPlane(**kwargs) as cp:
        yield cp


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_kubeconfig(path: Path, server: str, token: str, ca: Path | None = None) -> Path:
    """A kubeconfig with one cluster (``ca`` verifies its certificate) and one user with a bearer token."""
    cluster: dict[str, str] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": "test", "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    return path


@dataclass
class ControlPlane(sb.Run):
    """etcd and kube-apiserver in a namespace of their own; a context manager (see the module docstring).

    ``uncached``: resources whose watches the apiserver serves straight from etcd (``--watch-cache-sizes
    RESOURCE#0``), so a watch from a resourceVersion etcd has compacted gets 410 Gone at once. With its
    watch cache (the default) the apiserver serves watches from its own window of recent events instead, and
    sends bookmarks."""

    uncached: Sequence[str] = ()
    apiserver_args: Sequence[str] = ()  # more kube-apiserver flags (a later flag overrides an earlier one)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    client_token: str = field(default_factory=lambda: secrets.token_hex(16))
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _links: int = field(default=0, init=False)
    _admin: Any = field(default=None, init=False)

    @property
    def namespace(self) -> str:
        return self.name("api")

    @property
    def url(self) -> str:
        """The apiserver for the clients under test: linked nodes and :meth:`inside` reach it there, and
        :meth:`drop_connections` cuts what is connected to it."""
        return f"https://{API_IP}:{PORT}"

    @property
    def local_url(self) -> str:
        """The apiserver for the test's own requests (kubectl, the admin), which nothing cuts."""
        return f"https://127.0.0.1:{PORT}"

    @property
    def ca(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    # Lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        sb.run(["ip", "netns", "add", self.namespace])
        sb.run(["ip", "-n", self.namespace, "link", "set", "lo", "up"])
        sb.run(["ip", "-n", self.namespace, "addr", "add", f"{API_IP}/32", "dev", "lo"])
        self._make_certificates()
        (self.workdir / "tokens.csv").write_text(
            "".join(f'{token},{user},{user},"system:masters"\n'
                    for token, user in ((self.admin_token, ADMIN), (self.client_token, CLIENT)))
        )  # fmt: skip
        # Every request of a client, once it completed (a watch: also when it started streaming), with the
        # response to a ConfigMap list or get (its resourceVersion); not the apiserver's own requests.
        (self.workdir / "audit-policy.yaml").write_text(
            json.dumps(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [
                        {"level": "None", "users": ["system:apiserver"]},
                        {
                            "level": "RequestResponse",
                            "verbs": ["list", "get"],
                            "resources": [{"group": "", "resources": ["configmaps"]}],
                        },
                        {"level": "Metadata"},
                    ],
                }
            )
        )
        self.write_kubeconfig(self.admin_kubeconfig, self.admin_token, self.local_url)
        self._start_etcd()
        self.start_apiserver()

    def stop(self) -> None:
        """Remove everything this control plane created. Safe to call twice and after a partial start."""
        if self._admin is not None:
            from agent.sources.api import close_api_client

            close_api_client(self._admin.api_client)
            self._admin = None
        sb.kill_all(self._procs)
        if self.namespace in sb._netns_list():
            sb.remove_namespace(self.namespace)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _popen(self, name: str, argv: Sequence[str]) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self._procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def _start_etcd(self) -> None:
        peer = "http://127.0.0.1:2380"
        self._popen("etcd", [
            str(binaries()["etcd"]), "--name", "default", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", ETCD, "--advertise-client-urls", ETCD,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}", "--log-level", "warn",
            "--unsafe-no-fsync",  # a throw-away store: no fsync latency under the machine's other load
        ])  # fmt: skip

    def start_apiserver(self, timeout: float = 30.0) -> None:
        """Start kube-apiserver (again, after :meth:`stop_apiserver`) and wait until it is ready."""
        w = self.workdir
        argv = [
            str(binaries()["kube-apiserver"]),
            "--bind-address=0.0.0.0", f"--secure-port={PORT}", f"--advertise-address={API_IP}",
            f"--etcd-servers={ETCD}",
            "--etcd-compaction-interval=0",  # etcd's history is compacted only when a test asks
            "--authorization-mode=RBAC",
            f"--token-auth-file={w / 'tokens.csv'}",
            f"--client-ca-file={self.ca}",
            f"--tls-cert-file={w / 'apiserver.crt'}", f"--tls-private-key-file={w / 'apiserver.key'}",
            f"--cert-dir={w / 'certs'}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            f"--audit-policy-file={w / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--profiling=false",
        ]  # fmt: skip
        if self.uncached:
            argv.append("--watch-cache-sizes=" + ",".join(f"{r}#0" for r in self.uncached))
        argv += self.apiserver_args
        self._popen("kube-apiserver", argv)
        if not poll(self._ready, timeout, every=0.1):
            raise ControlPlaneError(f"kube-apiserver not ready within {timeout}s:\n{self.log_tail()}")

    def stop_apiserver(self) -> None:
        """Kill kube-apiserver (etcd keeps running): every open connection to it drops."""
        proc = self._procs.pop("kube-apiserver")
        proc.kill()
        proc.wait(timeout=5)

    def _ready(self) -> bool:
        proc = self._procs["kube-apiserver"]
        if proc.poll() is not None:
            raise ControlPlaneError(f"kube-apiserver exited {proc.returncode}:\n{self.log_tail()}")
        try:
            # Ready, and the bootstrap has created the kube-system namespace.
            return self.get("/readyz")[0] == 200 and self.get("/api/v1/namespaces/kube-system")[0] == 200
        except OSError:
            return False

    def log_tail(self, name: str = "kube-apiserver", lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _make_certificates(self) -> None:
        """A CA, the apiserver's serving certificate (its names inside the namespace and on the nodes) and
        the service-account signing key, all EC P-256."""
        w = self.workdir
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        sb.run(["openssl", "req", "-x509", *ec, "-keyout", str(w / "ca.key"), "-out", str(self.ca),
                "-days", "2", "-subj", "/CN=nldsb-ca"])  # fmt: skip
        names = f"IP:127.0.0.1,IP:{API_IP},IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc"
        sb.run(["openssl", "req", "-x509", *ec, "-keyout", str(w / "apiserver.key"),
                "-out", str(w / "apiserver.crt"), "-days", "2", "-subj", "/CN=kube-apiserver",
                "-CA", str(self.ca), "-CAkey", str(w / "ca.key"),
                "-addext", f"subjectAltName={names}", "-addext", "basicConstraints=CA:FALSE",
                "-addext", "extendedKeyUsage=serverAuth"])  # fmt: skip
        sb.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-out", str(w / "sa.key")])  # fmt: skip
        sb.run(["openssl", "pkey", "-in", str(w / "sa.key"), "-pubout", "-out", str(w / "sa.pub")])

    # Reaching it -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run this thread in the control plane's namespace for the block: sockets it opens, and threads it
        starts, reach the apiserver at :attr:`local_url` and etcd (they stay there after the block)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.namespace}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        """A GET from inside the namespace: (HTTP status, the decoded JSON or text body)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        with self.inside():
            conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=context, timeout=5)
            conn.connect()  # the socket is made here, in the namespace
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token or self.admin_token}"})
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        with contextlib.suppress(ValueError):
            return resp.status, json.loads(body)
        return resp.status, body

    def etcd(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """A call to etcd's JSON gateway (``/v3/...``) from inside the namespace."""
        with self.inside():
            conn = http.client.HTTPConnection("127.0.0.1", 2379, timeout=10)
            conn.connect()
        try:
            conn.request("POST", method, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read().decode()
        finally:
            conn.close()
        if resp.status != 200:
            raise ControlPlaneError(f"etcd {method}: HTTP {resp.status}: {data}")
        result: dict[str, Any] = json.loads(data)
        return result

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (physically); returns that revision."""
        revision = int(self.etcd("/v3/kv/range", {"key": "AA==", "limit": 1})["header"]["revision"])
        self.etcd("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> str:
        """Our pinned kubectl, run inside the namespace as the admin (or with ``kubeconfig``)."""
        argv = ["ip", "netns", "exec", self.namespace, str(binaries()["kubectl"]),
                f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout + (proc.stderr if not check else "")

    def helm(self, *args: str) -> str:
        """The pinned helm against this apiserver, as the admin."""
        return helm(*args, f"--kubeconfig={self.admin_kubeconfig}", netns=self.namespace).stdout

    def write_kubeconfig(self, path: Path, token: str, server: str | None = None) -> Path:
        return write_kubeconfig(path, server or self.local_url, token, self.ca)

    def link(self, node_ns: str) -> str:
        """A veth from ``node_ns`` to the control plane: the node reaches the apiserver at :attr:`url`,
        from the address returned. The link goes away with either namespace."""
        self._links += 1
        n = self._links
        node_side, api_side = f"10.250.{n}.1", f"10.250.{n}.2"
        sb.run(["ip", "-n", node_ns, "link", "add", f"api{n}", "type", "veth", "peer", "name", f"node{n}",
                "netns", self.namespace])  # fmt: skip
        for ns, dev, addr in ((node_ns, f"api{n}", node_side), (self.namespace, f"node{n}", api_side)):
            sb.run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            sb.run(["ip", "-n", ns, "link", "set", dev, "up"])
        sb.run(["ip", "-n", node_ns, "route", "add", f"{API_IP}/32", "via", api_side])
        return node_side

    def drop_connections(self) -> str:
        """Reset every TCP connection to :attr:`url` (``ss -K``: both ends see it abort, as when a load
        balancer or a restarting apiserver drops it); returns what was cut."""
        return sb.run(["ip", "netns", "exec", self.namespace, "ss", "-K", "-t",
                       f"dst {API_IP}:{PORT} or src {API_IP}:{PORT}"])  # fmt: skip

    def iptables(self, *args: str) -> None:
        """iptables in the control plane's namespace (to hold up or refuse its clients' connections)."""
        sb.run(["ip", "netns", "exec", self.namespace, "iptables-nft", *args])

    def pod_credentials(self, token_dir: Path) -> tuple[list[str], dict[str, str]]:
        """What the kubelet gives a pod with a service-account token: ``token_dir``'s ``token`` and ``ca.crt``
        at /var/run/secrets/kubernetes.io/serviceaccount, and ``KUBERNETES_SERVICE_HOST``/``_PORT``.

        Returns an argv prefix and the environment for a command run with ``ip netns exec`` (which gives it a
        mount namespace of its own that propagates nothing back): the prefix mounts a tmpfs on /run there,
        copies the files in and execs the command. The files are then at :func:`pod_token_path`."""
        (token_dir / "ca.crt").write_bytes(self.ca.read_bytes())
        script = (
            f"mount -t tmpfs -o size=1m tmpfs /run && mkdir -p {SA_DIR} && "
            f'cp "$0/token" "$0/ca.crt" {SA_DIR}/ && exec "$@"'
        )
        env = {"KUBERNETES_SERVICE_HOST": API_IP, "KUBERNETES_SERVICE_PORT": str(PORT)}
        return ["sh", "-c", script, str(token_dir)], env

    # Changing the cluster as the admin ------------------------------------------------------------------
    def _core(self) -> Any:
        from kubernetes import client

        from agent.sources.api import api_client

        if self._admin is None:
            self._admin = client.CoreV1Api(api_client(self.admin_kubeconfig))
        return self._admin

    def create_namespace(self, name: str) -> None:
        with self.inside():
            self._core().create_namespace({"metadata": {"name": name}})

    def set_configmap(self, namespace: str, name: str, data: dict[str, str]) -> int:
        """Create or replace a ConfigMap; returns its new resourceVersion."""
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"name": name, "namespace": namespace}, "data": data}
        with self.inside():
            try:
                obj = self._core().replace_namespaced_config_map(name, namespace, body)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                obj = self._core().create_namespaced_config_map(namespace, body)
        return int(obj.metadata.resource_version)

    def delete_configmap(self, namespace: str, name: str) -> None:
        with self.inside():
            self._core().delete_namespaced_config_map(name, namespace)

    def create_service(self, namespace: str, name: str, cluster_ip: str | None = None) -> str:
        """A Service with one DNS port and its clusterIP: ``cluster_ip``, or one the apiserver allocates
        (``"None"`` makes it headless)."""
        spec: dict[str, Any] = {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
        if cluster_ip is not None:
            spec["clusterIP"] = cluster_ip
        with self.inside():
            obj = self._core().create_namespaced_service(
                namespace, {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
            )
        return str(obj.spec.cluster_ip)

    # What clients did --------------------------------------------------------------------------------
    def audit(self, user: str | None = None) -> list[dict[str, Any]]:
        """The audit events so far (a request's ``ResponseComplete``, a watch's ``ResponseStarted`` too),
        optionally only ``user``'s."""
        if not self.audit_log.exists():
            return []
        events = [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]
        return [e for e in events if user is None or e["user"].get("username") == user]
