"""The command line: node-cache's flags unchanged, readable long forms, and the agent's own.

Go's flag package accepts ``-flag value``, ``-flag=value``, ``--flag value`` and bare ``-boolflag``; so does
this parser, so an existing node-local-dns manifest runs unchanged. Like Go's, it matches flag names exactly:
argparse would take ``-p 5353`` as ``-pidfile 5353`` (its prefix matching of single-dash options survives
``allow_abbrev=False``), so prefixes are switched off and an unknown flag exits 2 naming it.
Heavy modules are imported only by the mode that needs them: ``agent --check`` runs every few seconds on
every node and must stay cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.settings import (
    ConfigError,
    Settings,
    parse_bool,
    parse_duration,
    parse_host_port,
    parse_local_ips,
)

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"agent: {message}\nRun 'agent --help' for the flags.\n")

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        return []  # no abbreviations, no prefixes: only a flag's exact name (or NAME=VALUE) matches it

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            flag = next((arg for arg in extras if arg.startswith("-")), None)
            self.error(
                f"flag provided but not defined: {flag}" if flag else f"unexpected argument {extras[0]!r}"
            )
        return ns


def _flag(*names: str) -> list[str]:
    """Every spelling of a flag: node-cache's ``-name`` and ``--name``, plus readable ``--long-forms``."""
    spellings: list[str] = []
    for name in names:
        spellings += [f"-{name}", f"--{name}"] if not name.startswith("-") else [name]
    return list(dict.fromkeys(spellings))


