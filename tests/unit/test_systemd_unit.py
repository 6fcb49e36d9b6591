"""The systemd unit: accepted by systemd-analyze, never gives up restarting, lets the agent tear down, and
grants only what the agent needs; its example environment file is flags the agent parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.cli import parse
from agent.observe.sdnotify import parse_watchdog
from agent.settings import parse_duration
from agent.supervisor.timing import Timing

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "image" / "node-local-dns.service"
ENV_FILE = REPO / "image" / "node-local-dns.env"
MANIFEST = REPO / "image" / "nodelocaldns.yaml"
INSTALLED_AGENT = "/opt/node-local-dns/bin/agent"
# The agent's loop ticks (status file, watchdog) every second.
HEARTBEAT = 1.0

SHUTDOWN_BUDGET = Timing().shutdown_budget

Unit = dict[str, dict[str, list[str]]]


def load_unit(text: str) -> Unit:
    """Sections of key -> values in order (systemd allows a key more than once; empty resets it)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return load_unit(UNIT.read_text())


def one(unit: Unit, section: str, key: str) -> str:
    [value] = unit[section][key]
    return value


def seconds(value: str) -> float:
    return parse_duration(value, "unit")


def environment() -> dict[str, str]:
    """The example environment file as systemd's EnvironmentFile= reads it (KEY=VALUE, optional quotes)."""
    env = {}
    for raw in ENV_FILE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value[1:-1] if value[:1] == value[-1:] == '"' else value
    return env


def command_line(unit: Unit, key: str) -> list[str]:
    """An Exec line as systemd runs it: an unbraced $VAR becomes one word per whitespace-separated part."""
    env = environment()
    words: list[str] = []
    for word in shlex.split(one(unit, "Service", key)):
        words += env.get(word[1:], "").split() if word.startswith("$") else [word]
    return words


def verify(text: str, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` says about a unit text, empty when it has nothing to say.

    verify also checks that the executables exist, so the agent's install path is pointed at the agent
    installed here (nothing else of the unit is changed)."""
    agent = Path(sys.executable).parent / "agent"
    assert agent.is_file(), f"no agent entry point at {agent}"
    assert INSTALLED_AGENT in text
    path = tmp_path / "node-local-dns.service"
    path.write_text(text.replace(INSTALLED_AGENT, str(agent)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = (proc.stdout + proc.stderr).splitlines()
    return said + ([f"systemd-analyze exited {proc.returncode}"] if proc.returncode else [])


def test_systemd_analyze_verify_accepts_the_unit_without_a_word(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == []


def test_verify_would_catch_a_misspelled_directive(tmp_path: Path) -> None:
    said = verify(UNIT.read_text().replace("WatchdogSec=", "WatchDogSec="), tmp_path)
    assert any("Unknown key 'WatchDogSec'" in line for line in said)


def test_the_unit_never_gives_up_restarting(unit: Unit) -> None:
    assert one(unit, "Service", "Restart") == "always"
    # No start rate limit: systemd would otherwise leave the unit "failed" after a burst of crashes.
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert not {"StartLimitBurst", "StartLimitAction", "StartLimitInterval"} & (
        unit["Unit"].keys() | unit["Service"].keys()
    )
    assert 0 < seconds(one(unit, "Service", "RestartSec")) <= 5


def test_readiness_and_heartbeats_use_the_notify_protocol(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    watchdog = seconds(one(unit, "Service", "WatchdogSec"))
    # What the agent will read from WATCHDOG_USEC, and how many heartbeats fit before systemd aborts it.
    interval = parse_watchdog(str(int(watchdog * 1e6)), None, pid=1)
    assert interval == watchdog / 2
    assert interval >= 10 * HEARTBEAT
    assert seconds(one(unit, "Service", "TimeoutStartSec")) >= 30


def test_stopping_leaves_the_teardown_to_the_agent_then_cleans_up_after_any_exit(unit: Unit) -> None:
    assert one(unit, "Service", "KillMode") == "mixed"  # SIGTERM to the agent alone: it orders the shutdown
    assert seconds(one(unit, "Service", "TimeoutStopSec")) >= SHUTDOWN_BUDGET + 5
    start, stop_post = command_line(unit, "ExecStart"), command_line(unit, "ExecStopPost")
    assert stop_post == [start[0], "--teardown", *start[1:]]
    ns, _ = parse(stop_post[1:])
    assert ns.teardown


def test_only_the_needed_capabilities_and_the_same_as_the_daemonset(unit: Unit) -> None:
    service = unit["Service"]
    bounding = set(one(unit, "Service", "CapabilityBoundingSet").split())
    assert bounding == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    daemonset = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet")
    added = daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    assert bounding == {f"CAP_{c}" for c in added}
    assert service["AmbientCapabilities"] == []
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"


def test_the_example_environment_is_flags_the_agent_parses(unit: Unit) -> None:
    argv = command_line(unit, "ExecStart")
    assert argv[0] == INSTALLED_AGENT
    _, settings = parse(argv[1:])
    assert [str(ip) for ip in settings.local_ips] == ["169.254.20.10", "10.96.0.10"]
    assert str(settings.cluster_dns_ip) == "10.96.0.11"  # no Service environment outside a pod


def test_everything_the_agent_writes_is_writable_under_protect_system_strict(unit: Unit) -> None:
    _, settings = parse(command_line(unit, "ExecStart")[1:])
    runtime = Path("/run") / one(unit, "Service", "RuntimeDirectory")
    assert settings.corefile.parent == runtime
    assert settings.status_file.parent == runtime
    assert str(settings.xtables_lock) in unit["Service"]["ReadWritePaths"]
    # The lock is created before the sandboxed agent starts, so iptables-legacy can open it.
    assert re.fullmatch(rf"\+\S*touch {settings.xtables_lock}", one(unit, "Service", "ExecStartPre"))
