"""``agent --print-corefile``: the Corefile the agent would run, from the current inputs, to stdout."""

from __future__ import annotations

import sys
from typing import Any

from agent.corefile.inputs import CorefileBuilder
from agent.corefile.kubedns import parse_kubedns
from agent.settings import ConfigError, Settings
from agent.sources import SourceError
from agent.sources.api import read_configmap, read_service_cluster_ip


def print_corefile(settings: Settings) -> int:
    """``agent --print-corefile``: the Corefile the agent would run, from the current inputs, to stdout."""
    try:
        kubedns = None
        builder = CorefileBuilder(settings, logger=_stderr_logger())
        if settings.kubedns_configmap_api is not None:
            # With the API at hand, the ConfigMap comes from it, and so does the cluster DNS IP when neither
            # the flag nor the Service variable gives one (the Service lives next to the ConfigMap).
            namespace, name = settings.kubedns_configmap_api.split("/")
            data = read_configmap(namespace, name, settings.kubeconfig)
            kubedns = parse_kubedns(data or {})
            if builder.cluster_dns_ip() is None:
                builder.api_cluster_dns_ip = read_service_cluster_ip(
                    namespace, settings.upstream_svc, settings.kubeconfig
                )
        rendered = builder.build(kubedns)
    except (ConfigError, SourceError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(rendered.text)
    return 0


def _stderr_logger() -> Any:
    """stdout carries the Corefile in --print-corefile; notes about the inputs go to stderr."""
    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
    ).bind(component="corefile")
