"""The control-plane fixture itself (harness/controlplane.py): the pinned release answers, authentication and
RBAC are on, the session's leak check sees everything it runs while it runs, and nothing is left after."""

from __future__ import annotations

import pytest

from harness import controlplane
from harness import sandbox as sb
from harness.controlplane import ControlPlane


def test_it_runs_the_pinned_release_with_rbac_and_leaves_nothing() -> None:
    reason = controlplane.unavailable()
    if reason:
        pytest.skip(reason)
    with ControlPlane() as cp:
        status, version = cp.get("/version")
        assert status == 200 and version["gitVersion"] == "v1.37.2"
        assert cp.get("/api/v1/namespaces/kube-system/configmaps", token="not-a-token")[0] == 401
        denied = cp.kubectl("auth", "can-i", "create", "pods", "--as=system:serviceaccount:default:x",
                                 check=False)  # fmt: skip
        assert denied.splitlines()[0] == "no"
        found = sb.leftovers({cp.run_id})
        assert f"namespace {cp.namespace}" in found
        assert f"work dir {cp.workdir}" in found
        assert any(f.startswith("etcd pid ") for f in found), found
        assert any(f.startswith("kube-apiserver pid ") for f in found), found
    assert sb.leftovers({cp.run_id}) == []
