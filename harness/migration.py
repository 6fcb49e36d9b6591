"""Migrating a cluster from node-cache to the agent and back (docs/upgrades.md, "Migrating from node-cache"),
on the real cluster of :mod:`harness.cluster`.

- node-cache's image: ``registry.k8s.io/dns/k8s-dns-node-cache:1.26.7``, built by ``make setup``
  (scripts/setup-cluster.sh, image/node-cache/Dockerfile) from the real binary of :mod:`harness.nodecache`,
  moved from podman into the node's containerd as the agent's image is (its archive cached by image id).
- upstream's manifest after the operator's steps: its documented sed (the same line as the shipped manifest's
  header) and the image set to that node-cache.
- the link driver: this kernel has no dummy link driver, so node-cache cannot create ``nodelocaldns`` (it
  logs "operation not supported" and its CoreDNS exits on the bind; :mod:`harness.nodecache` says the same).
  :func:`link_driver_standin` keeps an empty bridge of that name in the node whenever none is there, as the
  dummy driver would let node-cache make one; node-cache and the agent both take an existing one. It
  recreates only the link, never an address.
- the rules each program tags: node-cache's ``NodeLocal DNS Cache: …``, the agent's
  ``NodeLocal DNS agent: …``, read from every backend of the node
  (:meth:`harness.cluster.Cluster.normalized_tables`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import manifests, nodecache
from harness import sandbox as sb
from harness.cluster import IMAGE_CACHE, Cluster, podman
from harness.waiting import poll

NODE_CACHE_IMAGE = f"registry.k8s.io/dns/k8s-dns-node-cache:{nodecache.NODE_CACHE_VERSION}"
UPSTREAM_IMAGE = "registry.k8s.io/dns/k8s-dns-node-cache:"  # upstream's image, whatever its tag
NODE_CACHE_TAG = "NodeLocal DNS Cache:"
AGENT_TAG = "NodeLocal DNS agent:"
INTERFACE = nodecache.INTERFACE
SELECTOR = "k8s-app=node-local-dns"


def unavailable() -> str | None:
    """Why the migration cannot run here, or None: the binary, and its image built by ``make setup``."""
    reason = nodecache.unavailable()
    if reason:
        return reason
    try:
        podman("image", "inspect", "--format", "{{.Id}}", NODE_CACHE_IMAGE)
    except sb.SandboxError:
        return f"no image {NODE_CACHE_IMAGE} (run make setup: scripts/setup-cluster.sh builds it)"
    return None


def upstream_manifest(source: Path, workdir: Path, kubedns: str) -> Path:
    """Upstream's ``nodelocaldns.yaml`` as an operator applies it: its documented sed (the iptables-mode line
    of the shipped manifest's header, the same placeholders), run by sed itself, and the image set to the
    node-cache this machine has."""
    target = workdir / "nodelocaldns.yaml"
    target.write_text(source.read_text())
    script = (
        f"localdns={manifests.LOCALDNS}; domain={manifests.DOMAIN}; kubedns={kubedns}; "
        f"{manifests.documented_sed('iptables')} && "
        f'sed -i "s|{UPSTREAM_IMAGE}[0-9.]*|{NODE_CACHE_IMAGE}|" nodelocaldns.yaml'
    )
    subprocess.run(["bash", "-c", script], cwd=workdir, check=True, timeout=10)
    return target


def import_node_cache_image(cluster: Cluster) -> None:
    """node-cache's image from podman into the node's containerd (the archive cached by image id)."""
    image_id = podman("image", "inspect", "--format", "{{.Id}}", NODE_CACHE_IMAGE).strip()
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    tar = IMAGE_CACHE / f"{image_id[:16]}.tar"
    if not tar.exists():
        tmp = tar.with_suffix(f".{cluster.run_id}.tmp")
        podman("save", "--format", "docker-archive", "-o", str(tmp), NODE_CACHE_IMAGE)
        tmp.rename(tar)
    tar.touch()  # the cluster's image import drops archives unused for a day
    cluster.ctr("images", "import", str(tar), timeout=300)


@contextlib.contextmanager
def link_driver_standin(cluster: Cluster) -> Iterator[None]:
    """An empty bridge ``nodelocaldns`` in the node whenever none is there (see the module docstring), until
    the block ends; the bridge it leaves is removed then."""
    add = f"ip link add {INTERFACE} type bridge 2>/dev/null"
    script = (
        f"{add}\n"
        "ip -o monitor link | while read -r line; do\n"
        f'  case "$line" in Deleted*" {INTERFACE}:"*) {add} ;; esac\n'
        "done\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", cluster.node, "sh", "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the shell, ip monitor and the loop end together
    )
    try:
        if not poll(lambda: INTERFACE in link_names(cluster), 10, every=0.1):
            raise RuntimeError(f"no {INTERFACE} bridge in the node")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if INTERFACE in link_names(cluster):
            cluster.node_exec(["ip", "link", "del", INTERFACE], mount=False, check=False)


def link_names(cluster: Cluster) -> list[str]:
    out = cluster.node_exec(["ip", "-o", "link", "show"], mount=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def tagged_rules(cluster: Cluster, tag: str) -> list[str]:
    """The node's rules (every backend) whose comment starts with ``tag``."""
    return [line for line in cluster.normalized_tables().splitlines() if tag in line]


