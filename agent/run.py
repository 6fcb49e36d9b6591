"""``agent`` (the run mode): builds the real parts and hands them to the supervisor.

The supervisor only sees small seams (:class:`agent.supervisor.seams.Network`, :class:`CorefileSource`); this
module adapts the Corefile renderer, the watchers, the interface and the packet filter to them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from agent.coredns.cgroup import Cgroup, gomemlimit_for
from agent.coredns.process import CoreDnsProcess, find_orphans, with_parent_death_signal
from agent.corefile.files import write_if_changed
from agent.corefile.inputs import CorefileBuilder
from agent.corefile.kubedns import KEYS as KUBEDNS_KEYS
from agent.corefile.kubedns import KubeDnsConfig, parse_kubedns
from agent.corefile.plugins import MissingPluginError, PluginCheck
from agent.corefile.render import HEALTH_PROBE_NAME, PROBE_PORT_ENV
from agent.events import ApiConfigMap, ConfigChanged, Event
from agent.health.probe import ProbeSettings
from agent.observe.logs import get_logger, setup_logging
from agent.observe.metrics import Metrics
from agent.settings import ConfigError, IPAddress, Settings
from agent.sources import SourceError
from agent.sources.api import ApiConfigMapWatcher, read_service_cluster_ip
from agent.sources.directory import DirectoryWatcher
from agent.stopflag import StopFlag
from agent.supervisor.loop import EXIT_FAILED, Supervisor

log = get_logger("agent")


class CorefileFiles:
    """The Corefile's inputs (template, kube-dns ConfigMap) and its output file, for the supervisor."""

    def __init__(self, settings: Settings, api_cluster_dns_ip: IPAddress | None = None) -> None:
        self.settings = settings
        self.builder = CorefileBuilder(settings, api_cluster_dns_ip=api_cluster_dns_ip)
        self.plugins = PluginCheck(settings.coredns_binary)  # asks `coredns -plugins` once
        self.health_url: str | None = None
        self.metrics_url: str | None = None  # CoreDNS's prometheus listener, served again on the agent's port
        self._watchers: list[DirectoryWatcher | ApiConfigMapWatcher] = []

    def render(self, api_data: Mapping[str, str] | None) -> str:
        kubedns: KubeDnsConfig | None = None
        if self.settings.kubedns_configmap_api is not None:
            kubedns = parse_kubedns(api_data) if api_data is not None else KubeDnsConfig()
        rendered = self.builder.build(kubedns)
        self.plugins.check(rendered.text)  # a plugin CoreDNS lacks: rejected as any bad Corefile
        self.health_url = rendered.endpoints.health_url
        self.metrics_url = rendered.endpoints.metrics_url
        return rendered.text

    def refuse_missing_plugins(self) -> None:
        """At start: a Corefile naming a plugin CoreDNS lacks is fatal (MissingPluginError); other bad input
        is the supervisor's to report while it waits for a good one."""
        try:
            self.render(None)
        except MissingPluginError:
            raise
        except ConfigError:
            pass

    def write(self, text: str) -> bool:
        return write_if_changed(self.settings.corefile, text)

    def start_watchers(self, post: Callable[[Event], None]) -> None:
        s = self.settings
        # Only the files the agent reads count (and the kubelet's ``..data`` swap of a ConfigMap volume).
        watched: list[tuple[Path, str, frozenset[str]]] = [
            (s.base_corefile.parent, "template", frozenset({s.base_corefile.name}))
        ]
        if s.kubedns_configmap_dir is not None:
            watched.append((s.kubedns_configmap_dir, "kube-dns configmap", frozenset(KUBEDNS_KEYS)))
        for path, what, names in watched:
            watcher = DirectoryWatcher(path, functools.partial(post, ConfigChanged(what)), names=names)
            try:
                watcher.start()
            except SourceError as exc:
                log.warning("not watching", what=what, path=str(path), error=str(exc),
                            cause="checked on the periodic re-render instead")  # fmt: skip
                continue
            self._watchers.append(watcher)
        if s.kubedns_configmap_api is not None:
            namespace, name = s.kubedns_configmap_api.split("/")
            api = ApiConfigMapWatcher(namespace, name, lambda data: post(ApiConfigMap(data)), s.kubeconfig)
            api.start()
            self._watchers.append(api)

    def watchers_alive(self) -> bool:
        return all(watcher.alive for watcher in self._watchers)

    def stop_watchers(self, timeout: float) -> None:
        """Every watcher within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            watcher.stop(max(0.0, deadline - time.monotonic()))
        self._watchers.clear()


def coredns_launcher(
    settings: Settings, cgroup: Cgroup | None, metrics: Metrics | None = None
) -> Callable[[Callable[[Event], None], int], CoreDnsProcess]:
    """Instance N's CoreDNS: the same Corefile for all, its own probe port (twins), and -pidfile for the
    first only (one file, one pid)."""
    argv = [settings.coredns_binary, "-conf", str(settings.corefile), "-dns.port", str(settings.dns_port)]
    if settings.quiet:
        argv.append("-quiet")
    env = dict(os.environ)
    instances = settings.coredns_instances
    limit = gomemlimit_for(cgroup.memory_limit() if cgroup else None, instances=instances)
    if limit and "GOMEMLIMIT" not in env:
        env["GOMEMLIMIT"] = limit
        log.info("coredns memory limit", gomemlimit=limit, instances=instances,
                 cause="the container's memory limit")  # fmt: skip
    dropped = metrics.coredns_output_dropped.inc if metrics is not None else None

    def launch(post: Callable[[Event], None], index: int) -> CoreDnsProcess:
        first = settings.pidfile is not None and index == 0
        full = with_parent_death_signal(argv + (["-pidfile", str(settings.pidfile)] if first else []))
        own = env | {PROBE_PORT_ENV: str(settings.coredns_probe_port + index)} if instances > 1 else env
        return CoreDnsProcess(full, post, own, settings.coredns_logs, dropped)

    return launch


def kill_orphans(settings: Settings) -> None:
    """A CoreDNS an earlier agent left (it was SIGKILLed before the parent-death signal existed, or
    setpriv is missing) would hold the ports: it goes first."""
    for proc in find_orphans(settings.coredns_binary, settings.corefile, settings.pidfile):
        log.warning("orphan coredns killed", pid=proc.pid, cause="left by an earlier agent")
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(timeout=2)


def api_cluster_dns_ip(settings: Settings) -> IPAddress | None:
    """The kube-dns-upstream clusterIP through the API, when the API source is on and no flag names it."""
    if settings.kubedns_configmap_api is None or settings.cluster_dns_ip is not None:
        return None
    namespace = settings.kubedns_configmap_api.split("/")[0]
    try:
        return read_service_cluster_ip(namespace, settings.upstream_svc, settings.kubeconfig)
    except SourceError as exc:
        log.warning("cluster dns ip not read from the api", error=str(exc))
        return None


def run_agent(settings: Settings) -> int:
    setup_logging(settings.log_format)
    try:
        settings.require_local_ips()
    except ConfigError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics()
    try:
        supervisor, corefile = build_supervisor(settings, metrics)
        corefile.refuse_missing_plugins()
    except MissingPluginError as exc:  # the Corefile needs another CoreDNS build; nothing is installed yet
        log.error("agent failed", cause=f"configuration refused at start: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # nothing is installed yet: say why, exit non-zero, be restarted
        log.error("agent failed", cause=f"unexpected error at start: {type(exc).__name__}: {exc}",
                  traceback=traceback.format_exc())  # fmt: skip
        return EXIT_FAILED
    from agent.observe.metrics_http import MetricsEndpoint

    endpoint = MetricsEndpoint(settings.metrics_listen_address, metrics, lambda: corefile.metrics_url)
    endpoint.start()
    try:
        supervisor.install_signal_handlers()
        return supervisor.run()
    finally:
        endpoint.close()


def build_supervisor(settings: Settings, metrics: Metrics) -> tuple[Supervisor, CorefileFiles]:
    """The real parts, wired. Nothing here changes the node: that starts in :meth:`Supervisor.run`."""
    from agent.node.network import NodeNetwork
    from agent.observe.sdnotify import NullNotifier

    notifier = NullNotifier.from_env()  # before CoreDNS starts: it must not inherit NOTIFY_SOCKET
    kill_orphans(settings)
    cgroup = Cgroup.of()  # for GOMEMLIMIT, and to tell an OOM kill from another SIGKILL
    corefile = CorefileFiles(settings, api_cluster_dns_ip(settings))
    stop = StopFlag()
    supervisor = Supervisor(
        settings=settings,
        network=NodeNetwork(settings, metrics, stop),
        corefile=corefile,
        launcher=coredns_launcher(settings, cgroup, metrics),
        probe_settings=ProbeSettings(
            settings.require_local_ips(),
            settings.dns_port,
            HEALTH_PROBE_NAME,
            None,
            mark=settings.probe_mark if settings.setup_iptables else None,
        ),
        health_url=lambda: corefile.health_url,
        metrics=metrics,
        notifier=notifier,
        cgroup=cgroup,
        stop=stop,
    )
    return supervisor, corefile
