"""The benchmarks' pure logic: dnsperf's output, percentiles and medians, the section of docs/benchmarks.md,
its markers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.failover import SCENARIOS, stub_reload_model
from bench.report import (
    BEGIN,
    END,
    PLOT_FILE,
    PLOT_PATH_IN_DOC,
    TIMES,
    MarkerError,
    fmt_ratio,
    render_section,
    replace_between_markers,
)
from bench.run import sigkill_timeline
from bench.stats import median, median_of_runs, percentile, ratio
from harness import dnsperf

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS_PAGE = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "bench" / "results"

# dnsperf 2.10's stdout for a short -v run, as it prints it (two queries shown of the run).
DNSPERF_OUTPUT = """DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 10.96.0.10 -d q.txt -l 2 -v
[Status] Sending queries (to 10.96.0.10:53)
> NOERROR web.default.svc.cluster.local A 0.004258
> SERVFAIL db.prod.svc.cluster.local A 0.000120
> T example.org A
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         55047
  Queries completed:    55046 (100.00%)
  Queries lost:         1 (0.00%)

  Response codes:       NOERROR 55046 (100.00%)
  Average packet size:  request 47, response 139
  Run time (s):         2.003143
  Queries per second:   27480.314685

  Average Latency (s):  0.003120 (min 0.000037, max 0.027776)
  Latency StdDev (s):   0.002288
