"""The sd_notify protocol against real unix datagram sockets, checked against systemd's own systemd-notify."""

from __future__ import annotations

import array
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.observe.sdnotify import NotifyError, NullNotifier, SocketNotifier, parse_address, parse_watchdog


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's notify socket is; yields it and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_the_null_notifier_sends_nothing() -> None:
    env: dict[str, str] = {"WATCHDOG_USEC": "30000000"}
    notifier = NullNotifier.from_env(env)
    assert type(notifier) is NullNotifier
    assert notifier.watchdog_interval is None
    notifier.ready("serving DNS")
    notifier.watchdog()
    assert notifier.send("STATUS=x") is False
    assert env == {}


def test_ready_reaches_the_notify_socket_as_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    with NullNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.ready("serving DNS on 169.254.20.10")
        assert receive(sock) == ["READY=1", "STATUS=serving DNS on 169.254.20.10"]


def test_status_stopping_and_watchdog_are_sent_in_order(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    with NullNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("coredns restarting: exited 1")
        notifier.watchdog()
        notifier.stopping()
        assert [receive(sock) for _ in range(3)] == [
            ["STATUS=coredns restarting: exited 1"],
            ["WATCHDOG=1"],
            ["STOPPING=1"],
        ]


def test_a_newline_in_the_status_cannot_inject_an_assignment(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    with NullNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("bad config\nREADY=1")
        assert receive(sock) == ["STATUS=bad config READY=1"]


def test_an_abstract_namespace_socket_is_reached_through_its_at_name() -> None:
    name = f"nld-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        with NullNotifier.from_env({"NOTIFY_SOCKET": f"@{name}"}) as notifier:
            notifier.watchdog()
            assert receive(sock) == ["WATCHDOG=1"]


def test_the_sender_credentials_are_this_process(notify_socket: tuple[socket.socket, str]) -> None:
    """systemd attributes a message by the sender's pid (NotifyAccess=main): it must be the agent itself."""
    sock, path = notify_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with NullNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.ready("serving DNS")
        msg, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert msg == b"READY=1\nSTATUS=serving DNS"
    [(level, kind, data)] = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, _gid = array.array("i", data[: struct.calcsize("3i")])
    assert (pid, uid) == (os.getpid(), os.getuid())


def test_messages_carry_the_same_assignments_as_systemd_notify(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    subprocess.run(
        ["systemd-notify", "--no-block", "--ready", "--status=serving DNS"], env=env, check=True, timeout=10
    )
    reference = set(receive(sock))
    with NullNotifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        notifier.ready("serving DNS")
        assert set(receive(sock)) == reference


def test_the_notify_variables_are_consumed_so_children_do_not_inherit_them(
    notify_socket: tuple[socket.socket, str],
) -> None:
    _, path = notify_socket
    env = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "20000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/bin",
    }
    with NullNotifier.from_env(env) as notifier:
        assert isinstance(notifier, SocketNotifier)
    assert env == {"PATH": "/bin"}


def test_the_watchdog_interval_is_half_of_watchdog_usec(notify_socket: tuple[socket.socket, str]) -> None:
    _, path = notify_socket
    with NullNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}, pid=1234) as notifier:
        assert notifier.watchdog_interval == 15.0


@pytest.mark.parametrize(
    ("usec", "watchdog_pid", "interval"),
    [
        (None, None, None),
        ("", None, None),
        ("1000000", None, 0.5),
        ("20000000", "4321", 10.0),
        ("20000000", "999", None),  # the watchdog is meant for another process
    ],
)
def test_watchdog_environment_parsing(
    usec: str | None, watchdog_pid: str | None, interval: float | None
) -> None:
    assert parse_watchdog(usec, watchdog_pid, pid=4321) == interval


@pytest.mark.parametrize(
    ("usec", "watchdog_pid", "message"),
    [
        ("30s", None, "WATCHDOG_USEC: '30s' is not a positive number of microseconds"),
        ("0", None, "WATCHDOG_USEC: '0' is not a positive number of microseconds"),
        ("-5", None, "WATCHDOG_USEC: '-5' is not a positive number of microseconds"),
        ("1000000", "init", "WATCHDOG_PID: 'init' is not a process id"),
        ("1000000", "0", "WATCHDOG_PID: '0' is not a process id"),
    ],
)
def test_malformed_watchdog_variables_are_named(usec: str, watchdog_pid: str | None, message: str) -> None:
    with pytest.raises(NotifyError) as exc:
        parse_watchdog(usec, watchdog_pid, pid=1)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", "/run/systemd/notify"), ("@systemd-notify", b"\0systemd-notify")],
)
def test_notify_socket_addresses(value: str, address: str | bytes) -> None:
    assert parse_address(value) == address


@pytest.mark.parametrize("value", ["vsock:2:1234", "run/notify", "@"])
def test_unsupported_notify_socket_addresses_are_named(value: str) -> None:
    with pytest.raises(NotifyError, match=rf"^NOTIFY_SOCKET: {value!r} is not a unix socket path"):
        NullNotifier.from_env({"NOTIFY_SOCKET": value})


def test_an_unreachable_manager_is_logged_once_per_change_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with NullNotifier.from_env({"NOTIFY_SOCKET": str(path)}) as notifier, capture_logs() as logs:
        assert [notifier.send("WATCHDOG=1") for _ in range(3)] == [False, False, False]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            assert notifier.send("WATCHDOG=1") is True
            assert notifier.send("WATCHDOG=1") is True
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("notify socket unreachable", "warning"),
        ("notify socket reachable again", "info"),
    ]
    assert logs[0]["cause"] == "No such file or directory"


def test_a_manager_that_stops_reading_never_stalls_the_sender(tmp_path: Path) -> None:
    """A full receive queue blocks a datagram send; the send timeout bounds it and the message is dropped."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        with SocketNotifier(path, send_timeout=0.02) as notifier, capture_logs() as logs:
            results: list[bool] = []
            while len(results) < 1000 and (not results or results[-1]):
                results.append(notifier.send("WATCHDOG=1"))
            started = time.monotonic()
            more = [notifier.send("WATCHDOG=1") for _ in range(5)]
            elapsed = time.monotonic() - started
        assert results[0] is True and results[-1] is False and more == [False] * 5
        assert elapsed < 5 * 0.02 + 1
        assert [e["cause"] for e in logs] == ["TimeoutError"]
        assert sock.recv(100) == b"WATCHDOG=1"  # what was queued arrives intact
