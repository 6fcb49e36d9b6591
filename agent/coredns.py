"""CoreDNS, the child the agent supervises."""

from __future__ import annotations

import subprocess


def coredns_version(binary: str) -> str:
    """CoreDNS's version line, or why it is not available (used by ``agent --version``)."""
    try:
        out = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"coredns not available at {binary}: {exc.strerror}"
    return out.stdout.splitlines()[0] if out.stdout else f"coredns at {binary}: no version output"
