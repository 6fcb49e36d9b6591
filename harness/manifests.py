"""The shipped manifests as an operator deploys them: the documented sed run by sed itself, the offline
checker (scripts/check_manifest.py), and the objects of a multi-document YAML text by kind and name."""

from __future__ import annotations

import copy
import json
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
    """The sed command the manifest's header gives for a kube-proxy mode (docs/install.md gives the same)."""
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


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The two JSON-patch operations the documented `kubectl patch` uses (RFC 6902 add/replace)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].lstrip("/").split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        elif op["op"] in {"add", "replace"} and isinstance(target, dict):
            assert op["op"] == "add" or last in target, f"replace of missing {op['path']}"
            target[last] = op["value"]
        else:
            raise AssertionError(f"unsupported patch operation {op}")
    return doc


def documented_patch() -> list[dict[str, Any]]:
    """The JSON patch of the documented `kubectl patch` that turns the API source on."""
    match = re.search(r"patch daemonset node-local-dns --type=json -p '(\[.*\])'", API_RBAC.read_text())
    assert match, "the enabling kubectl patch is documented in nodelocaldns-api.yaml"
    ops: list[dict[str, Any]] = json.loads(match.group(1))
    return ops
