"""The DaemonSet manifest: the upstream objects and placeholders, so the upstream sed instructions still
apply; valid against the Kubernetes schemas; and wired to the agent as the agent really parses it."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agent import __version__
from agent.cli import parse
from agent.corefile.inputs import CorefileBuilder
from agent.corefile.kubedns import KubeDnsConfig
from agent.corefile.parse import server_blocks
from agent.settings import Settings
from agent.supervisor.timing import Timing
from harness.manifests import (
    API_RBAC,
    DOMAIN,
    KUBEDNS,
    LOCALDNS,
    MANIFEST,
    MODES,
    apply_json_patch,
    checker,
    documented_patch,
    objects,
    run_sed,
)

SHUTDOWN_BUDGET = Timing().shutdown_budget


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def deployed(mode: str, tmp_path: Path) -> dict[str, dict[str, Any]]:
    return objects(run_sed(mode, tmp_path))


def container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [c] = objs["DaemonSet/node-local-dns"]["spec"]["template"]["spec"]["containers"]
    return c


def pod_spec(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["DaemonSet/node-local-dns"]["spec"]["template"]["spec"]


def corefile(objs: dict[str, dict[str, Any]]) -> str:
    return objs["ConfigMap/node-local-dns"]["data"]["Corefile"]


def test_it_has_the_upstream_objects() -> None:
    assert sorted(objects(MANIFEST.read_text())) == [
        "ConfigMap/node-local-dns",
        "DaemonSet/node-local-dns",
        "Service/kube-dns-upstream",
        "Service/node-local-dns",
        "ServiceAccount/node-local-dns",
    ]


def test_the_manifest_validates_against_the_kubernetes_schemas(mode: str) -> None:
    result = checker("--mode", mode, str(MANIFEST), str(API_RBAC))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok  ") == 7


def test_the_checker_substitutes_exactly_as_the_documented_sed(mode: str, tmp_path: Path) -> None:
    assert checker("--mode", mode, "--print", str(MANIFEST)).stdout == run_sed(mode, tmp_path)


def test_a_schema_violation_is_named_with_its_object_and_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("readinessProbe:", "readinesProbe:"))
    result = checker("--mode", "iptables", str(broken))
    assert result.returncode == 1
    assert "DaemonSet kube-system/node-local-dns (Kubernetes 1.28): spec.template.spec.containers.0:" in (
        result.stderr
    )
    assert "'readinesProbe' was unexpected" in result.stderr


def test_an_unsubstituted_placeholder_outside_the_corefile_is_refused() -> None:
    result = checker(str(MANIFEST))
    assert result.returncode == 1
    assert (
        "DaemonSet kube-system/node-local-dns: __PILLAR__LOCAL__DNS__ left at "
        "spec.template.spec.containers[0].args[1]" in result.stderr
    )


def test_only_the_placeholders_the_agent_fills_remain(mode: str, deployed: dict[str, dict[str, Any]]) -> None:
    left = set(re.findall(r"__PILLAR__(?:[A-Z]+__)+", corefile(deployed)))
    # iptables mode leaves the cluster DNS address to the agent (from kube-dns-upstream's environment);
    # IPVS mode sets it by sed and leaves the bind lines' __PILLAR__DNS__SERVER__, which the agent removes.
    assert (
        left
        == {
            "iptables": {"__PILLAR__CLUSTER__DNS__", "__PILLAR__UPSTREAM__SERVERS__"},
            "ipvs": {"__PILLAR__DNS__SERVER__", "__PILLAR__UPSTREAM__SERVERS__"},
        }[mode]
    )
    rest = {k: v for k, v in deployed.items() if k != "ConfigMap/node-local-dns"}
    assert "__PILLAR__" not in json.dumps(rest)


def test_the_daemonset_args_are_node_cache_flags_the_agent_parses(
    mode: str, deployed: dict[str, dict[str, Any]]
) -> None:
    args = container(deployed)["args"]
    assert args[:1] == ["-localip"]
    _, settings = parse(args)
    local = [ipaddress.ip_address(LOCALDNS)]
    assert list(settings.local_ips) == (
        [*local, ipaddress.ip_address(KUBEDNS)] if mode == "iptables" else local
    )
    assert settings.corefile == Path("/etc/Corefile")
    assert settings.upstream_svc == "kube-dns-upstream"


def test_liveness_is_agent_check_and_outlasts_its_staleness_limit(
    deployed: dict[str, dict[str, Any]],
) -> None:
    probe = container(deployed)["livenessProbe"]
    assert probe["exec"]["command"] == ["agent", "--check"]
    ns, settings = parse(probe["exec"]["command"][1:])
    assert ns.check
    # One missed heartbeat must not restart the pod: the kubelet gives up only after several periods.
    assert probe["periodSeconds"] * probe["failureThreshold"] > settings.check_max_age
    assert probe["timeoutSeconds"] >= 2


def test_readiness_is_agent_ready_for_this_pod_alone(deployed: dict[str, dict[str, Any]]) -> None:
    # An httpGet of CoreDNS's /ready would be answered by either pod's CoreDNS during a surge (one port).
    probe = container(deployed)["readinessProbe"]
    assert probe["exec"]["command"] == ["agent", "--ready"]
    ns, _ = parse(probe["exec"]["command"][1:])
    assert ns.ready
    assert probe["timeoutSeconds"] >= 2


def test_the_ready_the_agent_adds_is_on_the_local_address_for_manifests_that_probe_it(
    deployed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert not re.findall(r"^\s*ready\b", corefile(deployed), re.MULTILINE)  # the ConfigMap has none
    template = tmp_path / "Corefile.base"
    template.write_text(corefile(deployed))
    _, settings = parse([*container(deployed)["args"], "-basecorefile", str(template)])
    environ = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.0.11"}
    rendered = CorefileBuilder(settings, environ=environ).build(
        KubeDnsConfig(upstream_nameservers=("10.0.0.53",))
    )
    assert re.findall(r"^\s*ready (\S+)$", rendered.text, re.MULTILINE) == [f"{LOCALDNS}:8181"]


# The plugins node-cache compiles in (kubernetes-sigs/node-local-dns cmd/node-cache/main.go); `prometheus` is
# the metrics plugin's directive. Any other directive makes node-cache's CoreDNS refuse the Corefile.
NODE_CACHE_DIRECTIVES = {
    "bind", "bufsize", "cache", "debug", "dns64", "errors", "forward", "health", "hosts", "loadbalance",
    "log", "loop", "prometheus", "pprof", "reload", "rewrite", "template", "timeouts", "trace", "whoami",
}  # fmt: skip


def test_the_configmap_corefile_is_upstreams_and_node_cache_can_run_it(
    deployed: dict[str, dict[str, Any]],
) -> None:
    blocks = server_blocks(corefile(deployed))
    assert [zone for b in blocks for zone, _ in b.zones] == [DOMAIN, "in-addr.arpa", "ip6.arpa", ""]
    assert {name for b in blocks for name, _ in b.directives} <= NODE_CACHE_DIRECTIVES


def test_upgrades_surge_so_that_no_node_is_without_dns(deployed: dict[str, dict[str, Any]]) -> None:
    spec = deployed["DaemonSet/node-local-dns"]["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "10%", "maxUnavailable": 0},
    }
    assert spec["minReadySeconds"] >= 5  # the new pod serves a while before the old one is stopped
    assert "ports" not in container(
        deployed
    )  # with hostNetwork they would be host ports, blocking the surge pod


def test_the_grace_period_covers_the_bounded_shutdown(deployed: dict[str, dict[str, Any]]) -> None:
    assert pod_spec(deployed)["terminationGracePeriodSeconds"] >= SHUTDOWN_BUDGET + 5


def test_the_xtables_lock_and_both_configmaps_are_mounted_where_the_agent_looks(
    deployed: dict[str, dict[str, Any]],
) -> None:
    volumes = {v["name"]: v for v in pod_spec(deployed)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(deployed)["volumeMounts"]}
    defaults = Settings()
    for path in (defaults.xtables_lock, defaults.agents_lock):  # both shared with the node, hence hostPaths
        assert mounts[str(path)]["hostPath"] == {"path": str(path), "type": "FileOrCreate"}
    assert mounts["/etc/kube-dns"]["configMap"] == {"name": "kube-dns", "optional": True}
    base = mounts[str(defaults.base_corefile.parent)]["configMap"]
    assert base["name"] == "node-local-dns"
    assert base["items"] == [{"key": "Corefile", "path": defaults.base_corefile.name}]


def test_the_container_has_only_the_capabilities_it_needs(deployed: dict[str, dict[str, Any]]) -> None:
    security = container(deployed)["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
    assert security["allowPrivilegeEscalation"] is False


def test_both_metrics_endpoints_are_exposed(deployed: dict[str, dict[str, Any]]) -> None:
    agent_port = int(Settings().metrics_listen_address.rpartition(":")[2])
    coredns_ports = {int(p) for p in re.findall(r"prometheus :(\d+)", corefile(deployed))}
    assert coredns_ports == {9253}
    service = {(p["port"], p["targetPort"]) for p in deployed["Service/node-local-dns"]["spec"]["ports"]}
    assert service == {(agent_port, agent_port), (9253, 9253)}  # by number: the pod declares no ports
    # Annotation-based scraping reaches the port that has everything (the agent's series and CoreDNS's).
    for annotated in (
        deployed["Service/node-local-dns"],
        deployed["DaemonSet/node-local-dns"]["spec"]["template"],
    ):
        assert annotated["metadata"]["annotations"]["prometheus.io/port"] == str(agent_port)


def test_the_image_is_this_agent_version(deployed: dict[str, dict[str, Any]]) -> None:
    assert container(deployed)["image"].rpartition(":")[2] == __version__


def test_no_api_access_without_the_optional_rbac(deployed: dict[str, dict[str, Any]]) -> None:
    assert pod_spec(deployed)["automountServiceAccountToken"] is False
    assert not [k for k in deployed if k.split("/")[0] in {"Role", "ClusterRole", "RoleBinding"}]


def test_the_documented_patch_enables_the_api_source_with_the_rbac(
    deployed: dict[str, dict[str, Any]],
) -> None:
    patched = apply_json_patch(deployed["DaemonSet/node-local-dns"], documented_patch())
    kubernetes_validate.validate(patched, "1.28", strict=True)
    spec = patched["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True
    _, settings = parse(spec["containers"][0]["args"])
    assert settings.kubedns_configmap_api == "kube-system/kube-dns"

    rbac = objects(API_RBAC.read_text())
    [configmap, service] = rbac["Role/node-local-dns"]["rules"]
    namespace, name = settings.kubedns_configmap_api.split("/")
    assert rbac["Role/node-local-dns"]["metadata"]["namespace"] == namespace
    assert configmap == {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name],
                         "verbs": ["get", "list", "watch"]}  # fmt: skip
    assert service == {"apiGroups": [""], "resources": ["services"], "resourceNames": [settings.upstream_svc],
                       "verbs": ["get"]}  # fmt: skip
    [subject] = rbac["RoleBinding/node-local-dns"]["subjects"]
    assert subject == {
        "kind": "ServiceAccount",
        "name": spec["serviceAccountName"],
        "namespace": "kube-system",
    }
    assert rbac["RoleBinding/node-local-dns"]["roleRef"]["name"] == "node-local-dns"
