"""The shipped manifests applied to a real kube-apiserver (harness/controlplane.py), with the pinned kubectl:
accepted by a server-side dry run after the documented sed for each kube-proxy mode; the API RBAC grants the
agent's ServiceAccount exactly what the agent reads; and the real agent, with that account's token from the
TokenRequest API mounted as the kubelet mounts it, reads the kube-dns ConfigMap and the upstream Service."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import controlplane
from harness import sandbox as sb
from harness.agentproc import AgentProcess
from harness.controlplane import ControlPlane
from harness.manifests import API_RBAC, MODES, objects, run_sed
from harness.waiting import poll

AGENT_SA = "system:serviceaccount:kube-system:node-local-dns"
STUB_NAME = f"www.{sb.STUB_DOMAIN}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from controlplane.started()


@pytest.fixture(scope="module")
def installed(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> ControlPlane:
    """The manifest (iptables mode) and the API RBAC applied for real. kube-dns-upstream gets the sandbox's
    ClusterIP first (the apiserver would pick one at random); the kube-dns ConfigMap names the sandbox's
    stub domain server."""
    cluster.create_service("kube-system", "kube-dns-upstream", sb.KUBE_DNS_UPSTREAM_IP)
    text = run_sed("iptables", tmp_path_factory.mktemp("manifest"))
    cluster.kubectl("apply", "-f", "-", input=text)
    cluster.kubectl("apply", "-f", str(API_RBAC))
    cluster.set_configmap(
        "kube-system", "kube-dns", {"stubDomains": json.dumps({sb.STUB_DOMAIN: [sb.Sandbox.stub_ip]})}
    )
    return cluster


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_manifest_passes_a_server_side_dry_run(cluster: ControlPlane, mode: str, tmp_path: Path) -> None:
    text = run_sed(mode, tmp_path)
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    accepted = {
        (line.split("/")[0].split(".")[0], line.split()[0].split("/")[1])
        for line in out.splitlines()
        if line.endswith(" created (server dry run)")
    }
    assert accepted == {(kind.lower(), name) for kind, name in (k.split("/") for k in objects(text))}, out
    assert len(accepted) == 5


def test_the_surge_pod_asks_for_no_host_port(cluster: ControlPlane, tmp_path: Path) -> None:
    """The apiserver gives a hostNetwork pod's container ports host ports (the scheduler's NodePorts filter
    then refuses a second pod on the node): the pod the DaemonSet creates must have none, so the surge pod of
    an upgrade fits next to the old one."""
    template = objects(run_sed("iptables", tmp_path))["DaemonSet/node-local-dns"]["spec"]["template"]
    # A namespace of its own with the pod's ServiceAccount (admission looks it up), so that the manifest's
    # own objects stay as the other tests expect them.
    namespace = f"surge-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("create", "serviceaccount", "node-local-dns", "-n", namespace)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "surge", "namespace": namespace,
           **template["metadata"]}, "spec": {**template["spec"], "nodeName": "node-a"}}  # fmt: skip
    created = json.loads(
        cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    )
    ports = [p for c in created["spec"]["containers"] for p in c.get("ports", [])]
    assert created["spec"]["hostNetwork"] is True and ports == []
    # The same pod with a declared port gets it as a host port: the check above is the one that matters.
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 9353, "protocol": "TCP"}]
    created = json.loads(
        cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    )
    assert created["spec"]["containers"][0]["ports"][0]["hostPort"] == 9353


def test_the_api_rbac_manifest_passes_a_server_side_dry_run(cluster: ControlPlane) -> None:
    out = cluster.kubectl("apply", "--dry-run=server", "-f", str(API_RBAC))
    assert out.splitlines() == [
        "role.rbac.authorization.k8s.io/node-local-dns created (server dry run)",
        "rolebinding.rbac.authorization.k8s.io/node-local-dns created (server dry run)",
    ]


def can_i(cp: ControlPlane, verb: str, resource: str, namespace: str = "kube-system") -> bool:
    out = cp.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={AGENT_SA}", check=False)
    return out.strip().splitlines()[0] == "yes"


ALLOWED = [
    ("get", "configmaps/kube-dns"),
    ("list", "configmaps/kube-dns"),
    ("watch", "configmaps/kube-dns"),
    ("get", "services/kube-dns-upstream"),
]
DENIED = [
    ("list", "configmaps"),  # every ConfigMap of the namespace
    ("watch", "configmaps"),
    ("get", "configmaps/node-local-dns"),
    ("get", "configmaps/kube-proxy"),
    ("update", "configmaps/kube-dns"),
    ("patch", "configmaps/kube-dns"),
    ("delete", "configmaps/kube-dns"),
    ("create", "configmaps"),
    ("get", "services/kube-dns"),
    ("list", "services"),
    ("update", "services/kube-dns-upstream"),
    ("get", "secrets"),
    ("list", "pods"),
    ("get", "nodes"),
]


@pytest.mark.parametrize(("verb", "resource"), ALLOWED)
def test_the_agent_may_read_the_kube_dns_configmap_and_the_upstream_service(
    installed: ControlPlane, verb: str, resource: str
) -> None:
    assert can_i(installed, verb, resource)


@pytest.mark.parametrize(("verb", "resource"), DENIED)
def test_the_agent_may_do_nothing_else(installed: ControlPlane, verb: str, resource: str) -> None:
    assert not can_i(installed, verb, resource)


def test_the_grants_are_exactly_those_and_only_in_kube_system(installed: ControlPlane) -> None:
    """``can-i --list`` of the agent's account against one with no binding: the difference is the Role."""
    nobody = "system:serviceaccount:kube-system:nobody"

    def rules(user: str, namespace: str) -> set[str]:
        out = installed.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={user}")
        return {" ".join(line.split()) for line in out.splitlines()[1:]}

    assert rules(AGENT_SA, "kube-system") - rules(nobody, "kube-system") == {
        "configmaps [] [kube-dns] [get list watch]",
        "services [] [kube-dns-upstream] [get]",
    }
    assert rules(AGENT_SA, "default") == rules(nobody, "default")
    assert not can_i(installed, "get", "configmaps/kube-dns", namespace="default")


