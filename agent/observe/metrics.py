"""Prometheus metrics, defined in one place. Each agent owns a registry so tests can run several."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# node-cache's error types, kept so existing dashboards and alerts work unchanged.
SETUP_ERROR_TYPES = ("iptables", "iptables_lock", "interface_add", "interface_check", "configmap")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.setup_errors = Counter(
            "coredns_nodecache_setup_errors",
            "Setup errors by type (node-cache compatible).",
            ["errortype"],
            registry=r,
        )
        for errortype in SETUP_ERROR_TYPES:
            self.setup_errors.labels(errortype)
        self.coredns_restarts = Counter(
            "nodelocaldns_agent_coredns_restarts",
            "CoreDNS restarts by cause (exited, signaled, oom, hang, unhealthy, start_failed).",
            ["cause"],
            registry=r,
        )
        self.reloads = Counter(
            "nodelocaldns_agent_reloads",
            "CoreDNS configuration reloads by result (ok, failed, rejected).",
            ["result"],
            registry=r,
        )
        self.rules_installed = Gauge(
            "nodelocaldns_agent_rules_installed",
            "1 while the agent's packet-filter rules are installed, by kind (pod, host).",
            ["kind"],
            registry=r,
        )
        self.rules_restored = Counter(
            "nodelocaldns_agent_rules_restored",
            "Rules or addresses re-added (or duplicates removed) after something else changed them.",
            ["what"],
            registry=r,
        )
        self.node_cache_rules_removed = Counter(
            "nodelocaldns_agent_node_cache_rules_removed",
            "Rules node-cache left behind (its exact rule set for the local addresses), removed at start.",
            registry=r,
        )
        self.coredns_output_dropped = Counter(
            "nodelocaldns_agent_coredns_output_dropped_lines",
            "CoreDNS output lines dropped because stdout was slower than CoreDNS (never blocking CoreDNS).",
            registry=r,
        )
        self.coredns_metrics_up = Gauge(
            "nodelocaldns_agent_coredns_metrics_up",
            "1 when this scrape got CoreDNS's metrics (served after the agent's), 0 when it could not.",
            registry=r,
        )
        self.coredns_metrics_failures = Counter(
            "nodelocaldns_agent_coredns_metrics_fetch_failures",
            "Scrapes that could not fetch CoreDNS's metrics in time (CoreDNS down, restarting or hung).",
            registry=r,
        )
        # The agent's own process (CoreDNS's process_* come with its metrics): prefixed, so never clashing.
        ProcessCollector(namespace="nodelocaldns_agent", registry=r)
        self.healthy_since = Gauge(
            "nodelocaldns_agent_coredns_healthy_since_seconds",
            "Seconds since CoreDNS last became healthy; 0 while it is not healthy.",
            registry=r,
        )
        self.coredns_state = Gauge(
            "nodelocaldns_agent_coredns_state",
            "CoreDNS instances in each state: 1 for the current state with one instance (twins: per state).",
            ["state"],
            registry=r,
        )
        self.coredns_rss = Gauge(
            "nodelocaldns_agent_coredns_resident_memory_bytes",
            "CoreDNS resident memory now (twins: summed).",
            registry=r,
        )
        self.coredns_peak_rss = Gauge(
            "nodelocaldns_agent_coredns_peak_resident_memory_bytes",
            "CoreDNS peak resident memory (VmHWM, twins summed); size the pod's memory limit from this.",
            registry=r,
        )
        self.probe_latency = Histogram(
            "nodelocaldns_agent_probe_latency_seconds",
            "Latency of the agent's DNS health probes to CoreDNS.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.probe_failures = Counter(
            "nodelocaldns_agent_probe_failures",
            "Failed health probes by kind (dns, health, ready).",
            ["kind"],
            registry=r,
        )
        self.corefile_renders = Counter(
            "nodelocaldns_agent_corefile_renders",
            "Corefile renders by result (changed, unchanged, invalid, unwritable).",
            ["result"],
            registry=r,
        )
        self.serving = Gauge(
            "nodelocaldns_agent_serving",
            "1 while CoreDNS is healthy and the agent's rules are verified in place (what READY=1 reports).",
            registry=r,
        )
        self.agent_failures = Counter(
            "nodelocaldns_agent_failures",
            "Unexpected errors that stopped the agent (it shuts down cleanly and exits non-zero).",
            registry=r,
        )
        self.thread_restarts = Counter(
            "nodelocaldns_agent_thread_restarts",
            "Background threads found dead and started again, by thread (prober).",
            ["thread"],
            registry=r,
        )