"""


def test_dnsperf_statistics_and_per_query_latencies_are_read() -> None:
    result = dnsperf.parse(DNSPERF_OUTPUT)
    assert (result.sent, result.completed, result.lost) == (55047, 55046, 1)
    assert result.qps == pytest.approx(27480.314685)
    assert result.latencies == (0.004258, 0.000120)  # a lost query ("T", no latency) has none


def test_dnsperf_output_without_statistics_names_what_is_missing() -> None:
    with pytest.raises(dnsperf.DnsperfOutputError, match="'sent'"):
        dnsperf.parse("Error: socket: Operation not permitted\n")


def test_dnsperf_runs_are_bounded_in_time() -> None:
    argv = dnsperf.argv("10.96.0.10", "q.txt", seconds=3600, max_qps=5000, verbose=True)
    assert argv[argv.index("-l") + 1] == f"{dnsperf.MAX_SECONDS:g}"
    assert argv[argv.index("-Q") + 1] == "5000" and "-v" in argv
    assert "-n" in dnsperf.warm_argv("10.96.0.10", "q.txt")


def test_the_data_file_lists_every_cached_name_once() -> None:
    lines = dnsperf.data_file(dnsperf.cached_names()).splitlines()
    assert len(lines) == len(set(lines)) > 5
    assert "web.default.svc.cluster.local A" in lines


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1000, 0, -1)]
    assert [percentile(values, q) for q in (50, 99, 99.9, 100)] == [500, 990, 999, 1000]
    assert percentile([7.0], 99.9) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_medians_are_taken_field_by_field_through_nested_results() -> None:
    runs = [
        {"qps": 10.0, "failed": 3, "kind": {"gap": 0.5}, "label": "a"},
        {"qps": 30.0, "failed": 1, "kind": {"gap": 0.1}, "label": "b"},
        {"qps": 20.0, "failed": 2, "kind": {"gap": 0.3}, "extra": 4},
    ]
    assert median_of_runs(runs) == {"qps": 20.0, "failed": 2, "kind": {"gap": 0.3}, "label": "a", "extra": 4}
    assert median([4, 1, 3, 2]) == 2.5


def test_ratios_to_a_zero_baseline_are_infinite_or_meaningless() -> None:
    assert ratio(1, 4) == 0.25
    assert ratio(0, 0) is None and ratio(None, 3) is None
    assert ratio(2, 0) == math.inf
    assert fmt_ratio(ratio(2, 0)) == "∞" and fmt_ratio(None) == "—"


def test_node_cache_stub_reload_delay_follows_its_poll_and_the_reload_plugin() -> None:
    # ConfigMap poll every 10 s (mean wait 5 s); reload plugin every 30 s ± 7.5 s (mean wait 15 s).
    assert stub_reload_model() == {"mean_s": 20.0, "max_s": 47.5}


def test_the_section_replaces_only_what_is_between_the_markers() -> None:
    readme = f"# Title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Next\n"
    updated = replace_between_markers(readme, "## Benchmarks\n\nnew table\n")
    assert updated == f"# Title\n\nintro\n\n{BEGIN}\n## Benchmarks\n\nnew table\n{END}\n\n## Next\n"
    assert replace_between_markers(updated, "## Benchmarks\n\nnew table\n") == updated


@pytest.mark.parametrize("text", ["no markers at all", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{BEGIN}\n{END}\n"])
def test_a_readme_without_one_pair_of_ordered_markers_is_refused(text: str) -> None:
    with pytest.raises(MarkerError):
        replace_between_markers(text, "section")


def _scenario(failed: int, gap: float) -> dict[str, Any]:
    return {"failed": failed, "longest_gap_s": gap, "fault_at_s": 3.0, "answers_per_100ms": [100, 0, 100]}


def _results(baseline_failed: list[int]) -> dict[str, Any]:
    runs = [
        {"failover": {s: {"ours": _scenario(2, 0.01), "node_cache": _scenario(n, 1.5)} for s in SCENARIOS}}
        for n in baseline_failed
    ]
    path = {"qps": 40000.0, "p50_ms": 0.1, "p99_ms": 0.3, "p999_ms": 1.0, "conntrack_per_100k": 0}
    no_agent = {**path, "conntrack_per_100k": 99000}
    return {
        "meta": {
            "command": "make bench", "date": "2026-01-01 00:00 UTC", "runs": len(runs), "flavour": "nft",
            "machine": {"nproc": 2, "cpu": "CPU", "memory_gib": 23.5, "kernel": "6.1",
                        "coredns": "CoreDNS-1.14.7", "python": "3.11"},
            "plans": {
                "failover": {"rate": 1000, "duration": 10, "fault_at": 3, "kubelet_delay": 1.0,
                             "stub_reload_model": stub_reload_model()},
                "datapath": {"latency_qps": 5000, "conntrack_seconds": 5, "conntrack_rate": 2000},
                "cost": {"load_rate": 1000, "node_cache_sync_interval_s": 60.0},
            },
        },
        "median": {
            "datapath": {"ours": path, "node_cache": path, "no_agent": no_agent, "ceiling": path},
            "failover": median_of_runs([r["failover"] for r in runs]),
            "cost": {"first_answer_s": 0.5, "restore_s": 0.02,
                     "node_cache_restore_s": 31.2, "node_cache_restore_max_s": 52.7,
                     "check": {"wall_ms": 50.0, "peak_rss_mib": 22.0}},
        },
        "runs": runs,
    }  # fmt: skip


def test_the_section_has_a_row_per_fault_with_its_ratio_to_the_baseline() -> None:
    section = render_section(_results([1500, 1400, 1600]))
    for title in ("SIGKILL CoreDNS", "SIGSTOP CoreDNS", "rolling restart", "stub-domain reload"):
        assert f"| {title}" in section
    x = TIMES
    assert f"| 2 | 0.010 s | 1 500 | 1.500 s | 0.00{x} | 0.01{x} |" in section  # median baseline: 1500
    assert f"| ratio ours ÷ no local cache | 1.00{x} | 1.00{x} | 1.00{x} | 1.00{x} | 0.00{x} |" in section
    assert "Medians of 3 runs" in section and "The baseline is the real node-cache 1.26.7" in section
    assert "(../bench/results/sigkill.png)" in section
    assert (
        "| flushed rules restored after | 0.020 s | 31.2 s (median; longest 52.7 s: its check every 60 s) |"
        in section
    )


def test_the_sections_links_resolve_from_the_benchmarks_page() -> None:
    """The section lives in docs/benchmarks.md: the plot and the pages it links are found from docs/."""
    assert (BENCHMARKS_PAGE.parent / PLOT_PATH_IN_DOC).resolve() == RESULTS / PLOT_FILE
    section = render_section(_results([1500, 1400, 1600]))
    assert "([Upgrades](upgrades.md#upgrades))" in section
    assert (BENCHMARKS_PAGE.parent / "upgrades.md").is_file()


def test_the_plot_shows_the_run_whose_baseline_lost_the_median_number_of_queries() -> None:
    results = _results([1500, 1400, 1600])
    timeline = sigkill_timeline(results["runs"], 1000)
    assert timeline["run"] == 0 and timeline["node_cache"]["failed"] == 1500
    assert timeline["ours"]["answers_per_100ms"] == [100, 0, 100]


def test_the_remote_kube_dns_and_stale_answer_rows_are_rendered_when_measured() -> None:
    results = _results([1500])
    assert "Latency with kube-dns" not in render_section(results)  # an older harness: no such rows
    lat = {"p50_ms": 1.2, "p99_ms": 2.4, "p999_ms": 4.8}
    results["median"]["remote"] = {"no_agent": lat, "ours": {"p50_ms": 0.1, "p99_ms": 0.3, "p999_ms": 1.2},
                                   "link": {"delayed": 40000, "worst_late_ms": 0.4}}  # fmt: skip
    results["median"]["stale"] = {"on": {"answered": 9990, "failed": 10, "longest_gap_s": 0.4},
                                  "off": {"answered": 0, "failed": 10000, "longest_gap_s": 10.0}}  # fmt: skip
    results["meta"]["plans"]["remote"] = {"one_way_ms": 0.5, "seconds": 5.0, "latency_qps": 2000}
    results["meta"]["plans"]["stale"] = {"rate": 1000.0, "outage": 10.0, "names": 20}
    section = render_section(results)
    x = TIMES
    assert "modelled: +0.5 ms each way on the kube-dns link" in section
    assert (
        "| ClusterIP → kube-proxy DNAT → kube-dns on the delayed link | 1.200 ms | 2.400 ms | 4.800 ms |"
        in section
    )
    assert f"| ratio ours ÷ no local cache | 0.08{x} | 0.12{x} | 0.25{x} |" in section
    assert "worst packet left 0.40 ms after its due time" in section
    assert "kube-dns unreachable for 10 s (1000 qps from a pod, 20 names cached earlier" in section
    assert "| `--serve-stale` (default: 1h, verify) | 9 990 | 10 | 0.400 s |" in section
    assert "| `--serve-stale 0` (node-cache's Corefile) | 0 | 10 000 | 10.000 s |" in section


def test_the_twins_rows_are_rendered_when_measured() -> None:
    results = _results([1500])
    assert "CoreDNS twins" not in render_section(results)  # an older harness: no such rows
    lost = {"one": {"failed": 300, "longest_gap_s": 0.3}, "twins": {"failed": 2, "longest_gap_s": 0.004},
            "node_cache": {"failed": 1500, "longest_gap_s": 1.5}}  # fmt: skip
    results["median"]["twins"] = {
        "faults": {"sigkill_coredns": lost, "frozen_coredns": lost},
        "cache": {"one": {"upstream": 1000, "hit_rate": 0.8, "coredns_rss_mib": 30.5},
                  "twins": {"upstream": 1940, "hit_rate": 0.612, "coredns_rss_mib": 58.0}},
    }  # fmt: skip
    results["meta"]["plans"]["twins"] = {"rate": 1000.0, "duration": 10.0, "fault_at": 3.0, "names": 1000,
                                         "asks": 5}  # fmt: skip
    section = render_section(results)
    assert "### CoreDNS twins on the link-local address (1000 qps from a pod for 10 s" in section
    assert "| SIGKILL of a CoreDNS | 300 (0.300 s) | 2 (0.004 s) | 1 500 (1.500 s) |" in section
    assert (
        "| sent on to kube-dns, 1000 names asked 5 times each | 1 000 (80.0 % answered from the cache) "
        "| 1 940 (61.2 % answered from the cache) | — |" in section
    )
    assert "| CoreDNS resident memory after that | 30.5 MiB | 58.0 MiB | — |" in section
