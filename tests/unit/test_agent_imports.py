"""What the agent's process loads on its default path (the ConfigMap directory, the metrics port): nothing it
does not use there. Each module costs every node resident memory (the benchmarks page's import table): the
Kubernetes client and ``requests`` belong to the API source alone."""

from __future__ import annotations

import json
import subprocess
import sys

from harness.agentproc import REPO

# Modules of the API source's path only: the kubernetes client and the HTTP stack it brings.
API_SOURCE_ONLY = ("kubernetes", "requests", "urllib3", "charset_normalizer", "idna", "yaml", "oauthlib")


def test_the_directory_path_loads_neither_the_kubernetes_client_nor_requests() -> None:
    probe = (
        "import json, sys\n"
        "import agent.run, agent.sources.directory, agent.observe.metrics_http, agent.supervisor.loop\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "agent" in loaded
    assert loaded.isdisjoint(API_SOURCE_ONLY), sorted(loaded & set(API_SOURCE_ONLY))
