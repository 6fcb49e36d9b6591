"""CoreDNS, the child: launched in its own process group, never outliving the agent, first in line for the OOM
killer, its output passed through (unchanged, or as structured log lines) without ever blocking it.
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
from typing import BinaryIO, Literal

import psutil

from agent.children import rank_above_agent
from agent.events import ChildExited, ChildOutput, ChildStopped, Event
from agent.node.sockets import listeners, serves, socket_inodes
from agent.observe.logs import get_logger, write_stdout
from agent.settings import IPAddress

log = get_logger("coredns")

# CoreDNS's own output: "[INFO] plugin/reload: …", "[ERROR] Restart failed: …"
_LEVEL = re.compile(r"^\[(INFO|WARNING|ERROR|FATAL|DEBUG)\]\s*(.*)$")
# Lines that tell the supervisor how a SIGUSR1 reload went.
RELOAD_DONE = "Reloading complete"
RELOAD_FAILED = re.compile(r"SIGUSR1: (?!Reloading)|Restart failed")
_RELOAD_MARKERS = (b"SIGUSR1", b"Reloading", b"Restart failed")  # a cheap test before the regex
# CoreDNS's lines waiting for the agent's stdout, at most. With the `log` plugin CoreDNS prints a line per
# query; if stdout cannot take them as fast (a slow log pipeline), the excess is dropped and counted, so the
# pipe from CoreDNS is always drained: a full pipe would block CoreDNS's logging, and with it its answers.
# 20 000 lines is 2 s of a 10k qps query log, a few MB.
OUTPUT_BACKLOG_LINES = 20_000
OutputFormat = Literal["plain", "json"]
# After CoreDNS exits, how long its exit event waits for the rest of its output, in seconds.
PUMP_DRAIN = 1.0


class CoreDnsStartError(RuntimeError):
    """CoreDNS could not be launched at all (missing or non-executable binary)."""


def coredns_info(binary: str, flag: str) -> tuple[int, str]:
    """CoreDNS's answer to ``-version`` or ``-plugins`` (its exit code and output), or why it has none."""
    try:
        out = subprocess.run([binary, flag], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return 1, f"coredns not available at {binary}: {exc.strerror}\n"
    return out.returncode, out.stdout


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


class OutputPump:
    """Moves CoreDNS's output from its pipe to the agent's stdout without ever blocking CoreDNS.

    The reader thread only reads, remembers the last lines and spots reload confirmations; a writer thread
    writes. Between them a bounded backlog: when stdout is slower than CoreDNS (a query log at 10k qps into a
    slow log pipeline), lines beyond it are dropped and counted (``on_dropped``), never waited for.
    ``plain`` writes CoreDNS's lines unchanged (``[INFO] plugin/reload: …``, what log pipelines built for
    node-cache parse); ``json`` writes each as a ``coredns output`` event."""

    def __init__(
        self,
        pid: int,
        fmt: OutputFormat,
        on_dropped: Callable[[int], None] | None = None,
        out: BinaryIO | None = None,
        backlog: int = OUTPUT_BACKLOG_LINES,
    ) -> None:
        self.pid, self.fmt, self.on_dropped, self.backlog = pid, fmt, on_dropped, backlog
        self.out = out
        self._lines: list[bytes] = []
        self._dropped = 0
        self._closed = False
        self._ready = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name=f"coredns-{pid}-writer", daemon=True)
        self._writer.start()

    def offer(self, line: bytes) -> None:
        """Queue one line (without its newline); drops it when the backlog is full. Never blocks for long."""
        with self._ready:
            full = len(self._lines) >= self.backlog
            if full:
                self._dropped += 1  # for the writer's warning once it can write again
            else:
                self._lines.append(line)
                if len(self._lines) == 1:
                    self._ready.notify()
        if full and self.on_dropped is not None:
            self.on_dropped(1)  # counted at once: the writer may be the one stuck

    def close(self, timeout: float = 1.0) -> None:
        """No more lines: the writer writes what is queued (within ``timeout``) and stops."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._writer.join(timeout)

    def _write_loop(self) -> None:
        while True:
            with self._ready:
                while not self._lines and not self._closed:
                    self._ready.wait()
                batch, self._lines = self._lines, []
                dropped, self._dropped = self._dropped, 0
                closed = self._closed
            if batch:
                self._write(batch, dropped)
            if closed and not batch:
                return

    def _write(self, batch: list[bytes], dropped: int) -> None:
        try:
            if self.fmt == "plain":
                write_stdout(b"\n".join(batch) + b"\n", self.out)
            else:
                for raw in batch:
                    line = raw.decode(errors="replace")
                    match = _LEVEL.match(line)
                    level, text = (match.group(1).lower(), match.group(2)) if match else ("info", line)
                    getattr(log, "error" if level == "fatal" else level, log.info)(
                        "coredns output", msg=text, pid=self.pid
                    )
            if dropped:
                log.warning("coredns output dropped", lines=dropped, pid=self.pid,
                            cause="stdout slower than coredns's output")  # fmt: skip
        except (OSError, ValueError):
            pass  # stdout gone (the agent is exiting): nothing to tell anyone


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
        output: OutputFormat = "plain",
        on_output_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self._post = post
        self._env = dict(env) if env is not None else None
        self._output, self._on_output_dropped = output, on_output_dropped
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
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
        rank_above_agent(pid)
        self._pump = threading.Thread(target=self._pump_output, name=f"coredns-{pid}-output", daemon=True)
        self._pump.start()
        threading.Thread(target=self._wait, name=f"coredns-{pid}-waiter", daemon=True).start()
        return pid

    def _wait(self) -> None:
        """Post the exit once the output is read to its end, so the cause quotes CoreDNS's last line. The
        pipe closes with CoreDNS; a grandchild holding it open (none expected) delays the event at most
        ``PUMP_DRAIN`` seconds."""
        assert self._proc is not None and self._pump is not None
        self._watch_stops(self._proc.pid)
        returncode = self._proc.wait()
        self._pump.join(PUMP_DRAIN)
        self._post(ChildExited(self._proc.pid, returncode))

    def _watch_stops(self, pid: int) -> None:
        """Until CoreDNS exits, report each time the kernel stops it: the parent hears of a stop at once
        (``waitid`` with WSTOPPED), with no polling. The exit itself is left unreaped (WNOWAIT) for Popen."""
        while True:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOWAIT)
            except ChildProcessError:
                return  # reaped already (a wait elsewhere got there first)
            if info is None or info.si_code != os.CLD_STOPPED:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)  # take this stop's notice
            self._post(ChildStopped(pid, info.si_status))

    def _pump_output(self) -> None:
        """Read CoreDNS's output as fast as it comes; the writing is the :class:`OutputPump`'s."""
        assert self._proc is not None and self._proc.stdout is not None
        pid = self._proc.pid
        pump = OutputPump(pid, self._output, self._on_output_dropped)
        try:
            with self._proc.stdout as stream:
                for chunk in stream:
                    raw = chunk.rstrip()
                    if not raw:
                        continue
                    pump.offer(raw)
                    line = raw.decode(errors="replace")
                    self.recent_output.append(line)
                    if any(marker in raw for marker in _RELOAD_MARKERS) and (
                        RELOAD_DONE in line or RELOAD_FAILED.search(line)
                    ):
                        self._post(ChildOutput(pid, line))
        finally:
            pump.close()

    def listening(
        self, ips: Sequence[IPAddress], port: int, *, ours: bool = True, also: Sequence[CoreDnsProcess] = ()
    ) -> bool:
        """This CoreDNS (``ours``), or another process, has its UDP and TCP listeners bound on every address.
        Another agent's CoreDNS shares them (SO_REUSEPORT): a probe answer alone does not tell which. Twins
        in ``also`` count as this one (their sockets are not another agent's)."""
        inodes: set[int] = set()
        for each in (self, *also):
            if each._proc is not None:
                inodes |= socket_inodes(each.pid)
        return serves(listeners(), inodes, ips, port, ours=ours)

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
