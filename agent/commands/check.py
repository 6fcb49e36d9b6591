"""``agent --check``, the liveness probe, and ``agent --ready``, the readiness probe.

``--check`` exits 0 when the agent's loop made progress recently. It does not fail because CoreDNS is
unhealthy — the agent handles that itself and keeps DNS on the fallback path; restarting the agent would
not help. It fails when the agent is gone, its loop is stuck, or its shutdown overran.

``--ready`` exits 0 when, on top of that, this agent serves the node: its own CoreDNS answers on every local
address and the rules are in place. It reads this container's status file, so during a surge upgrade it
speaks for this pod alone, where an HTTP probe of a port both CoreDNS processes share is answered by
either of them.

They run every few seconds on every node, so they import only the status module: no structlog, no
prometheus, no netlink.
"""

from __future__ import annotations

import os
import sys

from agent.observe.status import Status, now, read_status
from agent.settings import Settings

# A shutdown that takes longer than this is stuck (the agent bounds its teardown well below it).
SHUTDOWN_STUCK_AFTER = 30.0


def _alive(settings: Settings) -> tuple[Status | None, str]:
    """The status of a live agent, or None and why it is not alive."""
    path = settings.status_file
    try:
        status = read_status(path)
    except FileNotFoundError:
        return None, f"no status file at {path}: the agent is not running"
    except (OSError, ValueError, TypeError) as exc:
        return None, f"unreadable status file {path}: {exc}"
    try:
        os.kill(status.pid, 0)
    except ProcessLookupError:
        return None, f"the agent (pid {status.pid}) is gone"
    except PermissionError:
        pass  # alive, owned by someone else
    age = now() - status.heartbeat
    if status.shutting_down_since is not None and now() - status.shutting_down_since > SHUTDOWN_STUCK_AFTER:
        return None, f"shutdown stuck for {now() - status.shutting_down_since:.1f}s"
    if age > settings.check_max_age:
        return None, f"the agent's loop made no progress for {age:.1f}s (limit {settings.check_max_age}s)"
    serving = "serving" if status.serving else "on the fallback path"
    return status, f"alive: loop {age:.1f}s ago, coredns {status.state}, {serving}"


def liveness(settings: Settings) -> tuple[bool, str]:
    status, reason = _alive(settings)
    return status is not None, reason


def readiness(settings: Settings) -> tuple[bool, str]:
    status, reason = _alive(settings)
    if status is None:
        return False, reason
    if status.shutting_down_since is not None:
        return False, f"shutting down: {status.detail}"
    if not status.serving:
        return False, f"not serving: coredns {status.state}: {status.detail}"
    return True, reason


def check(settings: Settings, *, ready: bool = False) -> int:
    ok, reason = (readiness if ready else liveness)(settings)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
