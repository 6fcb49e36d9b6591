"""dnsperf 2.10 as the data-path load: its data file, its command line, and reading what it prints.

dnsperf 2.10 has no latency histogram option; with ``-v`` it prints one line per answered query
(``> NOERROR web.default.svc.cluster.local A 0.000123``: rcode, name, type, latency in seconds), which is what
the percentiles are computed from. Its closing statistics give the queries sent, completed and lost and the
achieved queries per second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.sandbox import SERVICES

MAX_SECONDS = 60.0


def cached_names() -> list[tuple[str, str]]:
    """Every name the sandbox's kube-dns answers (Services, headless pods, the "." zone's external names), as
    (name, type); after one query each sits in the local cache for its 30 s TTL."""
    names = [*SERVICES.records, *SERVICES.headless, *SERVICES.external]
    return [(name, "A") for name in names]


def data_file(names: Iterable[tuple[str, str]]) -> str:
    """dnsperf's input format: one ``NAME TYPE`` per line."""
    return "".join(f"{name} {rtype}\n" for name, rtype in names)


def argv(server: str, datafile: str, *, seconds: float, max_qps: int | None = None,
         verbose: bool = False, timeout: float = 1.0) -> list[str]:  # fmt: skip
    """A bounded dnsperf run: at most ``seconds`` (capped at MAX_SECONDS), at most ``max_qps`` if given."""
    seconds = min(seconds, MAX_SECONDS)
    out = ["dnsperf", "-s", server, "-d", datafile, "-l", f"{seconds:g}", "-t", f"{timeout:g}"]
    if max_qps is not None:
        out += ["-Q", str(max_qps)]
    if verbose:
        out.append("-v")
    return out


def warm_argv(server: str, datafile: str) -> list[str]:
    """One pass through the data file (``-n 1``): every name queried once, so it is cached."""
    return ["dnsperf", "-s", server, "-d", datafile, "-n", "1", "-l", "10", "-t", "1"]


class DnsperfOutputError(ValueError):
    """dnsperf's output lacks its statistics block (it failed, or its format changed)."""


@dataclass(frozen=True)
class DnsperfResult:
    sent: int
    completed: int
    lost: int
    qps: float
    latencies: tuple[float, ...]  # seconds, one per answered query (only with -v)


_STAT = {
    "sent": re.compile(r"^\s*Queries sent:\s+(\d+)", re.M),
    "completed": re.compile(r"^\s*Queries completed:\s+(\d+)", re.M),
    "lost": re.compile(r"^\s*Queries lost:\s+(\d+)", re.M),
    "qps": re.compile(r"^\s*Queries per second:\s+([\d.]+)", re.M),
}
_QUERY_LINE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$")


def parse(text: str) -> DnsperfResult:
    """Read dnsperf's stdout; raises DnsperfOutputError naming the missing statistic."""
    found: dict[str, str] = {}
    for key, pattern in _STAT.items():
        m = pattern.search(text)
        if m is None:
            raise DnsperfOutputError(f"dnsperf output has no '{key}' statistic: {text[-300:]!r}")
        found[key] = m.group(1)
    return DnsperfResult(
        sent=int(found["sent"]),
        completed=int(found["completed"]),
        lost=int(found["lost"]),
        qps=float(found["qps"]),
        latencies=tuple(latencies(text.splitlines())),
    )


def latencies(lines: Sequence[str]) -> list[float]:
    """Latency of each answered query in ``-v`` lines (any rcode: the path's latency, not the answer's)."""
    out = []
    for line in lines:
        m = _QUERY_LINE.match(line)
        if m:
            out.append(float(m.group(2)))
    return out
