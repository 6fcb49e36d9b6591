"""The built image, run by podman as the DaemonSet runs it, in a sandbox's node namespace.

Everything comes from ``image/nodelocaldns.yaml`` after the iptables-mode sed of docs/install.md, the way the
kubelet
would turn it into a container: the args (the image's entrypoint, the agent, is PID 1), the security context
(capabilities dropped and added, no privilege escalation), the volumes (the node-local-dns ConfigMap's
``Corefile`` as ``Corefile.base`` and the kube-dns ConfigMap, both as kubelet-style directories; the xtables
lock as a hostPath file, here a private one), the host network (the sandbox's node namespace), the grace
period and both probes. The kubelet also injects the Service environment (``KUBE_DNS_UPSTREAM_SERVICE_HOST``)
and, with ``dnsPolicy: Default``, the node's resolv.conf: the sandbox node's, never the machine's.

Containers are named ``nldsb-<run id>-…``, so the session's leak check (tests/conftest.py) finds any that a
test left behind; :class:`AgentContainer` removes its container on the way out, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from harness import sandbox as sb
from harness.configmapdir import publish
from harness.manifests import objects, run_sed
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[1]
PODMAN = str(REPO / "scripts" / "podman")  # podman with the project's private configuration
IMAGE = f"localhost/node-local-dns-agent:{__version__}"
# The Services the kubelet announces to the pod's environment (the DaemonSet runs in kube-system).
SERVICE_ENV = {
    "KUBE_DNS_SERVICE_HOST": sb.KUBE_DNS_IP,
    "KUBE_DNS_SERVICE_PORT": "53",
    "KUBE_DNS_UPSTREAM_SERVICE_HOST": sb.KUBE_DNS_UPSTREAM_IP,
    "KUBE_DNS_UPSTREAM_SERVICE_PORT": "53",
}


def podman(*args: str, check: bool = True, timeout: float = 60, cwd: Path | None = None) -> str:
    return sb.run([PODMAN, *args], check=check, timeout=timeout, cwd=cwd)


def podman_unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "needs podman (run make setup)"
    return None


_image_checked = False


def ensure_image() -> str:
    """The image of the working tree: scripts/build-image.sh builds it only when its build context changed
    since the stored image was built (``make setup`` has normally done that already)."""
    global _image_checked  # noqa: PLW0603 -- once per test session
    if not _image_checked:
        env = {**os.environ, "ENGINE": "podman", "IMAGE": IMAGE.removeprefix("localhost/")}
        build = subprocess.run(
            ["bash", str(REPO / "scripts" / "build-image.sh")],
            capture_output=True, text=True, timeout=900, env=env, check=False,
        )  # fmt: skip
        if build.returncode != 0:
            raise AssertionError(f"building {IMAGE} failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
        _image_checked = True
    return IMAGE


def leftovers(run_ids: set[str]) -> list[str]:
    """Containers of these sandbox runs that still exist."""
    if not run_ids or podman_unavailable():
        return []
    prefixes = tuple(f"{sb.PREFIX}-{r}-" for r in run_ids)
    names = podman("ps", "--all", "--format", "{{.Names}}", check=False).split()
    return [f"container {n}" for n in names if n.startswith(prefixes)]


def remove_leftovers_of(run_ids: set[str]) -> None:
    for leak in leftovers(run_ids):
        podman("rm", "--force", "--time", "0", leak.removeprefix("container "), check=False)


@dataclass(frozen=True)
class PodSpec:
    """What the kubelet takes from the DaemonSet's pod template, after the iptables-mode sed."""

    args: list[str]
    capabilities_drop: list[str]
    capabilities_add: list[str]
    allow_privilege_escalation: bool
    mounts: dict[str, str]  # volume name -> mountPath
    grace_period: int
    liveness: list[str]
    readiness: list[str]
    readiness_timeout: float
    liveness_timeout: float
    corefile: str

    @classmethod
    def from_manifest(cls, workdir: Path) -> PodSpec:
        objs = objects(run_sed("iptables", workdir))
        pod: dict[str, Any] = objs["DaemonSet/node-local-dns"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        security = container["securityContext"]
        probe = container["readinessProbe"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["xtables-lock"]["hostPath"]["path"] == "/run/xtables.lock"
        assert volumes["agents-lock"]["hostPath"]["path"] == "/run/node-local-dns-agents.lock"
        assert volumes["config-volume"]["configMap"]["items"] == [
            {"key": "Corefile", "path": "Corefile.base"}
        ]
        assert volumes["kube-dns-config"]["configMap"] == {"name": "kube-dns", "optional": True}
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "Default"
        return cls(
            args=list(container["args"]),
            capabilities_drop=list(security["capabilities"]["drop"]),
            capabilities_add=list(security["capabilities"]["add"]),
            allow_privilege_escalation=bool(security["allowPrivilegeEscalation"]),
            mounts={m["name"]: m["mountPath"] for m in container["volumeMounts"]},
            grace_period=int(pod["terminationGracePeriodSeconds"]),
            liveness=list(container["livenessProbe"]["exec"]["command"]),
            readiness=list(probe["exec"]["command"]),
            readiness_timeout=float(probe["timeoutSeconds"]),
            liveness_timeout=float(container["livenessProbe"]["timeoutSeconds"]),
            corefile=objs["ConfigMap/node-local-dns"]["data"]["Corefile"],
        )


class AgentContainer:
    """The DaemonSet's pod on the sandbox's node, run by podman. Use as a context manager."""

    def __init__(
        self,
        box: sb.Sandbox,
        *,
        name: str = "nodelocaldns",
        kubedns: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.box = box
        self.name = f"{sb.PREFIX}-{box.run_id}-{name}"
        self.spec = PodSpec.from_manifest(box.workdir)
        self.extra = list(extra)
        # The kubelet's volumes: ConfigMaps as atomic-writer directories, the lock as a hostPath FileOrCreate.
        self.corefile_dir = box.workdir / "node-local-dns-configmap"
        self.kubedns_dir = box.workdir / "kube-dns-configmap"
        self.xtables_lock = box.workdir / "xtables.lock"
        self.agents_lock = box.workdir / "agents.lock"  # every pod on the node shares it
        if not self.corefile_dir.exists():
            publish(self.corefile_dir, {"Corefile.base": self.spec.corefile})
        if not self.kubedns_dir.exists() or kubedns is not None:
            publish(self.kubedns_dir, kubedns or {})
        self.xtables_lock.touch()
        self.agents_lock.touch()

    def run_argv(self) -> list[str]:
        spec = self.spec
        mounts = spec.mounts
        argv = [
            "run", "--detach", "--name", self.name,
            "--network", f"ns:/run/netns/{self.box.node}",
            *(f"--cap-drop={c}" for c in spec.capabilities_drop),
            *(f"--cap-add={c}" for c in spec.capabilities_add),
            "--volume", f"{self.xtables_lock}:{mounts['xtables-lock']}",
            "--volume", f"{self.agents_lock}:{mounts['agents-lock']}",
            "--volume", f"{self.corefile_dir}:{mounts['config-volume']}:ro",
            "--volume", f"{self.kubedns_dir}:{mounts['kube-dns-config']}:ro",
            "--volume", f"/etc/netns/{self.box.node}/resolv.conf:/etc/resolv.conf:ro",
            *(f"--env={k}={v}" for k, v in SERVICE_ENV.items()),
        ]  # fmt: skip
        if not spec.allow_privilege_escalation:
            argv += ["--security-opt", "no-new-privileges"]
        return [*argv, *self.extra, ensure_image(), *spec.args]

    # Lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> AgentContainer:
        # conmon, which podman leaves in charge of the container, writes a file named "oom" into its working
        # directory when the container's cgroup sees an OOM kill: the sandbox's work directory, then.
        podman(*self.run_argv(), cwd=self.box.workdir)
        return self

    def __enter__(self) -> AgentContainer:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)

    def stop(self, grace: float | None = None) -> float:
        """``podman stop`` as the kubelet stops a pod: SIGTERM, SIGKILL after the grace period. Returns the
        seconds it took."""
        timeout = self.spec.grace_period if grace is None else grace
        started = time.monotonic()
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        return time.monotonic() - started

    def kill(self, signal: str) -> None:
        podman("kill", "--signal", signal, self.name)

    # Observing ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", "--format", "{{json .State}}", self.name))
        return state

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PODMAN, "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )

    def liveness(self) -> subprocess.CompletedProcess[str]:
        """The kubelet's exec liveness probe, bounded by its timeoutSeconds."""
        return self.exec(*self.spec.liveness, timeout=self.spec.liveness_timeout)

    def ready(self) -> bool:
        """The kubelet's exec readiness probe, bounded by its timeoutSeconds."""
        return self.exec(*self.spec.readiness, timeout=self.spec.readiness_timeout).returncode == 0

    def wait_serving(self, timeout: float = 30) -> None:
        """Until the agent says it serves (CoreDNS answers on every local address and the rules are in)."""

        def serving() -> bool:
            if not self.running():
                raise AssertionError(f"container {self.name} exited: {self.state()}\n{self.tail()}")
            return self.liveness().stdout.strip().endswith(", serving")

        if not poll(serving, timeout, every=0.2):
            raise AssertionError(f"{self.name} not serving within {timeout}s:\n{self.tail()}")

    def logs(self) -> str:
        return podman("logs", self.name, check=False)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def processes(self) -> dict[str, list[tuple[int, int]]]:
        """The container's processes by command name: [(pid in the container, pid on the host), …] in pid
        order (the agent is two: PID 1, which reaps and forwards signals, and the agent it forked)."""
        found: dict[str, list[tuple[int, int]]] = {}
        for line in podman("top", self.name, "pid", "hpid", "comm").splitlines()[1:]:
            pid, hpid, comm = line.split(None, 2)
            found.setdefault(comm.strip(), []).append((int(pid), int(hpid)))
        return {comm: sorted(pids) for comm, pids in found.items()}

    def cgroup_memory(self, v2: str, v1: str) -> str:
        """A memory controller file of the container's cgroup, as the container sees it (v2 or v1 name)."""
        script = f"cat /sys/fs/cgroup/{v2} 2>/dev/null || cat /sys/fs/cgroup/memory/{v1}"
        out = self.exec("sh", "-c", script)
        if out.returncode != 0:
            raise AssertionError(f"cannot read {v2} or {v1} in {self.name}: {out.stderr}")
        return out.stdout
