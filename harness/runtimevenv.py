"""A Python environment with the agent's runtime dependencies only, as the image installs them: what the
agent's memory is measured with. The development environment has more (test and lint tools), and some of it
changes what the agent loads: structlog imports ``rich`` for its console renderer whenever it is installed.

The agent's own code comes from the checkout (``PYTHONPATH``), so the environment depends only on the
dependency list in ``pyproject.toml``; it is built once per list and cached.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/var/cache/node-local-dns-agent")


def dependencies() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def ensure() -> str:
    """The environment's interpreter, built on first use (``pip install`` of the dependency list)."""
    deps = dependencies()
    key = hashlib.sha256("\n".join([sys.version, *deps]).encode()).hexdigest()[:12]
    home = CACHE / f"runtime-venv-{key}"
    python = home / "bin" / "python"
    if python.exists():
        return str(python)
    partial = home.with_name(home.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True, timeout=120)
    subprocess.run([str(partial / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *deps],
                   check=True, timeout=600)  # fmt: skip
    # The interpreter finds its packages from where bin/python is, so the finished environment can move into
    # place (only the pip script's first line names the old directory; nothing here runs it).
    partial.rename(home)
    return str(python)
