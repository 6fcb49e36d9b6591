"""The cgroup v1 freezer: a process frozen as a deadlocked one looks (no CPU, no stop notice)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from harness.waiting import poll

FREEZER = Path("/sys/fs/cgroup/freezer")


@contextlib.contextmanager
def frozen(pid: int, name: str) -> Iterator[None]:
    """``pid`` frozen by the cgroup freezer: it runs no more, uses no CPU and gets no stop notice (the
    kernel's SIGSTOP path does not see it), as a deadlocked CoreDNS would look. A frozen process dies of
    SIGKILL only once thawed: leave the block as soon as the kill is expected. Thawed and removed after."""
    cgroup = FREEZER / name
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
        (cgroup / "freezer.state").write_text("FROZEN")
        yield
    finally:
        (cgroup / "freezer.state").write_text("THAWED")
        poll(lambda: not (cgroup / "cgroup.procs").read_text().strip(), 5)  # the killed process is gone
        for left in (cgroup / "cgroup.procs").read_text().split():
            (FREEZER / "cgroup.procs").write_text(left)
        cgroup.rmdir()
