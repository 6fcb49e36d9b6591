"""``harness.dnsload`` with a clock the orchestrator can read: run in a pod namespace, it prints
``start <CLOCK_MONOTONIC>`` the moment it starts sending, then dnsload's JSON summary.

CLOCK_MONOTONIC is one clock for the whole machine (network namespaces do not change it), so the orchestrator
can inject a fault at an exact offset into the load and plot the answers against it.

    python -m bench.loadgen --server 10.96.0.10 --rate 1000 --duration 10 \
        --names web.default.svc.cluster.local

With ``--per-second`` (the soak's long runs) nothing is kept for the whole run: once every query sent in
second ``k`` of the load has an outcome, one line ``second {"s": k, "ok": …, "failed": …, "fail_ms": […],
"errors": {…}}`` gives them (``fail_ms``: when each failed query was sent, in ms into that second), and the
last line is the run's JSON summary. Such a run may last up to ``MAX_PER_SECOND_DURATION``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import dnsload

SECOND_PREFIX = "second "
# The soak's longest run (its 20 minutes plus margin, with room for longer runs by hand); still a bound.
MAX_PER_SECOND_DURATION = 4 * 3600.0


@dataclass
class _Second:
    ok: int = 0
    failed: int = 0
    fail_ms: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


class PerSecond(dnsload.Outcome):
    """Counts outcomes by the second (of the load) in which each query was sent, and hands each second to
    ``emit`` once no query of it can still be pending (every query ends within ``timeout``)."""

    def __init__(self, timeout: float, emit: Callable[[str], None]) -> None:
        super().__init__()
        self._timeout = timeout
        self._emit = emit
        self._seconds: dict[int, _Second] = {}

    def begin(self, start: float) -> None:
        super().begin(start)
        self._emit(f"start {start!r}")

    def answer(self, sent_at: float, answered_at: float) -> None:
        self.answered += 1
        self._second(sent_at).ok += 1
        self._flush(answered_at)

    def fail(self, sent_at: float, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1
        second = self._second(sent_at)
        second.failed += 1
        second.fail_ms.append(int((sent_at % 1.0) * 1000))
        second.errors[why] = second.errors.get(why, 0) + 1
        self._flush(time.monotonic() - self.start)

    def finish(self) -> None:
        self._flush(float("inf"))

    def _second(self, sent_at: float) -> _Second:
        return self._seconds.setdefault(int(sent_at), _Second())

    def _flush(self, now: float) -> None:
        # dnsload expires a pending query at its next loop turn (at most 50 ms late): a margin of 0.2 s.
        for k in sorted(self._seconds):
            if k + 1 + self._timeout + 0.2 > now:
                break
            s = self._seconds.pop(k)
            line = {"s": k, "ok": s.ok, "failed": s.failed, "fail_ms": s.fail_ms, "errors": s.errors}
            self._emit(SECOND_PREFIX + json.dumps(line, separators=(",", ":")))


def read_names(spec: str) -> list[str]:
    """``a,b,c``, or ``@FILE`` with one name per line (lists too long for one argument: the full cache's)."""
    if spec.startswith("@"):
        with open(spec[1:]) as f:
            return [line.strip() for line in f if line.strip()]
    return spec.split(",")


def _print(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen")
    p.add_argument("--server", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--names", required=True, help="comma-separated, or @FILE with one name per line")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--per-second", action="store_true", help="stream the outcomes second by second")
    a = p.parse_args()
    names = read_names(a.names)
    if a.per_second:
        per_second = PerSecond(a.timeout, _print)
        dnsload.run(a.server, 53, names, rate=a.rate, duration=a.duration, timeout=a.timeout,
                    outcome=per_second, max_duration=MAX_PER_SECOND_DURATION)  # fmt: skip
        per_second.finish()
        totals = {"sent": per_second.sent, "answered": per_second.answered, "failed": per_second.failed,
                  "errors": per_second.errors}  # fmt: skip
        print(json.dumps(totals), flush=True)
        return 0
    print(f"start {time.monotonic()!r}", flush=True)
    outcome = dnsload.run(a.server, 53, names, rate=a.rate, duration=a.duration, timeout=a.timeout)
    summary = outcome.summary(min(a.duration, dnsload.MAX_DURATION))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
