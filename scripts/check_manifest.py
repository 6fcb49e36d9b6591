#!/usr/bin/env python3
"""Check node-local-dns manifests offline against the Kubernetes API schemas (package kubernetes-validate).

    python scripts/check_manifest.py [--mode iptables|ipvs] [--print] [-k VERSION ...] FILE...

With ``--mode`` the ``__PILLAR__`` placeholders are first replaced as the documented sed instructions
(docs/install.md) for that
kube-proxy mode do (with example addresses), so the unmodified image/nodelocaldns.yaml can be checked.
Without it the files are checked as they are, e.g. your copy after the sed. Every object is validated
strictly (unknown fields are errors) against each Kubernetes minor version from MIN_KUBERNETES to the newest
the package knows. Placeholders may remain only in a ConfigMap's data: the agent fills those at run time.
Exits 1 naming each object and field that is wrong.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions

MIN_KUBERNETES = "1.28"
EXAMPLE = {"localdns": "169.254.20.10", "domain": "cluster.local", "kubedns": "10.96.0.10"}
# The documented sed expressions (docs/install.md), in order, per kube-proxy mode.
SED = {
    "iptables": [
        ("__PILLAR__LOCAL__DNS__", EXAMPLE["localdns"]),
        ("__PILLAR__DNS__DOMAIN__", EXAMPLE["domain"]),
        ("__PILLAR__DNS__SERVER__", EXAMPLE["kubedns"]),
    ],
    "ipvs": [
        ("__PILLAR__LOCAL__DNS__", EXAMPLE["localdns"]),
        ("__PILLAR__DNS__DOMAIN__", EXAMPLE["domain"]),
        (",__PILLAR__DNS__SERVER__", ""),
        ("__PILLAR__CLUSTER__DNS__", EXAMPLE["kubedns"]),
    ],
}
PLACEHOLDER = re.compile(r"__PILLAR__(?:[A-Z]+__)+")


def substitute(text: str, mode: str) -> str:
    for old, new in SED[mode]:
        text = text.replace(old, new)
    return text


def versions(minimum: str = MIN_KUBERNETES) -> list[str]:
    """Every minor version the installed kubernetes-validate has schemas for, from ``minimum`` on."""

    def minor(v: str) -> tuple[int, int]:
        major, rest = v.split(".", 1)
        return int(major), int(rest.split(".")[0])

    return sorted(
        {f"{minor(v)[0]}.{minor(v)[1]}" for v in all_versions() if minor(v) >= minor(minimum)}, key=minor
    )


def describe(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))
    return f"{doc.get('kind')} {where}"


def _strings(value: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def check_document(doc: Any, kube_versions: list[str]) -> list[str]:
    if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
        return [f"not a Kubernetes object (needs apiVersion, kind and metadata): {str(doc)[:80]!r}"]
    name = describe(doc)
    problems = []
    for path, text in _strings(
        {k: v for k, v in doc.items() if not (doc["kind"] == "ConfigMap" and k == "data")}
    ):
        for placeholder in sorted(set(PLACEHOLDER.findall(text))):
            problems.append(f"{name}: {placeholder} left at {path.lstrip('.')} (apply the sed instructions)")
    for version in kube_versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            field = ".".join(str(p) for p in exc.path) or "(top level)"
            problems.append(f"{name} (Kubernetes {version}): {field}: {exc.message}")
            break  # the same mistake in every later version says nothing new
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
            break
    return problems


def check_text(text: str, kube_versions: list[str], source: str) -> tuple[list[str], list[str]]:
    """(ok lines, problems) for every object in a multi-document YAML text."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [], [f"{source}: not valid YAML: {exc}"]
    if not docs:
        return [], [f"{source}: no Kubernetes object in it"]
    ok, problems = [], []
    for doc in docs:
        found = check_document(doc, kube_versions)
        problems += [f"{source}: {p}" for p in found]
        if not found:
            ok.append(f"ok  {source}: {describe(doc)} (Kubernetes {kube_versions[0]}..{kube_versions[-1]})")
    return ok, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument(
        "--mode", choices=sorted(SED), help="substitute placeholders as the sed for this mode"
    )
    parser.add_argument("--print", action="store_true", help="print the substituted text instead of checking")
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="kube_versions", metavar="X.Y")
    args = parser.parse_args(argv)
    kube_versions = args.kube_versions or versions()
    problems: list[str] = []
    for path in args.files:
        try:
            text = path.read_text()
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        if args.mode:
            text = substitute(text, args.mode)
        if args.print:
            sys.stdout.write(text)
            continue
        ok, found = check_text(text, kube_versions, f"{path}" + (f" [{args.mode}]" if args.mode else ""))
        print("\n".join(ok))
        problems += found
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
