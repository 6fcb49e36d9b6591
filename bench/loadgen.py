"""``tests.dnsload`` with a clock the orchestrator can read: run in a pod namespace, it prints
``start <CLOCK_MONOTONIC>`` the moment it starts sending, then dnsload's JSON summary.

CLOCK_MONOTONIC is one clock for the whole machine (network namespaces do not change it), so the orchestrator
can inject a fault at an exact offset into the load and plot the answers against it.

    python -m bench.loadgen --server 10.96.0.10 --rate 1000 --duration 10 \
        --names web.default.svc.cluster.local
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tests import dnsload


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen")
    p.add_argument("--server", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--names", required=True)
    p.add_argument("--timeout", type=float, default=1.0)
    a = p.parse_args()
    print(f"start {time.monotonic()!r}", flush=True)
    names = a.names.split(",")
    outcome = dnsload.run(a.server, 53, names, rate=a.rate, duration=a.duration, timeout=a.timeout)
    summary = outcome.summary(min(a.duration, dnsload.MAX_DURATION))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
