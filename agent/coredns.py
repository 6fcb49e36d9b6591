"""CoreDNS, the child: launched in its own process group, never outliving the agent, first in line for the OOM
killer, its output passed through as structured log lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from agent.events import ChildExited, ChildOutput, Event
from agent.logs import get_logger

log = get_logger("coredns")

# CoreDNS's own output: "[INFO] plugin/reload: …", "[ERROR] Restart failed: …"
_LEVEL = re.compile(r"^\[(INFO|WARNING|ERROR|FATAL|DEBUG)\]\s*(.*)$")
# Lines that tell the supervisor how a SIGUSR1 reload went.
RELOAD_DONE = "Reloading complete"
RELOAD_FAILED = re.compile(r"SIGUSR1: (?!Reloading)|Restart failed")
# The OOM killer picks the process with the highest score; CoreDNS's is raised this far above the agent's so
# the agent survives to fail DNS over and restart it (where the container's cgroup is not killed as one).
# Relative, not 1000: on a bare-metal node CoreDNS must not become the first victim of the whole node.
OOM_SCORE_ADJ_ABOVE_AGENT = 500


def coredns_oom_score_adj() -> int:
    try:
        own = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        own = 0
    return min(1000, own + OOM_SCORE_ADJ_ABOVE_AGENT)


class CoreDnsStartError(RuntimeError):
    """CoreDNS could not be launched at all (missing or non-executable binary)."""


def coredns_info(binary: str, flag: str) -> tuple[int, str]:
    """CoreDNS's answer to ``-version`` or ``-plugins`` (its exit code and output), or why it has none."""
    try:
        out = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return 1, f"coredns not available at {binary}: {exc.strerror}\n"
    return out.returncode, out.stdout


def describe_returncode(returncode: int) -> str:
    """Popen's returncode in words: "exited 1", "terminated by SIGKILL"."""
    if returncode < 0:
        try:
            return f"terminated by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"terminated by signal {-returncode}"
    return f"exited {returncode}"


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` with util-linux's setpriv so the child gets SIGKILL when the agent dies.

    setpriv sets PR_SET_PDEATHSIG and execs CoreDNS in the same process; doing it in a Python preexec_fn
    instead is unsafe in a threaded parent. Without setpriv, CoreDNS can outlive a SIGKILLed agent until the
    next agent removes it as an orphan.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning(
            "setpriv not found: coredns will not get a parent-death signal", cause="util-linux missing"
        )
        return list(argv)
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


class CoreDnsProcess:
    """One CoreDNS child process. Its waiter and output threads only post events.

    Must be started from the main thread: the parent-death signal fires when the *thread* that forked the
    child exits.
    """

    def __init__(
        self,
        argv: Sequence[str],
        post: Callable[[Event], None],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self._post = post
        self._env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        # The last lines CoreDNS printed, to say why it failed to start or exited.
        self.recent_output: deque[str] = deque(maxlen=20)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    def start(self) -> int:
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # own process group: a kill reaches everything it started
                close_fds=True,
            )
        except OSError as exc:
            raise CoreDnsStartError(f"cannot run {self.argv[0]}: {exc.strerror}") from exc
        self.started_at = time.monotonic()
        pid = self._proc.pid
        # Raising a score needs no privilege; the window before this write is a few microseconds.
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/oom_score_adj").write_text(str(coredns_oom_score_adj()))
        threading.Thread(target=self._pump_output, name=f"coredns-{pid}-output", daemon=True).start()
        threading.Thread(target=self._wait, name=f"coredns-{pid}-waiter", daemon=True).start()
        return pid

    def _wait(self) -> None:
        assert self._proc is not None
        returncode = self._proc.wait()
        self._post(ChildExited(self._proc.pid, returncode))

    def _pump_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        pid = self._proc.pid
        with self._proc.stdout as stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if not line:
                    continue
                self.recent_output.append(line)
                match = _LEVEL.match(line)
                level, text = (match.group(1).lower(), match.group(2)) if match else ("info", line)
                getattr(log, "error" if level == "fatal" else level, log.info)(
                    "coredns output", msg=text, pid=pid
                )
                if RELOAD_DONE in line or RELOAD_FAILED.search(line):
                    self._post(ChildOutput(pid, line))

    def signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signum)

    def kill_group(self) -> None:
        """SIGKILL CoreDNS and anything in its process group (SIGCONT too, in case it was stopped)."""
        if self._proc is None or self._proc.returncode is not None:
            return  # already reaped: its pid (and group id) may belong to someone else now
        for sig in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def memory(self) -> tuple[int, int] | None:
        """(resident, peak resident) bytes, or None when it is gone."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

        def kib(name: str) -> int:
            return int(fields.get(name, "0 kB").split()[0]) * 1024

        return kib("VmRSS"), kib("VmHWM")


def find_orphans(binary: str, corefile: Path, pidfile: Path | None) -> list[psutil.Process]:
    """CoreDNS processes an earlier agent left: the one in our pidfile, or any running our Corefile."""
    found: dict[int, psutil.Process] = {}
    if pidfile is not None:
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            proc = psutil.Process(int(pidfile.read_text().strip()))
            if _is_coredns(proc, binary):
                found[proc.pid] = proc
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.pid != os.getpid() and _is_coredns(proc, binary) and str(corefile) in cmdline:
            found[proc.pid] = proc
    return list(found.values())


def _is_coredns(proc: psutil.Process, binary: str) -> bool:
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return bool(cmdline) and Path(cmdline[0]).name == Path(binary).name