def token_request(cp: ControlPlane, bound_secret: str | None = None) -> str:
    """A token for the agent's ServiceAccount from the TokenRequest API (``kubectl create token``)."""
    args = ["create", "token", "node-local-dns", "-n", "kube-system", "--duration=10m"]
    if bound_secret:
        args += ["--bound-object-kind=Secret", f"--bound-object-name={bound_secret}"]
    return cp.kubectl(*args).strip()


def agent_with_token(box: sb.Sandbox, cp: ControlPlane, token: str) -> AgentProcess:
    """The agent as the DaemonSet runs it with the API source: in-cluster credentials, the flag, no
    --cluster-dns-ip (the upstream Service's clusterIP comes through the API)."""
    token_dir = box.workdir / "serviceaccount"
    token_dir.mkdir()
    (token_dir / "token").write_text(token)
    prefix, env = cp.pod_credentials(token_dir)
    agent = AgentProcess(
        box,
        # The manifest's -upstreamsvc: the agent looks the Service's clusterIP up through the API.
        extra=["--kubedns-configmap-api", "kube-system/kube-dns", "-upstreamsvc", "kube-dns-upstream"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("KUBE_DNS_UPSTREAM")}, **env},
    )
    i = agent.argv.index("--cluster-dns-ip")
    del agent.argv[i : i + 2]
    agent.argv = [*prefix, *agent.argv]
    return agent


def node_requests(cp: ControlPlane, node_address: str) -> list[tuple[str, str, str, str, int]]:
    """(user, verb, resource, name, HTTP status) of the requests from a linked node, from the audit log
    (a request refused by authentication has no user, and only its ResponseStarted stage)."""
    return [
        (e["user"].get("username", ""), e["verb"], e.get("objectRef", {}).get("resource", ""),
         e.get("objectRef", {}).get("name", ""), e["responseStatus"].get("code", 0))
        for e in cp.audit()
        if e["sourceIPs"][0] == node_address
        and (e["stage"] == "ResponseComplete" or e["responseStatus"].get("code") == 401)
    ]  # fmt: skip


def test_the_agent_reads_the_configmap_and_the_service_with_its_own_token(installed: ControlPlane) -> None:
    cp = installed
    with sb.Sandbox(flavour="nft") as box:
        node = cp.link(box.node)
        with agent_with_token(box, cp, token_request(cp)) as agent:
            agent.wait_serving()
            # The stub domain from the ConfigMap, read through the API, reaches CoreDNS.
            assert box.wait_for_dns(box.pod(0), sb.KUBE_DNS_IP, STUB_NAME) == sb.SERVICES.stub[STUB_NAME]
            assert f"forward . {sb.KUBE_DNS_UPSTREAM_IP} " in (box.workdir / "Corefile").read_text()
        requests = node_requests(cp, node)
    assert (AGENT_SA, "get", "services", "kube-dns-upstream", 200) in requests
    assert (AGENT_SA, "list", "configmaps", "kube-dns", 200) in requests  # the name: its field selector
    assert all(user == AGENT_SA and code < 400 for user, *_, code in requests), requests


@pytest.mark.timeout(200)
def test_a_rotated_token_is_read_again(installed: ControlPlane) -> None:
    """The kubelet rotates the mounted token; the old one stops working (here: the Secret it was bound to is
    deleted). The client re-reads the token file at most once a minute, so within about a minute of the first
    read the agent works with the new token, and a ConfigMap change still reaches CoreDNS."""
    cp = installed
    first, second = (f"nld-token-{secrets.token_hex(3)}" for _ in range(2))
    for name in (first, second):
        cp.kubectl("create", "secret", "generic", name, "-n", "kube-system")
    with sb.Sandbox(flavour="nft") as box:
        node = cp.link(box.node)
        old = token_request(cp, first)
        with agent_with_token(box, cp, old) as agent:
            agent.wait_serving()
            token_file = controlplane.pod_token_path(agent.agent_pid())
            rotated = token_file.with_name("token.new")
            rotated.write_text(token_request(cp, second))
            rotated.replace(token_file)
            cp.kubectl("delete", "secret", first, "-n", "kube-system")
            assert poll(
                lambda: cp.get("/api/v1/namespaces/kube-system/configmaps/kube-dns", old)[0] == 401, 10
            )
            cp.drop_connections()  # the next request needs a token: the old one is refused until re-read
            moved = {sb.STUB_DOMAIN: [box.stub_ip + ":5353"]}
            cp.set_configmap("kube-system", "kube-dns", {"stubDomains": json.dumps(moved)})
            assert poll(lambda: ":5353" in (box.workdir / "Corefile").read_text(), 120, every=0.5)
        requests = node_requests(cp, node)
    refused = [i for i, (*_, code) in enumerate(requests) if code == 401]
    assert refused, requests  # the old token, after the Secret it was bound to was deleted
    assert all(user == AGENT_SA and code < 400 for user, *_, code in requests[refused[-1] + 1 :]), requests
    assert requests[-1][0] == AGENT_SA
