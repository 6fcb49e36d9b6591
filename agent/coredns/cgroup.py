"""What the agent's cgroup says: the memory limit (for GOMEMLIMIT) and the OOM-kill count (to confirm OOMs).

cgroup v2 first (``memory.max``, ``memory.events``), then v1 (``memory.limit_in_bytes``,
``memory.oom_control``). A missing or unreadable file means "unknown", never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# cgroup v1 reports "no limit" as a page-rounded huge number.
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup directory of a process (default: this one)."""

    path: Path

    @classmethod
    def of(
        cls, pid: int | str = "self", root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc")
    ) -> Cgroup | None:
        try:
            lines = (proc / str(pid) / "cgroup").read_text().splitlines()
        except OSError:
            return None
        # In a container without a cgroup namespace (runc on cgroup v1, or v2 without cgroupns), the path
        # named here is the host's, while the container's own cgroup is mounted at the root itself.
        for line in lines:
            hierarchy, controllers, rel = line.split(":", 2)
            if hierarchy == "0" and controllers == "":  # v2 unified
                for candidate in (root / rel.lstrip("/"), root):
                    if (candidate / "memory.events").exists() or (candidate / "memory.max").exists():
                        return cls(candidate)
            elif "memory" in controllers.split(","):  # v1
                candidate = root / "memory" / rel.lstrip("/")
                if not candidate.is_dir() and (root / "memory" / "memory.limit_in_bytes").exists():
                    candidate = root / "memory"
                return cls(candidate)
        return None

    def memory_limit(self) -> int | None:
        """Bytes, or None when unlimited or unknown."""
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (self.path / name).read_text().strip()
            except OSError:
                continue
            if text == "max":
                return None
            value = int(text)
            return None if value >= _V1_UNLIMITED else value
        return None

    def oom_kills(self) -> int | None:
        """How many processes the kernel's OOM killer killed in this cgroup so far, or None if unknown."""
        for name in ("memory.events", "memory.oom_control"):
            try:
                lines = (self.path / name).read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return None


def gomemlimit_for(limit: int | None, share: float = 0.8, instances: int = 1) -> str | None:
    """GOMEMLIMIT for each CoreDNS: a share of the container's limit, leaving room for the agent itself,
    split evenly between ``instances`` twins.

    The Go runtime then collects garbage harder as CoreDNS nears the limit instead of being OOM-killed.
    """
    if limit is None:
        return None
    return f"{int(limit * share / instances) // (1 << 20)}MiB"
