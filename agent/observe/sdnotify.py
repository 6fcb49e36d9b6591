"""The sd_notify protocol, so systemd knows when the agent serves and that its loop still runs.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a unix datagram socket: a path, or ``@name`` in the
abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). Each message is one
datagram of newline-separated ``KEY=VALUE`` assignments (sd_notify(3)). It is implemented here rather than
taken from a library because it is twenty lines of socket code, and the agent must never block or crash on
it: sends have a timeout, failures are logged once per change and otherwise ignored.

Outside systemd (in a Kubernetes pod) ``NOTIFY_SOCKET`` is unset and :meth:`NullNotifier.from_env` returns
the null notifier, so the supervisor calls the same methods everywhere.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from agent.observe.logs import get_logger

log = get_logger("sdnotify")

# The variables systemd sets for the notify protocol; consumed so children (CoreDNS, iptables) never see them.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A send that takes longer than this is dropped: a stuck service manager must not stall the agent's loop.
SEND_TIMEOUT = 1.0


class NotifyError(ValueError):
    """The notify environment is malformed; the message names the variable and what is wrong."""


class NullNotifier:
    """The null notifier: what the agent talks to when no service manager listens (e.g. in a pod). Each
    method builds its message and hands it to :meth:`send`, which :class:`SocketNotifier` overrides to
    deliver it; here it goes nowhere."""

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None
    ) -> NullNotifier:
        """A notifier for the service manager named by the environment, or the null notifier.

        The notify variables are removed from ``environ`` (``os.environ`` by default), as sd_notify's
        ``unset_environment`` does: CoreDNS and other children inherit the environment and must not talk to
        systemd in the agent's name. ``pid`` is the process the watchdog is meant for (default: this one).
        """
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, None) for name in ENV_VARS}
        address = values["NOTIFY_SOCKET"]
        if not address:
            return NullNotifier()
        interval = parse_watchdog(
            values["WATCHDOG_USEC"], values["WATCHDOG_PID"], os.getpid() if pid is None else pid
        )
        return SocketNotifier(parse_address(address), watchdog_interval=interval)

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send :meth:`watchdog`, in seconds (half the manager's timeout); None: no watchdog."""
        return None

    def ready(self, status: str) -> None:
        """The agent serves DNS: systemd finishes starting the unit (``READY=1``)."""
        self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """A one-line state shown by ``systemctl status``."""
        self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        """The agent began its shutdown; systemd shows the unit as deactivating."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """The loop made progress; without it within ``WatchdogSec`` systemd aborts and restarts the unit."""
        self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send one message; True when a service manager received it."""
        return False

    def close(self) -> None:
        """Release the socket (the null notifier has none)."""

    def __enter__(self) -> NullNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketNotifier(NullNotifier):
    """Sends to systemd's notify socket. One unconnected socket, ``sendto`` per message: systemd may re-create
    its socket (``daemon-reexec``) and the next message must still arrive."""

    def __init__(
        self,
        address: str | bytes,
        *,
        watchdog_interval: float | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.address = address
        self._watchdog_interval = watchdog_interval
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(send_timeout)
        self._failing: str | None = None

    @property
    def watchdog_interval(self) -> float | None:
        return self._watchdog_interval

    def send(self, *assignments: str) -> bool:
        message = "\n".join(assignments).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            cause = exc.strerror or type(exc).__name__
            if self._failing != cause:
                log.warning("notify socket unreachable", address=_printable(self.address), cause=cause)
            self._failing = cause
            return False
        if self._failing is not None:
            log.info(
                "notify socket reachable again", address=_printable(self.address), cause="send succeeded"
            )
            self._failing = None
        return True

    def close(self) -> None:
        self._sock.close()


def parse_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise NotifyError(
        f"NOTIFY_SOCKET: {value!r} is not a unix socket path or an @abstract name (other transports, "
        "such as vsock, are not supported)"
    )


def parse_watchdog(usec: str | None, watchdog_pid: str | None, pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, as sd_watchdog_enabled(3) and its advice to ping at half the
    timeout; None when no watchdog is set or ``WATCHDOG_PID`` names another process."""
    if not usec:
        return None
    micros = _positive_int("WATCHDOG_USEC", usec, "a positive number of microseconds")
    if watchdog_pid and _positive_int("WATCHDOG_PID", watchdog_pid, "a process id") != pid:
        return None
    return micros / 2 / 1e6


def _positive_int(name: str, value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise NotifyError(f"{name}: {value!r} is not {what}")
    return number


def _one_line(text: str) -> str:
    # A newline would start a new assignment.
    return " ".join(text.splitlines())


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