def _typed(convert: Callable[[str, str], Any], flag: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return convert(value, flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

    parse.__name__ = flag.lstrip("-")
    return parse


def _bool_flag(parser: argparse._ActionsContainer, dest: str, *names: str, help: str) -> None:
    parser.add_argument(
        *_flag(*names), dest=dest, nargs="?", const=True, default=None,
        type=_typed(parse_bool, names[0] if names[0].startswith("-") else f"-{names[0]}"), metavar="BOOL",
        help=help,
    )  # fmt: skip


def _host_port(flag: str) -> Callable[[str], Any]:
    return _typed(lambda v, f: (parse_host_port(v, f), v)[1], flag)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agent",
        description="Node-local DNS agent: runs CoreDNS as the node's DNS cache and fails open to kube-dns.",
        allow_abbrev=False,
    )
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--check", action="store_true", help="liveness probe: exit 0 if the agent is alive")
    modes.add_argument("--ready", action="store_true",
                       help="readiness probe: exit 0 if this agent's CoreDNS serves the node")  # fmt: skip
    modes.add_argument("--teardown", action="store_true", help="remove the agent's rules and interface")
    modes.add_argument("--print-corefile", action="store_true", help="render the Corefile to stdout")
    modes.add_argument(*_flag("version"), dest="version", action="store_true",
                       help="CoreDNS's version (as its -version prints it), then the agent's")  # fmt: skip
    modes.add_argument(*_flag("plugins"), dest="plugins", action="store_true",
                       help="list CoreDNS's plugins (CoreDNS's -plugins)")  # fmt: skip

    node_cache = p.add_argument_group("node-cache flags (accepted unchanged)")
    a = node_cache.add_argument
    local_ips = _typed(lambda v, f: parse_local_ips(v), "-localip")
    a(*_flag("localip", "--local-ip"), dest="local_ips", type=local_ips, metavar="IPS",
      help="comma-separated local addresses (IPv4 and IPv6 may be mixed)")  # fmt: skip
    a(*_flag("interfacename", "--interface-name"), dest="interface_name", metavar="NAME")
    _bool_flag(
        node_cache, "setup_interface", "setupinterface", "--setup-interface", help="create the interface"
    )
    _bool_flag(node_cache, "setup_iptables", "setupiptables", "--setup-iptables", help="install the rules")
    sync_interval = _typed(parse_duration, "-syncinterval")
    a(*_flag("syncinterval", "--sync-interval"), dest="sync_interval", type=sync_interval, metavar="DURATION",
      help="rule/address check interval (seconds or 1s/500ms)")  # fmt: skip
    a(*_flag("metrics-listen-address"), dest="metrics_listen_address", metavar="HOST:PORT",
      type=_host_port("-metrics-listen-address"), help="the agent's metrics, CoreDNS's included")  # fmt: skip
    a(*_flag("prometheus-listen-address"), dest="prometheus_listen_address", metavar="HOST:PORT",
      type=_host_port("-prometheus-listen-address"),
      help="CoreDNS's prometheus listener: the template's __PROMETHEUS__ENDPOINT__")  # fmt: skip
    a(*_flag("basecorefile", "--base-corefile"), dest="base_corefile", type=Path, metavar="PATH")
    a(*_flag("corefile", "conf"), dest="corefile", type=Path, metavar="PATH",
      help="where the rendered Corefile is written (CoreDNS's -conf is the same file)")  # fmt: skip
    a(*_flag("kubednscm", "--kubedns-configmap-dir"), dest="kubedns_configmap_dir", type=Path, metavar="DIR")
    a(*_flag("upstreamsvc", "--upstream-svc"), dest="upstream_svc", metavar="SERVICE")
    a(*_flag("health-port"), dest="health_port", type=int, metavar="PORT")
    _bool_flag(
        node_cache, "skip_teardown", "skipteardown", "--skip-teardown", help="leave networking on exit"
    )
    _bool_flag(node_cache, "reload_with_signal", "reloadwithsignal", "--reload-with-signal",
               help="accepted for compatibility: the agent always reloads CoreDNS with SIGUSR1")  # fmt: skip
    a(*_flag("pidfile"), dest="pidfile", type=Path, metavar="PATH", help="CoreDNS's pidfile")
    a(*_flag("dns.port", "--dns-port"), dest="dns_port", type=int, metavar="PORT",
      help="CoreDNS's default port: zones written without a port follow it")  # fmt: skip
    _bool_flag(node_cache, "quiet", "quiet", help="CoreDNS's -quiet: no start-up banner")

    ours = p.add_argument_group("agent flags")
    b = ours.add_argument
    b("--coredns-binary", dest="coredns_binary", metavar="PATH")
    b("--iptables-mode", dest="iptables_mode", choices=["auto", "legacy", "nft"])
    b("--kubeconfig", dest="kubeconfig", type=Path, metavar="PATH")
    b("--kubedns-configmap-api", dest="kubedns_configmap_api", metavar="NAMESPACE/NAME",
      help="read the kube-dns ConfigMap through the Kubernetes API (e.g. kube-system/kube-dns)")  # fmt: skip
    cluster_ip = _typed(lambda v, f: parse_local_ips(v)[0], "--cluster-dns-ip")
    b("--cluster-dns-ip", dest="cluster_dns_ip", type=cluster_ip, metavar="IP",
      help="the kube-dns-upstream ClusterIP (default: from -upstreamsvc's environment)")  # fmt: skip
    b("--cluster-domain", dest="cluster_domain", metavar="DOMAIN")
    b("--resolv-conf", dest="resolv_conf", type=Path, metavar="PATH")
    b("--status-file", dest="status_file", type=Path, metavar="PATH")
    b(
        "--check-max-age",
        dest="check_max_age",
        type=_typed(parse_duration, "--check-max-age"),
        metavar="DURATION",
    )
    b("--xtables-lock", dest="xtables_lock", type=Path, metavar="PATH")
    b("--agents-lock", dest="agents_lock", type=Path, metavar="PATH",
      help="the lock file the node's agents share (default /run/node-local-dns-agents.lock)")  # fmt: skip
    b(
        "--xtables-wait",
        dest="xtables_wait",
        type=_typed(parse_duration, "--xtables-wait"),
        metavar="DURATION",
    )
    b("--log-format", dest="log_format", choices=["auto", "json", "console"])
    b("--coredns-logs", dest="coredns_logs", choices=["plain", "json"],
      help="CoreDNS's lines unchanged (plain, default: as node-cache's) or as JSON events")  # fmt: skip
    b("--serve-stale", dest="serve_stale", type=_typed(parse_duration, "--serve-stale"), metavar="DURATION",
      help="answer from expired cache entries this long when kube-dns fails (1h; 0: off)")  # fmt: skip
    b("--serve-stale-mode", dest="serve_stale_mode", choices=["verify", "immediate"],
      help="verify (default): ask kube-dns first; immediate: the stale answer at once")  # fmt: skip
    b("--coredns-instances", dest="coredns_instances", type=int, metavar="N",
      help="CoreDNS processes sharing the DNS sockets, each restarted on its own (default 1)")  # fmt: skip
    b("--coredns-probe-port", dest="coredns_probe_port", type=int, metavar="PORT",
      help="with twins, instance N answers the agent's probe on PORT+N (default 5301)")  # fmt: skip
    b("--probe-mark", dest="probe_mark", type=lambda v: int(v, 0), metavar="BIT",
      help="firewall mark (one bit) on the agent's DNS probes (default 0x2000)")  # fmt: skip
    return p


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags; flags not given keep the dataclass defaults."""
    given = {k: v for k, v in vars(ns).items() if v is not None and k not in _MODES}
    if "kubedns_configmap_dir" not in given and Path("/etc/kube-dns").is_dir():
        given["kubedns_configmap_dir"] = Path("/etc/kube-dns")  # node-cache's default when it exists
    return Settings(**given)


_MODES = {"check", "ready", "teardown", "print_corefile", "version", "plugins"}


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    try:
        return ns, settings_from_args(ns)
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    ns, settings = parse(sys.argv[1:] if argv is None else argv)
    if ns.check or ns.ready:
        from agent.commands.check import check

        return check(settings, ready=ns.ready)
    if ns.version or ns.plugins:
        from agent.coredns.process import coredns_info

        # node-cache's -version and -plugins are CoreDNS's: print what CoreDNS prints, exit as it does.
        code, text = coredns_info(settings.coredns_binary, "-version" if ns.version else "-plugins")
        sys.stdout.write(text)
        if ns.version:
            print(f"node-local-dns-agent {__version__}")
        return code
    if ns.print_corefile:
        from agent.commands.print_corefile import print_corefile

        return print_corefile(settings)
    if ns.teardown:
        from agent.commands.teardown import teardown

        return teardown(settings)
    from agent.run import run_agent

    if os.getpid() == 1:  # a container's init: reap orphans and forward signals, then run the agent
        from agent.commands.pid1 import run_as_init

        return run_as_init(lambda: run_agent(settings))
    return run_agent(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
