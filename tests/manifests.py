"""The shipped manifests as an operator deploys them: the documented sed run by sed itself, the offline
checker (scripts/check_manifest.py), and the objects of a multi-document YAML text by kind and name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "image" / "nodelocaldns.yaml"
API_RBAC = REPO / "image" / "nodelocaldns-api.yaml"
CHECKER = REPO / "scripts" / "check_manifest.py"
LOCALDNS, DOMAIN, KUBEDNS = "169.254.20.10", "cluster.local", "10.96.0.10"
MODES = {"iptables": "iptables mode", "ipvs": "IPVS mode"}


def documented_sed(mode: str) -> str:
    """The sed command the manifest's header gives for a kube-proxy mode (the README gives the same)."""
    match = re.search(rf"^#\s+{MODES[mode]}:\s+(sed -i .*)$", MANIFEST.read_text(), re.MULTILINE)
    assert match, f"no sed instruction for {MODES[mode]} in {MANIFEST}"
    return match.group(1)


def run_sed(
    mode: str, tmp_path: Path, localdns: str = LOCALDNS, domain: str = DOMAIN, kubedns: str = KUBEDNS
) -> str:
    """The manifest after an operator's steps: the documented sed, run by sed itself."""
    target = tmp_path / "nodelocaldns.yaml"
    target.write_text(MANIFEST.read_text())
    script = f"localdns={localdns}; domain={domain}; kubedns={kubedns}; {documented_sed(mode)}"
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=10)
    return target.read_text()


def checker(*args: str) -> subprocess.CompletedProcess[str]:
    """scripts/check_manifest.py with these arguments."""
    return subprocess.run(
        [sys.executable, str(CHECKER), *args], capture_output=True, text=True, timeout=60, check=False
    )


def objects(text: str) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(text) if d}