def pods(cluster: Cluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", "pods", "-n", "kube-system", "-l", SELECTOR, "-o", "json")
    )["items"]
    return items


def pod_image(pod: dict[str, Any]) -> str:
    return str(pod["spec"]["containers"][0]["image"])


@dataclass
class Transition:
    """One manifest applied over another under load: the loads' summaries by address, and when (seconds
    after the apply) the old pod was gone and the new one Ready."""

    name: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_ready_after: float | None = None
    old_stopping_after: float | None = None  # its deletion began (SIGTERM)
    old_gone_after: float | None = None

    def lost(self, address: str) -> int:
        return int(self.results[address]["failed"])

    def sent(self, address: str) -> int:
        return int(self.results[address]["sent"])

    def summary(self) -> str:
        parts = [
            f"{address}: {r['failed']} of {r['sent']} lost {r.get('errors') or ''}, longest gap "
            f"{float(r['longest_gap']):.2f}s"
            for address, r in self.results.items()
        ]
        timing = (
            f"new pod Ready {self.new_ready_after}s, old pod stopping {self.old_stopping_after}s, "
            f"gone {self.old_gone_after}s after the apply"
        )
        return f"{self.name}: " + "; ".join(parts) + f" ({timing})"


def apply_under_load(
    cluster: Cluster,
    manifest: Path,
    *,
    name: str,
    new_image: str,
    loads: dict[str, tuple[str, float]],
    duration: float,
    names: str,
) -> Transition:
    """``kubectl apply -f manifest`` 2 s into a bounded load from the client pod on each address
    (``loads``: label → (server, qps)); waits for the loads, records when the pod of the old image was gone
    and the one of ``new_image`` Ready."""
    transition = Transition(name)
    started = {label: cluster.start_load(rate=rate, duration=duration, names=names, server=server)
               for label, (server, rate) in loads.items()}  # fmt: skip
    try:
        time.sleep(2)
        cluster.kubectl("apply", "-f", str(manifest))
        applied = time.monotonic()
        deadline = applied + duration
        while time.monotonic() < deadline and (
            transition.old_gone_after is None or transition.new_ready_after is None
        ):
            now = round(time.monotonic() - applied, 1)
            current = pods(cluster)
            old = [p for p in current if pod_image(p) != new_image]
            if transition.old_stopping_after is None and all(
                p["metadata"].get("deletionTimestamp") for p in old
            ):
                transition.old_stopping_after = now
            if transition.old_gone_after is None and not old:
                transition.old_gone_after = now
            if transition.new_ready_after is None and any(
                pod_image(p) == new_image and ready(p) for p in current
            ):
                transition.new_ready_after = now
            time.sleep(0.5)
        for label, load in started.items():
            transition.results[label] = json.loads(load.communicate(timeout=duration + 30)[0])
    finally:
        for load in started.values():
            if load.poll() is None:
                load.kill()
                load.wait(timeout=10)
    return transition


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions") or []
    return {c["type"]: c["status"] for c in conditions}.get("Ready") == "True"
