"""CoreDNS with the node-local plugin set (image/coredns-node, the image's default CoreDNS), for real.

scripts/setup.sh builds it into /usr/local/bin/coredns-node (``COREDNS_NODE_BINARY`` names another). The agent
runs it in the node sandbox as the image runs it: it serves the rendered Corefile, and a Corefile naming a
plugin it lacks is refused at start (the agent exits, nothing left on the node) and rejected on a later
ConfigMap change (the last good Corefile keeps serving). The Go file's directive list is held to CoreDNS's
own order, read from the pinned release's plugin.cfg in the Go module cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import sandbox as sb
from harness.agentcontainer import PODMAN, ensure_image, podman, podman_unavailable
from harness.agentproc import (
    SERVICE,
    SERVICE_IP,
    TEMPLATE,
    AgentProcess,
    Load,
    interface_exists,
    local_answers,
    our_rules,
)
from harness.configmapdir import publish
from harness.sandbox import KUBE_DNS_IP, LOCAL_IP
from harness.waiting import poll

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "image" / "coredns-node"
PINNED = (REPO / "image" / "coredns.version").read_text().strip()
NODE_BINARY = os.environ.get("COREDNS_NODE_BINARY", "/usr/local/bin/coredns-node")

pytestmark = pytest.mark.skipif(
    not os.access(NODE_BINARY, os.X_OK),
    reason=f"needs CoreDNS's node-local build at {NODE_BINARY} (make setup)",
)


def run(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env)


def listed_plugins(binary: str) -> set[str]:
    out = run([binary, "-plugins"])
    assert out.returncode == 0, out
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def go_directives() -> list[str]:
    """The ``directives`` list of image/coredns-node/main.go."""
    source = (MODULE / "main.go").read_text()
    body = re.search(r"var directives = \[\]string\{(.*?)\n\}", source, re.DOTALL)
    assert body, "no directives list in main.go"
    return re.findall(r'"([^"]+)"', body.group(1))


def go_imports() -> set[str]:
    return set(re.findall(r'^\s*_ "([^"]+)"', (MODULE / "main.go").read_text(), re.MULTILINE))


def coredns_plugin_cfg() -> list[tuple[str, str]]:
    """(directive, package) in the order of CoreDNS's own plugin.cfg at the pinned release."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("needs the Go toolchain (make setup)")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    out = run([go, "mod", "download", "-json", f"github.com/coredns/coredns@{PINNED}"], cwd=MODULE, env=env)
    assert out.returncode == 0, out
    cfg = Path(json.loads(out.stdout)["Dir"]) / "plugin.cfg"
    pairs = []
    for line in cfg.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, package = line.strip().partition(":")
            pairs.append(
                (name, package if "/" in package else f"github.com/coredns/coredns/plugin/{package}")
            )
    return pairs


# The build ------------------------------------------------------------------------------------------------


def test_the_build_is_the_pinned_release_with_only_the_chosen_plugins() -> None:
    version = run([NODE_BINARY, "-version"])
    assert version.stdout.splitlines()[0] == f"CoreDNS-{PINNED.removeprefix('v')}", version
    plugins = listed_plugins(NODE_BINARY)
    assert plugins == set(go_directives())  # what -plugins lists, a Corefile may name (the agent checks this)
    assert not plugins & {"kubernetes", "etcd", "k8s_external", "route53", "azure", "clouddns", "file"}
    assert {
        "bind",
        "cache",
        "errors",
        "forward",
        "health",
        "loop",
        "prometheus",
        "ready",
        "template",
    } <= plugins
    assert plugins < listed_plugins(sb.COREDNS)  # the full build has them all, and more


def test_the_directive_order_is_corednss_own_restricted_to_the_chosen_plugins() -> None:
    cfg = coredns_plugin_cfg()
    chosen = go_directives()
    assert len(set(chosen)) == len(chosen), chosen
    assert chosen == [name for name, _ in cfg if name in chosen], "main.go's order drifted from plugin.cfg"
    assert set(chosen) <= {name for name, _ in cfg}
    # Each directive's package is imported, and nothing else is.
    packages = dict(cfg)
    assert go_imports() == {packages[name] for name in chosen}


def test_coredns_itself_refuses_a_plugin_it_lacks(tmp_path: Path) -> None:
    conf = tmp_path / "Corefile"
    conf.write_text(".:1053 {\n    kubernetes cluster.local\n}\n")
    out = run([NODE_BINARY, "-conf", str(conf)])
    assert out.returncode != 0 and "Unknown directive 'kubernetes'" in out.stdout + out.stderr, out


