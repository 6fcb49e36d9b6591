"""The footprint benchmark's pure parts: the kubelet's working set from a cgroup's files, the names that fill
each caching server block, a names file for the load, and the section it writes."""

from __future__ import annotations

import json
from pathlib import Path

from bench import footprint
from bench.loadgen import read_names
from bench.report import TIMES, replace_between_markers

REPO = Path(__file__).resolve().parents[2]


def test_the_working_set_is_usage_minus_inactive_file(tmp_path: Path) -> None:
    mib = 1024 * 1024
    (tmp_path / "memory.usage_in_bytes").write_text(f"{100 * mib}\n")
    (tmp_path / "memory.stat").write_text(
        f"cache {70 * mib}\nrss {30 * mib}\ntotal_cache {70 * mib}\ntotal_rss {30 * mib}\n"
        f"total_inactive_file {60 * mib}\ntotal_active_file {10 * mib}\n"
    )
    ws = footprint.working_set(tmp_path)
    assert ws["working_set_mib"] == 40
    assert (ws["usage_mib"], ws["cache_mib"], ws["rss_mib"]) == (100, 70, 30)


def test_every_caching_block_gets_its_own_distinct_names() -> None:
    plan = footprint.FootprintPlan(names_per_block=300)
    blocks = footprint.block_names(plan)
    assert set(blocks) == {"cluster.local", "in-addr.arpa", "ip6.arpa", "."}
    for zone, names in blocks.items():
        assert len(set(names)) == 300, zone
        if zone != ".":
            assert all(n.endswith(f".{zone}") for n in names), zone
    assert all(len(n.split(".")) == 32 + 2 for n in blocks["ip6.arpa"])  # a full nibble name


def test_a_names_file_is_read_one_name_per_line(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("a.example\n\nb.example\n")
    assert read_names(f"@{path}") == ["a.example", "b.example"]
    assert read_names("a.example,b.example") == ["a.example", "b.example"]


def _side(label: str, ws: float, roles: dict[str, float]) -> dict[str, object]:
    state = {"working_set_mib": ws, "cpu_percent": 0.3, "cache_entries": 37000,
             "processes": {r: {"anon_mib": a, "file_mib": 10.0, "rss_mib": a + 10, "cpu_percent": 0.1}
                           for r, a in roles.items()}}  # fmt: skip
    return {"label": label, "idle": state, "load": state, "full": state}


def test_the_section_shows_each_side_with_its_ratio_to_node_cache() -> None:
    results = {
        "meta": {"command": "make bench", "date": "2026-12-08", "plan": vars(footprint.FootprintPlan())},
        "sides": {
            "node_cache": _side("node-cache 1.26.7", 10.0, {"node-cache": 9.0}),
            "agent_node": _side("agent + CoreDNS (node-local build)", 25.0, {"agent": 18.0, "coredns": 6.0}),
        },
        "imports": {"(interpreter)": {"rss_mib": 9.7}, "structlog": {"rss_mib": 21.4}},
    }
    section = footprint.render_section(json.loads(json.dumps(results)))
    assert f"| working set, idle | 10.0 MiB | 25.0 MiB (2.50{TIMES}) |" in section
    assert "agent 18.0 + 10.0 + coredns 6.0 + 10.0" in section
    assert "| `structlog` | 21.4 MiB | 11.7 MiB |" in section
    assert "10 000 distinct names" in section


def test_the_benchmarks_page_has_the_footprint_markers() -> None:
    page = (REPO / "docs" / "benchmarks.md").read_text()
    replace_between_markers(page, "x", (footprint.BEGIN, footprint.END))  # raises without one ordered pair
