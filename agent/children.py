"""The agent's children (CoreDNS, the iptables binaries): how they ended, in words, and their OOM rank.

Every child ranks above the agent for the OOM killer: the agent must outlive its children to fail DNS over
and restart CoreDNS. Where the container's cgroup is not killed as one, the kernel kills the process with the
highest score. CoreDNS's is raised 500 above the agent's, not to 1000: on a bare-metal node CoreDNS must not
become the first victim of the whole node. A short-lived child (an iptables binary) gets the highest score:
killing it costs a retry, and +500 is not enough beside the agent in a cgroup whose limit is near the agent's
own size (the kernel adds 500/1000 of the limit; the agent's memory can outweigh it). Raising a score needs
no privilege. The write follows the child's start by a few microseconds.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

ABOVE_AGENT = 500


def describe_returncode(returncode: int) -> str:
    """Popen's returncode in words: "exited 1", "terminated by SIGKILL"."""
    if returncode < 0:
        try:
            return f"terminated by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"terminated by signal {-returncode}"
    return f"exited {returncode}"


def child_score_adj() -> int:
    try:
        own = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        own = 0
    return min(1000, own + ABOVE_AGENT)


def rank_above_agent(pid: int, *, first: bool = False) -> None:
    """Raise child ``pid``'s score above the agent's, or to the highest (``first``); a child that has already
    exited is left alone."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(1000 if first else child_score_adj()))