def test_the_images_default_coredns_is_this_build() -> None:
    reason = podman_unavailable()
    if reason:
        pytest.skip(reason)
    image = ensure_image()  # as scripts/build-image.sh builds it by default
    label = '{{ index .Config.Labels "org.node-local-dns-agent.coredns-plugins" }}'
    assert podman("image", "inspect", "--format", label, image).strip() == "node"
    shipped = subprocess.run(
        [PODMAN, "run", "--rm", "--network", "none", "--entrypoint", "cat", image, "/usr/local/bin/coredns"],
        capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert hashlib.sha256(shipped).hexdigest() == hashlib.sha256(Path(NODE_BINARY).read_bytes()).hexdigest()


# The agent with it ---------------------------------------------------------------------------------------


@pytest.fixture
def box() -> Iterator[sb.Sandbox]:
    with sb.Sandbox(flavour="nft") as sandbox:
        yield sandbox


def node_local_coredns(box: sb.Sandbox) -> str:
    """A copy named ``coredns``, as the image installs it (the harness finds the agent's CoreDNS by name)."""
    path = box.workdir / "node-local" / "coredns"
    path.parent.mkdir()
    shutil.copy2(NODE_BINARY, path)
    return str(path)


def template_dir(box: sb.Sandbox, text: str) -> Path:
    """The node-local-dns ConfigMap as the kubelet mounts it, with ``text`` as its Corefile.base."""
    directory = box.workdir / "node-local-dns-configmap"
    publish(directory, {"Corefile.base": text})
    return directory


def with_kubernetes(template: str) -> str:
    """The shipped template with the `kubernetes` plugin in its cluster domain's server block."""
    block = "__PILLAR__DNS__DOMAIN__:__PILLAR__DNS__PORT__ {\n    errors\n"
    return template.replace(block, f"{block}    kubernetes __PILLAR__DNS__DOMAIN__\n")


def test_the_agent_serves_through_the_node_local_build(box: sb.Sandbox) -> None:
    coredns = node_local_coredns(box)
    with AgentProcess(box, extra=["--coredns-binary", coredns, "--serve-stale", "3600"]) as agent:
        agent.wait_serving()
        assert local_answers(box)
        assert box.dig(box.pod(0), LOCAL_IP, SERVICE) == SERVICE_IP
        assert box.dig(box.pod(0), KUBE_DNS_IP, "www.example.org") == "192.0.2.81"
        assert box.http_get(box.node, f"http://{LOCAL_IP}:8181/ready").strip() == "OK"
        assert "coredns_dns_requests_total" in agent.metrics()
        pid = agent.coredns_pid()
        assert pid is not None and Path(f"/proc/{pid}/exe").resolve() == Path(coredns)
        listed = [e for e in agent.events() if e.get("event") == "coredns plugins"]
        assert len(listed) == 1 and listed[0]["binary"] == coredns, listed


def test_a_configmap_naming_a_missing_plugin_is_refused_at_start_and_nothing_is_left(box: sb.Sandbox) -> None:
    coredns = node_local_coredns(box)
    configmap = template_dir(box, with_kubernetes(TEMPLATE.read_text()))
    extra = ["--coredns-binary", coredns, "-basecorefile", str(configmap / "Corefile.base")]
    with AgentProcess(box, extra=extra) as agent:
        assert agent.proc is not None
        code = agent.proc.wait(timeout=30)
        assert code != 0, agent.tail()
        [failed] = [e for e in agent.events() if e.get("event") == "agent failed"]
        cause = str(failed["cause"])
        assert 'plugin "kubernetes" in server block "cluster.local:53"' in cause, cause
        assert coredns in cause and "--build-arg COREDNS_PLUGINS=full" in cause, cause
        assert "Traceback" not in agent.tail()
    assert our_rules(box) == []
    assert not interface_exists(box)
    assert not (box.workdir / "Corefile").exists()  # CoreDNS never got it
    assert box.dig(box.pod(0), KUBE_DNS_IP, SERVICE) == SERVICE_IP  # kube-dns, through kube-proxy


def test_a_configmap_change_naming_a_missing_plugin_is_rejected_and_the_last_good_one_serves(
    box: sb.Sandbox,
) -> None:
    coredns = node_local_coredns(box)
    good = TEMPLATE.read_text()
    configmap = template_dir(box, good)
    extra = ["--coredns-binary", coredns, "-basecorefile", str(configmap / "Corefile.base")]
    with AgentProcess(box, extra=extra) as agent:
        agent.wait_serving()
        pid = agent.coredns_pid()
        corefile = (box.workdir / "Corefile").read_text()
        load = Load(box, rate=200, duration=4)
        publish(configmap, {"Corefile.base": with_kubernetes(good)})
        assert poll(lambda: any(e.get("event") == "configuration rejected" for e in agent.events()), 10), (
            agent.tail()
        )
        result = load.result()
        assert result["failed"] == 0, result
        [rejected] = [e for e in agent.events() if e.get("event") == "configuration rejected"]
        assert 'plugin "kubernetes" in server block "cluster.local:53"' in str(rejected["error"]), rejected
        assert rejected["keeping"] == "the last good Corefile"
        assert agent.coredns_pid() == pid and (box.workdir / "Corefile").read_text() == corefile
        assert agent.status().get("serving") is True and local_answers(box)
        assert 'nodelocaldns_agent_corefile_renders_total{result="invalid"}' in agent.metrics()
        # Fixed again (a plugin the build has): taken at once, with no second `-plugins` run.
        publish(configmap, {"Corefile.base": good.replace("    errors\n", "    errors\n    any\n", 1)})
        assert poll(lambda: "any" in (box.workdir / "Corefile").read_text().split(), 10), agent.tail()
        assert poll(lambda: local_answers(box), 10)
        assert len([e for e in agent.events() if e.get("event") == "coredns plugins"]) == 1
