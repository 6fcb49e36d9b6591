"""``agent --check``: the liveness probe. Exit 0 when the agent's loop made progress recently.

It runs every few seconds on every node, so it imports only the status module: no structlog, no
prometheus, no netlink. It does not fail because CoreDNS is unhealthy — the agent handles that itself and
keeps DNS on the fallback path; restarting the agent would not help. It fails when the agent is gone, its
loop is stuck, or its shutdown overran.
"""

from __future__ import annotations

import os
import sys

from agent.config import Settings
from agent.status import now, read_status

# A shutdown that takes longer than this is stuck (the agent bounds its teardown well below it).
SHUTDOWN_STUCK_AFTER = 30.0


def liveness(settings: Settings) -> tuple[bool, str]:
    path = settings.status_file
    try:
        status = read_status(path)
    except FileNotFoundError:
        return False, f"no status file at {path}: the agent is not running"
    except (OSError, ValueError, TypeError) as exc:
        return False, f"unreadable status file {path}: {exc}"
    try:
        os.kill(status.pid, 0)
    except ProcessLookupError:
        return False, f"the agent (pid {status.pid}) is gone"
    except PermissionError:
        pass  # alive, owned by someone else
    age = now() - status.heartbeat
    if status.shutting_down_since is not None and now() - status.shutting_down_since > SHUTDOWN_STUCK_AFTER:
        return False, f"shutdown stuck for {now() - status.shutting_down_since:.1f}s"
    if age > settings.check_max_age:
        return False, f"the agent's loop made no progress for {age:.1f}s (limit {settings.check_max_age}s)"
    serving = "serving" if status.serving else "on the fallback path"
    return True, f"alive: loop {age:.1f}s ago, coredns {status.state}, {serving}"


def check(settings: Settings) -> int:
    ok, reason = liveness(settings)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
