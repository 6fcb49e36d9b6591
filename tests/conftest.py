"""Shared fixtures: the node sandbox per iptables flavour, root gating, and the session's leak check
(namespaces, work directories, CoreDNS processes and podman containers of the session's sandbox runs).

In CI (``CI=true``) a skipped integration test fails the session: the integration tests are the proof. That
includes the tests of the real node-cache (the benchmarks' baseline): CI has its binary beside the repository.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from harness import sandbox as sb

if TYPE_CHECKING:
    from harness.cluster import Cluster, ProxyMode

IN_CI = os.environ.get("CI", "").lower() == "true"
_skipped_integration: list[str] = []


def integration_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-legacy", "iptables-nft", "conntrack", "dig"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run make setup)"
    if not os.access(sb.COREDNS, os.X_OK):
        return f"needs CoreDNS at {sb.COREDNS} (run make setup)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = integration_unavailable()
    for item in items:
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "integration" in report.keywords:
        _skipped_integration.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from harness import agentcontainer, cluster  # podman's view and the cgroups, asked when a sandbox ran

    leaks = (
        agentcontainer.leftovers(sb.CREATED_RUNS)
        + cluster.leftovers(sb.CREATED_RUNS)
        + sb.leftovers(sb.CREATED_RUNS)
    )
    if leaks:
        session.config.stash[_leaks_key] = leaks
        agentcontainer.remove_leftovers_of(sb.CREATED_RUNS)
        cluster.remove_leftovers_of(sb.CREATED_RUNS)
        sb.remove_leftovers_of(sb.CREATED_RUNS)
        session.exitstatus = 1
    if IN_CI and _skipped_integration:
        session.exitstatus = 1


_leaks_key = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    leaks = config.stash.get(_leaks_key, [])
    if leaks:
        terminalreporter.section("LEAK CHECK FAILED: the sandbox left these behind")
        for leak in leaks:
            terminalreporter.line(leak)
    if IN_CI and _skipped_integration:
        terminalreporter.section("CI: skipped integration tests count as failures")
        for nodeid in _skipped_integration:
            terminalreporter.line(nodeid)


@pytest.fixture(params=["nft", "legacy"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node_sandbox(flavour: sb.Flavour) -> Iterator[sb.Sandbox]:
    """A fresh sandbox per test, in both iptables flavours."""
    with sb.Sandbox(flavour=flavour) as box:
        yield box


@pytest.fixture(scope="session", params=["iptables", "nftables"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A real single-node cluster (harness/cluster.py) per kube-proxy mode, started once for every cluster
    test of the session: the tests run on one mode's cluster, which is removed before the other's starts."""
    yield from _cluster(request.param)


def _cluster(mode: ProxyMode) -> Iterator[Cluster]:
    from harness import cluster

    reason = cluster.unavailable()
    if reason:
        pytest.skip(reason)
    with cluster.started(mode) as c:
        yield c
    # What the kubelet changed host-wide is put back by stop() (by the last of concurrent clusters).
    assert c.sysctls_restored()


@pytest.fixture(scope="module")
def shared_sandbox() -> Iterator[sb.Sandbox]:
    """One nft sandbox shared by a module's read-only tests."""
    with sb.Sandbox(flavour="nft", pods=2) as box:
        yield box
