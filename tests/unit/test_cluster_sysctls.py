"""The cluster fixture's record of the host-wide sysctls the kubelet changes (harness/cluster.py), on files of
a temporary directory in place of /proc/sys: clusters that overlap put the machine's values back, whatever
order they stop in, and a start repairs what crashed clusters left."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from harness import cluster
from harness import sandbox as sb

MACHINE = {"vm/overcommit_memory": "0", "kernel/panic": "1", "kernel/panic_on_oops": "0"}
KUBELET = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "sys"
    for key, value in MACHINE.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(value + "\n")
    monkeypatch.setattr(cluster, "SYSCTL_ROOT", root)
    monkeypatch.setattr(cluster, "SYSCTL_RECORD", tmp_path / "run" / "cluster-sysctls.json")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the runs' work dirs live
    return tmp_path


def start(machine: Path, run_id: str) -> dict[str, str]:
    """A cluster's start: its work dir, its record, then its kubelet changing the values."""
    (machine / f"{sb.PREFIX}-{run_id}-work").mkdir()
    original = cluster.join_sysctl_record(run_id)
    for key, value in KUBELET.items():
        (cluster.SYSCTL_ROOT / key).write_text(value)
    return original


def test_overlapping_clusters_put_the_machine_values_back_in_either_stop_order(machine: Path) -> None:
    assert start(machine, "aaaaaa") == MACHINE
    assert start(machine, "bbbbbb") == MACHINE  # not the first kubelet's values
    cluster.leave_sysctl_record("aaaaaa")  # the first to start stops first
    assert cluster.host_sysctls() == KUBELET  # the other kubelet still runs
    cluster.leave_sysctl_record("bbbbbb")
    assert cluster.host_sysctls() == MACHINE
    assert not cluster.SYSCTL_RECORD.exists()


def test_a_start_puts_back_what_crashed_clusters_left(machine: Path) -> None:
    start(machine, "cccccc")
    (machine / f"{sb.PREFIX}-cccccc-work").rmdir()  # it crashed; the leak check removed its work dir
    assert cluster.host_sysctls() == KUBELET
    assert start(machine, "dddddd") == MACHINE
    cluster.leave_sysctl_record("dddddd")
    assert cluster.host_sysctls() == MACHINE
