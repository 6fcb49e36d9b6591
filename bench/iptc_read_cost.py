"""Should python-iptables read the legacy tables in-process instead of forking ``iptables-legacy-save``?

Run as root: ``sudo .venv/bin/python -m bench.iptc_read_cost``. In a legacy sandbox node holding the agent's
rule set, node-cache's rule set and kube-proxy-like rules, it measures, for one family and the two tables
the agent reads (raw and filter):

- ``fork``: ``iptables-legacy-save -t raw`` and ``-t filter`` (what the agent runs for a full read);
- ``iptc``: python-iptables reading the same chains and spelling every rule as ``iptables-save`` does, which
  is what the agent compares (its match and target parameters come from libxtables' ``save`` callbacks);

whether the two texts are identical, and whether the in-process read is safe in the agent, which writes its
log and CoreDNS's output to stdout from other threads: python-iptables reads each match's parameters by
pointing the process's file descriptor 1 at a pipe while libxtables prints them. Also: what importing
python-iptables costs the process (it runs ldconfig, gcc and modprobe while it loads), and the cheapest
question it can answer safely (the legacy tables' chain names, for mode detection) against the fork.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import subprocess
import sys
import time

from agent.node.rules import Plan, wanted_rules
from agent.settings import Settings
from harness import sandbox as sb

ROUNDS = 200


def _probe() -> dict[str, object]:
    """Inside the node namespace: the measurement itself."""
    import os
    import threading

    import psutil

    before = psutil.Process().memory_full_info().uss
    started = time.perf_counter()
    import iptc  # type: ignore[import-untyped]

    import_ms = (time.perf_counter() - started) * 1e3
    import_uss = psutil.Process().memory_full_info().uss - before

    def prefix(addr_mask: str) -> str:
        addr, _, mask = addr_mask.partition("/")
        return f"{addr}/{ipaddress.ip_network(f'0.0.0.0/{mask}').prefixlen}"

    def iptc_text(table_name: str) -> list[str]:
        table = iptc.Table(table_name)
        table.refresh()
        lines = []
        for chain in table.chains:
            for rule in chain.rules:
                parts = []
                if rule.src != "0.0.0.0/0.0.0.0":
                    parts.append(f"-s {prefix(rule.src)}")
                if rule.dst != "0.0.0.0/0.0.0.0":
                    parts.append(f"-d {prefix(rule.dst)}")
                if rule.protocol != "ip":
                    parts.append(f"-p {rule.protocol}")
                for match in rule.matches:
                    saved = match._get_saved_buf(rule.get_ip()).decode().strip()
                    parts.append(f"-m {match.name} {saved}".strip())
                target = rule.target
                saved = (target._get_saved_buf(rule.get_ip()) or b"").decode().strip()
                parts.append(f"-j {target.name} {saved}".strip())
                lines.append(f"-A {chain.name} " + " ".join(parts))
        return lines

    def fork_text(table: str) -> list[str]:
        out = subprocess.run(
            ["iptables-legacy-save", "-t", table], capture_output=True, text=True, check=True
        )
        return [line for line in out.stdout.splitlines() if line.startswith("-A ")]

    def timed(read: object) -> list[float]:
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for table in ("raw", "filter"):
                read(table)  # type: ignore[operator]
            samples.append(time.perf_counter() - started)
        return samples

    fork = timed(fork_text)
    inproc = timed(iptc_text)
    same = all(sorted(iptc_text(t)) == sorted(fork_text(t)) for t in ("raw", "filter"))
    differences = [
        (line_i, line_f)
        for t in ("raw", "filter")
        for line_i, line_f in zip(sorted(iptc_text(t)), sorted(fork_text(t)), strict=False)
        if line_i != line_f
    ][:3]
    # The hazard: another thread writes to stdout (the agent's log, CoreDNS's output) during the reads.
    read_fd, write_fd = os.pipe()
    saved_stdout = os.dup(1)
    os.dup2(write_fd, 1)
    os.close(write_fd)
    stop = threading.Event()
    counts = {"written": 0, "write_errors": 0, "received": 0}

    def writer() -> None:
        while not stop.is_set():
            try:
                os.write(1, b"[INFO] a log line from another thread\n")
                counts["written"] += 1
            except OSError:
                counts["write_errors"] += 1
            time.sleep(0.0001)  # about 10 000 lines a second, a query log at 10k qps

    def reader() -> None:
        while chunk := os.read(read_fd, 1 << 16):
            counts["received"] += chunk.count(b"\n")

    threads = [threading.Thread(target=writer, daemon=True), threading.Thread(target=reader, daemon=True)]
    for thread in threads:
        thread.start()
    corrupted = 0
    try:
        for _ in range(50):
            if sorted(iptc_text("raw")) != sorted(fork_text("raw")):
                corrupted += 1
    finally:
        stop.set()
        threads[0].join(5)
        os.dup2(saved_stdout, 1)
        threads[1].join(5)
    # A question python-iptables answers without libxtables' save callbacks (so without touching fd 1): which
    # chains exist and how many rules each legacy table holds, for iptables-wrappers' mode detection.
    save_calls = 0
    original = iptc.ip4tc.IPTCModule._get_saved_buf

    def counting(self: object, ip: object) -> object:
        nonlocal save_calls
        save_calls += 1
        return original(self, ip)

    iptc.ip4tc.IPTCModule._get_saved_buf = counting

    def iptc_shape() -> set[str]:
        chains: set[str] = set()
        for family, table_class, names in (
            (4, iptc.Table, "ip_tables_names"),
            (6, iptc.Table6, "ip6_tables_names"),
        ):
            with open(f"/proc/net/{names}") as listed:
                existing = listed.read().split()
            for name in existing:
                table = table_class(name)
                table.refresh()
                chains |= {f"{family}:{chain.name}" for chain in table.chains}
        return chains

    def fork_shape() -> set[str]:
        chains: set[str] = set()
        for family, tool in ((4, "iptables-legacy-save"), (6, "ip6tables-legacy-save")):
            out = subprocess.run([tool], capture_output=True, text=True, check=True).stdout
            chains |= {f"{family}:{line[1:].split()[0]}" for line in out.splitlines() if line.startswith(":")}
        return chains

    def timed_once(read: object) -> list[float]:
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            read()  # type: ignore[operator]
            samples.append(time.perf_counter() - started)
        return samples

    shape_fork = timed_once(fork_shape)
    shape_iptc = timed_once(iptc_shape)
    return {
        "import_iptc_ms": import_ms,
        "import_iptc_uss_mib": import_uss / 2**20,
        "detect_fork_ms_median": statistics.median(shape_fork) * 1e3,
        "detect_iptc_ms_median": statistics.median(shape_iptc) * 1e3,
        "detect_same_answer": iptc_shape() == fork_shape(),
        "detect_save_callbacks": save_calls,
        "rules_read": len(fork_text("raw")) + len(fork_text("filter")),
        "fork_ms_median": statistics.median(fork) * 1e3,
        "iptc_ms_median": statistics.median(inproc) * 1e3,
        "identical_text": same,
        "first_differences": differences,
        "reads_with_a_concurrent_stdout_writer": 50,
        "reads_that_misread": corrupted,
        "lines_written_by_the_other_thread": counts["written"],
        "lines_that_reached_stdout": counts["received"],
        "writes_that_failed": counts["write_errors"],
    }


def main() -> None:
    if sys.argv[1:] == ["--probe"]:
        print(json.dumps(_probe()))
        return
    settings = Settings(local_ips=(ipaddress.ip_address(sb.LOCAL_IP), ipaddress.ip_address(sb.KUBE_DNS_IP)))
    with sb.Sandbox(flavour="legacy") as box:
        ours = wanted_rules(settings.local_ips, dns_port=53, health_port=8080, host_rules=True)
        restore = Plan(4, insert=tuple(r for r in ours if r.family == 4)).restore_input()
        sb.run(["ip", "netns", "exec", box.node, "iptables-legacy-restore", "--noflush"], input=restore)
        box.install_node_cache_rules([sb.LOCAL_IP, sb.KUBE_DNS_IP])
        out = box.exec(box.node, [sys.executable, "-m", "bench.iptc_read_cost", "--probe"], timeout=180)
    print(json.dumps(json.loads(out), indent=2))


if __name__ == "__main__":
    main()
