"""The status file: the agent's loop records its progress here; ``agent --check`` reads it.

Kept dependency-free: ``agent --check`` imports this module and nothing heavy. Times are CLOCK_MONOTONIC
seconds, which every process on the node reads alike and which never jumps with the wall clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Status:
    pid: int
    heartbeat: float  # time.monotonic() of the loop's last completed cycle
    state: str  # the CoreDNS state (agent.supervisor.states.CoreDnsState)
    serving: bool  # host traffic goes through the local cache
    detail: str  # the cause of the last state change
    shutting_down_since: float | None = None  # time.monotonic() when shutdown began


def write_status(path: Path, status: Status) -> None:
    """Atomically replace the status file (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(status), f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_status(path: Path) -> Status:
    return Status(**json.loads(path.read_text()))


def now() -> float:
    return time.monotonic()
