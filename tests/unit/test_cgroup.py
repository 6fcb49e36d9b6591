"""The cgroup reader on both layouts, in the kernel's own file formats (cgroup-v2.rst, cgroup-v1/memory.rst):
the memory limit behind GOMEMLIMIT and the OOM-kill count that confirms an OOM."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.coredns.cgroup import Cgroup, gomemlimit_for

V2_EVENTS = "low 0\nhigh 0\nmax 41\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
V1_UNLIMITED = "9223372036854771712\n"  # what v1 prints for "no limit": LONG_MAX rounded down to a page


def layout(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/4242/cgroup with ``membership`` and a fake cgroup root holding ``files``."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(membership)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_v2_reads_memory_max_and_the_oom_kill_count_of_the_pods_cgroup(tmp_path: Path) -> None:
    pod = "kubepods.slice/kubepods-burstable.slice/cri-containerd-abc.scope"
    proc, root = layout(tmp_path, f"0::/{pod}\n", {f"{pod}/memory.max": "268435456\n",
                                                    f"{pod}/memory.events": V2_EVENTS})  # fmt: skip
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup == Cgroup(root / pod)
    assert cgroup.memory_limit() == 256 << 20
    assert cgroup.oom_kills() == 2  # "oom_kill", not "oom" (allocations that hit the limit) nor "max"


def test_v2_max_means_no_limit(tmp_path: Path) -> None:
    proc, root = layout(
        tmp_path, "0::/agent\n", {"agent/memory.max": "max\n", "agent/memory.events": V2_EVENTS}
    )
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup is not None and cgroup.memory_limit() is None
    assert gomemlimit_for(cgroup.memory_limit()) is None


def test_v1_reads_the_memory_controllers_hierarchy_even_on_a_hybrid_host(tmp_path: Path) -> None:
    # A hybrid host lists the unified hierarchy too, but it holds no memory files: v1 is the one to read.
    membership = "9:name=systemd:/\n4:memory:/kubepods/pod1/abc\n3:cpu,cpuacct:/kubepods/pod1/abc\n0::/\n"
    pod = "memory/kubepods/pod1/abc"
    files = {f"{pod}/memory.limit_in_bytes": "134217728\n", f"{pod}/memory.oom_control": V1_OOM_CONTROL}
    proc, root = layout(tmp_path, membership, files)
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup == Cgroup(root / pod)
    assert cgroup.memory_limit() == 128 << 20
    assert cgroup.oom_kills() == 1


def test_v1_unlimited_is_no_limit(tmp_path: Path) -> None:
    proc, root = layout(tmp_path, "4:memory:/\n", {"memory/memory.limit_in_bytes": V1_UNLIMITED})
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup is not None and cgroup.memory_limit() is None


@pytest.mark.parametrize("membership", ["", "1:cpu:/x\n"])
def test_no_memory_cgroup_is_unknown(tmp_path: Path, membership: str) -> None:
    proc, root = layout(tmp_path, membership, {})
    assert Cgroup.of(4242, root=root, proc=proc) is None
    assert Cgroup.of(9999, root=root, proc=proc) is None  # no such process


def test_missing_files_are_unknown_not_errors(tmp_path: Path) -> None:
    cgroup = Cgroup(tmp_path / "gone")
    assert cgroup.memory_limit() is None
    assert cgroup.oom_kills() is None


def test_gomemlimit_leaves_a_fifth_of_the_limit_to_the_agent() -> None:
    assert gomemlimit_for(None) is None
    assert gomemlimit_for(200 << 20) == "160MiB"
    assert gomemlimit_for(170 << 20) == "136MiB"


def test_twins_share_the_limit_evenly() -> None:
    assert gomemlimit_for(200 << 20, instances=2) == "80MiB"


def test_v1_in_a_container_without_a_cgroup_namespace_reads_its_own_cgroup_mounted_at_the_root(
    tmp_path: Path,
) -> None:
    # runc without a cgroup namespace: /proc/self/cgroup names the host's path, but the container sees its
    # own memory cgroup mounted at /sys/fs/cgroup/memory itself.
    membership = "4:memory:/libpod_parent/libpod-0123abcd\n0::/\n"
    files = {"memory/memory.limit_in_bytes": "67108864\n", "memory/memory.oom_control": V1_OOM_CONTROL}
    proc, root = layout(tmp_path, membership, files)
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup == Cgroup(root / "memory")
    assert cgroup.memory_limit() == 64 << 20
    assert cgroup.oom_kills() == 1


def test_v2_in_a_container_without_a_cgroup_namespace_reads_its_own_cgroup_mounted_at_the_root(
    tmp_path: Path,
) -> None:
    membership = "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope\n"
    proc, root = layout(tmp_path, membership, {"memory.max": "67108864\n", "memory.events": V2_EVENTS})
    cgroup = Cgroup.of(4242, root=root, proc=proc)
    assert cgroup == Cgroup(root)
    assert cgroup.memory_limit() == 64 << 20
