"""The Dockerfile ships the CoreDNS release the tests run and starts the agent itself as PID 1.

These read the Dockerfile; tests/integration/test_image.py builds it (with podman) and runs the image."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "image" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PINNED = (REPO / "image" / "coredns.version").read_text().strip()
# Put into the build context by scripts/build-image.sh (from scripts/setup.sh's build), not in the checkout.
NODE_LOCAL_COREDNS = "build/image/coredns-node"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def test_the_image_takes_coredns_at_the_pinned_release_node_local_by_default_full_by_build_argument() -> None:
    args = dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)
    assert f"v{args['COREDNS_VERSION']}" == PINNED
    assert args["COREDNS_PLUGINS"] == "node"  # the node-local build (image/coredns-node); docs/image.md
    froms = [a for i, a in instructions() if i == "FROM"]
    assert "scratch AS coredns-node" in froms
    assert ("COPY", f"{NODE_LOCAL_COREDNS} /coredns") in instructions()
    assert "coredns/coredns:${COREDNS_VERSION} AS coredns-full" in froms  # every plugin: the official image
    assert "coredns-${COREDNS_PLUGINS} AS coredns" in froms
    assert ("COPY", "--from=coredns /coredns /usr/local/bin/coredns") in instructions()


def test_the_agent_is_pid_1_through_an_exec_form_entrypoint() -> None:
    # The shell form would make /bin/sh PID 1, and SIGTERM would never reach the agent.
    [entrypoint] = [a for i, a in instructions() if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["agent"]
    assert not [a for i, a in instructions() if i == "CMD"]


def test_the_runtime_stage_installs_the_built_wheel_offline() -> None:
    steps = instructions()
    last_from = max(n for n, (i, _) in enumerate(steps) if i == "FROM")
    runtime = " ".join(a for i, a in steps[last_from:] if i == "RUN")
    assert (
        "pip install --no-cache-dir --no-index --find-links=/wheels /wheels/node_local_dns_agent-" in runtime
    )
    assert "apt-get install -y --no-install-recommends iptables " in runtime


def test_the_build_context_holds_exactly_what_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines  # everything else is left out
    copied = {
        source.rstrip("/")
        for instruction, args in instructions()
        if instruction == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert copied == allowed
    assert all((REPO / path).exists() for path in copied - {NODE_LOCAL_COREDNS})
