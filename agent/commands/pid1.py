"""PID 1 duty in a container: reap every orphan and pass signals on, so the agent itself need not.

When the agent is PID 1, it forks once before anything else starts: the parent stays PID 1, forwards
signals to the child, reaps whatever the kernel re-parents to it, and exits with the child's status. The
child runs the agent, whose own children (CoreDNS, iptables) it waits for itself. Reaping with
``waitpid(-1)`` in the agent's own process would race subprocess's waits and hide their exit codes.

The parent installs no signal handler: the signals it cares about are blocked and taken one at a time with
``sigwaitinfo``, so nothing runs asynchronously. Blocked before the fork, so none is lost in between (PID 1
drops a signal it neither handles nor blocks); the child unblocks them before it starts the agent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
_WATCHED = {signal.SIGCHLD, *FORWARDED}


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + the signal that killed it."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def run_as_init(main: Callable[[], int]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
        code = 1
        try:
            code = main()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        info = signal.sigwaitinfo(_WATCHED)
        if info.si_signo != signal.SIGCHLD:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, info.si_signo)
            continue
        status = reap(child)
        if status is not None:
            return status


def reap(child: int) -> int | None:
    """Reap every exited process; the child's exit code once it is among them (orphans are only reaped)."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code if code is not None else 1
        if pid == 0:
            return code
        if pid == child:
            code = exit_code(status)
