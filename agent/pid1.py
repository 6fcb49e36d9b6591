"""PID 1 duty in a container: reap every orphan and pass signals on, so the agent itself need not.

When the agent is PID 1, it forks once before anything else starts: the parent stays PID 1, forwards
signals to the child, reaps whatever the kernel re-parents to it, and exits with the child's status. The
child runs the agent, whose own children (CoreDNS, iptables) it waits for itself. Reaping with
``waitpid(-1)`` in the agent's own process would race subprocess's waits and hide their exit codes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def run_as_init(main: Callable[[], int]) -> int:
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = main()
        finally:
            sys.stdout.flush()
            os._exit(code)
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _f: os.kill(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
