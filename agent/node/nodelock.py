"""The agents on one node, known to each other through locks that die with their holder.

During a surge upgrade two agents run on a node for a while: the new one starts next to the old one, its
CoreDNS binds the same sockets (SO_REUSEPORT), and the old one is stopped once the new one is ready. They
share the rules and the interface, so neither may remove what the other relies on:

- at start, an earlier run's leftovers are removed only when no other agent is alive;
- while another agent is alive, rule changes only add (the other may want rules this one does not yet);
- at shutdown, the last agent out removes the rules and the interface; one that leaves another behind only
  stops its CoreDNS (the other's keeps serving on the same sockets).

:meth:`agent.node.network.NodeNetwork.join_node` and :meth:`~agent.node.network.NodeNetwork.leave_node`
make those two decisions with this lock.

Both agents open one file (a hostPath in the DaemonSet, so both containers see it) and take
open-file-description locks on it (``F_OFD_SETLK``): a shared lock on byte 0 for as long as the agent lives,
and an exclusive lock on byte 1 around each decision (join and leftovers; leave and teardown), so two
decisions never interleave. The kernel drops an agent's locks when it dies, SIGKILL and OOM kill included;
whether another agent is alive is one ``F_OFD_GETLK`` on byte 0, which reports only other descriptions'
locks. The descriptor is close-on-exec: CoreDNS never holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from agent.observe.logs import get_logger
from agent.stopflag import Abort

log = get_logger("nodelock")

_ALIVE, _TURN = 0, 1  # the bytes locked: every live agent shares the first; a decision holds the second
_FLOCK = "hhqqi4x"  # struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid, padding)
_POLL = 0.02  # seconds between two tries for the turn


class NodeLockError(OSError):
    """The lock file cannot be opened or locked."""


def _flock(kind: int, start: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, 1, 0)


class NodeLock:
    """This agent's membership in the node's agents (``--agents-lock``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def join(self) -> None:
        """Open the file and take the shared lock for the agent's lifetime. Raises NodeLockError."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise NodeLockError(exc.errno, f"agents lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, _ALIVE))
        except OSError as exc:
            os.close(fd)
            raise NodeLockError(exc.errno, f"agents lock {self.path}: {exc.strerror}") from None
        self._fd = fd

    def others_alive(self) -> bool:
        """Another agent holds the lock now (False when this one could not join)."""
        if self._fd is None:
            return False
        try:
            got = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, _ALIVE))
        except OSError as exc:
            log.error("agents lock not read", path=str(self.path), error=str(exc),
                      cause="assuming another agent is alive: its rules stay")  # fmt: skip
            return True
        return bool(struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK)

    @contextlib.contextmanager
    def turn(self, timeout: float, abort: Abort | None = None) -> Iterator[None]:
        """Hold the decision lock while the block runs. When another agent keeps it past ``timeout`` (or
        ``abort`` is set) the block runs anyway: a decision is never skipped, only no longer exclusive."""
        fd = self._fd
        got = fd is not None and self._take_turn(fd, time.monotonic() + timeout, abort)
        try:
            yield
        finally:
            if got and fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, _TURN))

    def _take_turn(self, fd: int, deadline: float, abort: Abort | None) -> bool:
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, _TURN))
                return True
            except OSError as exc:
                busy = exc.errno in (errno.EAGAIN, errno.EACCES)
                if not busy or time.monotonic() >= deadline or (abort is not None and abort.is_set()):
                    cause = "another agent kept it too long" if busy else "the lock failed"
                    log.warning("deciding without the agents lock", path=str(self.path), error=str(exc),
                                cause=cause)  # fmt: skip
                    return False
            time.sleep(_POLL)

    def leave(self) -> None:
        """No longer alive for the others (inside a turn, so that the next decision sees it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, _ALIVE))

    def close(self) -> None:
        """Drop every lock still held (closing the description drops them all)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
