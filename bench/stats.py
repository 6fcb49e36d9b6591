"""Small statistics for the benchmarks: medians across runs, latency percentiles, ratios to the baseline.

Pure functions over plain numbers, so the report's arithmetic is unit-tested apart from any sandbox.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``: a value that was observed, the
    way latency percentiles are usually read ("99.9 % of the queries took at most this long")."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is outside (0, 100]")
    ordered = sorted(values)
    rank = math.ceil(round(q / 100 * len(ordered), 9))  # round: 99.9 / 100 * 1000 is 999.0000000000001
    return ordered[max(rank, 1) - 1]


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of no values")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def median_of_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Field by field median of several runs' results (nested dicts are followed; numbers are combined;
    anything else, and fields a run lacks, are taken from the first run that has them)."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for run in runs for k in run))
    for key in keys:
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, Mapping) for v in values):
            out[key] = median_of_runs(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            m = median(float(v) for v in values)
            out[key] = int(m) if all(isinstance(v, int) for v in values) and m.is_integer() else m
        else:
            out[key] = values[0]
    return out


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """ours / baseline, or None where it means nothing (a missing figure, or 0 / 0). x / 0 is infinite."""
    if ours is None or baseline is None:
        return None
    if baseline == 0:
        return None if ours == 0 else math.inf
    return ours / baseline
