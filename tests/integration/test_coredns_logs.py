"""CoreDNS's output through the agent with the `log` plugin on (a line per query) at 10k qps: passed through
unchanged while the agent's own events stay JSON, and a stalled log reader never stalls CoreDNS (lines are
dropped and counted instead). Prints the measured figures (run with -s to see them)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import psutil
import pytest

from harness import dnsperf
from harness import sandbox as sb
from harness.agentproc import TEMPLATE, AgentProcess

RATE, SECONDS = 10_000, 5.0


def logging_template(workdir: Path) -> Path:
    """The shipped template with CoreDNS's `log` plugin in every server block."""
    path = workdir / "Corefile.log"
    path.write_text(TEMPLATE.read_text().replace("    errors\n", "    errors\n    log\n"))
    return path


def run_load(box: sb.Sandbox) -> dnsperf.DnsperfResult:
    queries = box.workdir / "queries.txt"
    queries.write_text(dnsperf.data_file(dnsperf.cached_names()))
    box.exec(box.pod(0), dnsperf.warm_argv(sb.KUBE_DNS_IP, str(queries)), timeout=30)
    argv = dnsperf.argv(sb.KUBE_DNS_IP, str(queries), seconds=SECONDS, max_qps=RATE)
    return dnsperf.parse(box.exec(box.pod(0), argv, timeout=SECONDS + 30))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def agent_cpu(agent: AgentProcess) -> float:
    times = psutil.Process(agent.agent_pid()).cpu_times()
    return float(times.user + times.system)


@pytest.mark.parametrize("stalled", [False, True], ids=["reader-keeps-up", "reader-stalled"])
def test_a_query_log_at_10k_qps_passes_through_and_never_blocks_coredns(stalled: bool) -> None:
    with sb.Sandbox(flavour="nft") as box:
        extra = ["-basecorefile", str(logging_template(box.workdir))]
        with AgentProcess(box, extra=extra, relay=True) as agent:
            agent.wait_serving()
            assert agent.relay is not None
            if stalled:
                agent.relay.send_signal(signal.SIGSTOP)  # the log pipeline stops reading
            cpu_before = agent_cpu(agent)
            result = run_load(box)
            cpu = (agent_cpu(agent) - cpu_before) / SECONDS
            metrics = agent.metrics()
            agent.relay.send_signal(signal.SIGCONT)
            dropped = metric(metrics, "nodelocaldns_agent_coredns_output_dropped_lines_total")
            requests = sum(
                float(v)
                for v in re.findall(r"^coredns_dns_requests_total\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
            )
            agent.stop()
        lines = agent.log_path.read_text(errors="replace").splitlines()
        query_lines = [line for line in lines if line.startswith("[INFO] ") and '"A IN ' in line]
        events, mixed = [], []
        for line in lines:
            try:
                events.append(json.loads(line)) if line.startswith("{") else None
            except ValueError:
                mixed.append(line)
        assert not mixed, mixed[:3]  # every line whole: an event or a CoreDNS line, never two in one
        print(f"\n{'stalled' if stalled else 'keeping up'}: dnsperf sent {result.sent}, completed "
              f"{result.completed}, lost {result.lost}, {result.qps:.0f} qps; coredns requests "
              f"{requests:.0f}; query log lines written {len(query_lines)}, dropped {dropped:.0f}; "
              f"agent CPU {cpu:.1%} of a core")  # fmt: skip
        assert result.qps > 0.9 * RATE, result
        assert result.lost <= result.sent * 0.001, result  # CoreDNS answered (nearly) everything
        assert events and all("event" in e for e in events)  # the agent's own lines: JSON events
        if stalled:
            assert dropped > 0
        else:
            assert dropped == 0 and len(query_lines) >= result.completed, (len(query_lines), result)
