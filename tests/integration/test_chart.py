"""The Helm chart (chart/) with the pinned helm: it lints; it renders, object by object, what the
documented sed makes of image/nodelocaldns.yaml (whatever that file holds) for equivalent values in both
kube-proxy modes, and with the API source what image/nodelocaldns-api.yaml and the documented patch add; its
output passes the offline manifest checks; and the real apiserver accepts an install (``helm install
--dry-run=server``, and a server-side dry run of the rendered objects)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import __version__
from harness import controlplane
from harness.controlplane import ControlPlane, helm
from harness.manifests import (
    API_RBAC,
    MANIFEST,
    MODES,
    REPO,
    apply_json_patch,
    checker,
    documented_patch,
    objects,
    run_sed,
)

CHART = REPO / "chart"
# Values other than the defaults, to show each one reaches every place the sed reaches.
OTHER = {"localdns": "169.254.25.10", "domain": "k8s.example", "kubedns": "10.100.0.10"}
TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "dns", "effect": "NoSchedule"}


@pytest.fixture(autouse=True)
def _helm_built() -> None:
    reason = controlplane.unavailable()
    if reason:
        pytest.skip(reason)


def template(*values: str, namespace: str = "kube-system") -> str:
    """``helm template`` of the chart with ``--set`` values."""
    sets = [arg for value in values for arg in ("--set", value)]
    return helm("template", "node-local-dns", str(CHART), "-n", namespace, *sets).stdout


def set_values(mode: str, localdns: str, domain: str, kubedns: str) -> list[str]:
    return [f"kubeProxyMode={mode}", f"localIP={localdns}", f"clusterDomain={domain}",
            f"kubeDNS.ip={kubedns}"]  # fmt: skip


def test_the_chart_lints() -> None:
    out = helm("lint", "--strict", str(CHART), "-n", "kube-system").stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_the_charts_corefile_is_the_manifests() -> None:
    corefile = objects(MANIFEST.read_text())["ConfigMap/node-local-dns"]["data"]["Corefile"]
    assert (CHART / "files" / "Corefile").read_text() == corefile, (
        "chart/files/Corefile differs from the Corefile of image/nodelocaldns.yaml: copy it over"
    )


def test_the_defaults_render_the_manifest_after_the_iptables_sed(tmp_path: Path) -> None:
    assert objects(template()) == objects(run_sed("iptables", tmp_path))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_value_goes_where_the_sed_puts_it(mode: str, tmp_path: Path) -> None:
    rendered = objects(template(*set_values(mode, **OTHER)))
    assert rendered == objects(run_sed(mode, tmp_path, **OTHER))
    assert sorted(rendered) == sorted(objects(MANIFEST.read_text()))


def test_the_api_source_adds_what_the_rbac_manifest_and_the_documented_patch_add(tmp_path: Path) -> None:
    expected = objects(run_sed("iptables", tmp_path)) | objects(API_RBAC.read_text())
    daemonset = "DaemonSet/node-local-dns"
    expected[daemonset] = apply_json_patch(expected[daemonset], documented_patch())
    assert objects(template("apiSource.enabled=true")) == expected


def container(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [c] = rendered["DaemonSet/node-local-dns"]["spec"]["template"]["spec"]["containers"]
    return c


def test_twins_are_one_value_that_adds_only_the_agents_flag() -> None:
    default, twins = objects(template()), objects(template("corednsInstances=2"))
    daemonset = "DaemonSet/node-local-dns"
    args = twins[daemonset]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-1] == "--coredns-instances=2"
    args.pop()
    assert twins == default


def test_image_resources_and_tolerations_are_values(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "image": {"repository": "registry.example.com/dns/node-local-dns-agent", "tag": "9.9.9",
                          "pullPolicy": "IfNotPresent"},
                "resources": {"requests": {"cpu": "50m", "memory": "200Mi"}, "limits": {"memory": "400Mi"}},
                "tolerations": [TOLERATION],
            }
        )
    )  # fmt: skip
    text = helm("template", "node-local-dns", str(CHART), "-n", "kube-system", "-f", str(values)).stdout
    rendered = objects(text)
    c = container(rendered)
    assert c["image"] == "registry.example.com/dns/node-local-dns-agent:9.9.9"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "200Mi"}, "limits": {"memory": "400Mi"}}
    pod = rendered["DaemonSet/node-local-dns"]["spec"]["template"]["spec"]
    assert pod["tolerations"] == [TOLERATION]
    (tmp_path / "out.yaml").write_text(text)
    assert checker(str(tmp_path / "out.yaml")).returncode == 0


def test_the_default_image_is_this_agent_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert container(objects(template()))["image"] == f"node-local-dns-agent:{__version__}"


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["apiSource.enabled=true"],
        set_values("ipvs", **OTHER),
        ["localIP=fd00::10", "kubeDNS.ip=fd00::a"],
        [*set_values("ipvs", **OTHER), "corednsInstances=2"],
    ],
    ids=["defaults", "api-source", "ipvs", "ipv6", "ipvs-twins"],
)
def test_the_rendered_manifest_passes_the_manifest_checks(values: list[str], tmp_path: Path) -> None:
    out = tmp_path / "rendered.yaml"
    out.write_text(template(*values))
    result = checker(str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok  ") == len(objects(out.read_text()))


def test_an_ipv6_local_address_is_bracketed_before_a_port() -> None:
    rendered = objects(template("localIP=fd00::10", "kubeDNS.ip=fd00:96::a"))
    corefile = rendered["ConfigMap/node-local-dns"]["data"]["Corefile"]
    assert "health [fd00::10]:8080" in corefile  # `ready` is not in the ConfigMap: the agent adds it
    assert "8181" not in corefile
    assert "bind fd00::10 fd00:96::a" in corefile
    assert container(rendered)["args"][1] == "fd00::10,fd00:96::a"


@pytest.mark.parametrize(
    ("values", "namespace", "message"),
    [
        (["kubeProxyMode=userspace"], "kube-system", 'kubeProxyMode: "userspace" is not iptables or ipvs'),
        (["kubeDNS.ip="], "kube-system", "kubeDNS.ip: set it to the kube-dns Service's ClusterIP"),
        ([], "default", "node-local-dns belongs in kube-system, where the kube-dns ConfigMap and Services"),
        (["corednsInstances=0"], "kube-system", "corednsInstances: 0 is not a number of CoreDNS processes"),
        (["corednsInstances=two"], "kube-system", "corednsInstances: two is not a number of CoreDNS"),
    ],
)
def test_bad_values_are_refused_with_the_value_named(values: list[str], namespace: str, message: str) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    proc = helm("template", "node-local-dns", str(CHART), "-n", namespace, *sets, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from controlplane.started()


@pytest.mark.parametrize("values", [[], ["apiSource.enabled=true"], set_values("ipvs", **OTHER)])
def test_the_apiserver_accepts_the_install(cluster: ControlPlane, values: list[str]) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    out = cluster.helm("install", "nld", str(CHART), "-n", "kube-system", "--dry-run=server", *sets)
    assert "STATUS: pending-install" in out
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=template(*values))
    assert applied.count("created (server dry run)") == len(objects(template(*values)))


def test_install_and_uninstall_for_real(cluster: ControlPlane) -> None:
    out = cluster.helm("install", "nld", str(CHART), "-n", "kube-system", "--set", "apiSource.enabled=true")
    assert "STATUS: deployed" in out
    names = [
        f"{kind.lower()}/{name}"
        for kind, name in (k.split("/") for k in objects(template("apiSource.enabled=true")))
    ]
    listed = cluster.kubectl("get", "-n", "kube-system", "-o", "name", *names)
    assert len(listed.split()) == len(names) == 7
    assert 'release "nld" uninstalled' in cluster.helm("uninstall", "nld", "-n", "kube-system")
    left = cluster.kubectl("get", "-n", "kube-system", "-o", "name", "--ignore-not-found", *names)
    assert left.split() == []
