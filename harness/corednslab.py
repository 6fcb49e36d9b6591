"""Run rendered Corefiles with the real CoreDNS, in a network namespace of their own.

CoreDNS has no "validate only" flag: the proof that it accepts a Corefile is that it starts and answers. A
:class:`CorednsLab` is one namespace with an empty bridge (this kernel has no dummy driver) holding the
addresses the Corefiles bind to, so several configurations can be loaded one after the other in a few
milliseconds each. Names carry the sandbox prefix and run id, so the session's leak check covers them.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.corefile.render import HEALTH_PROBE_ANSWER, HEALTH_PROBE_NAME
from harness import sandbox as sb


class CorednsRejectedError(AssertionError):
    """CoreDNS exited or never answered with this Corefile; the message carries its output."""


@dataclass
class Coredns:
    proc: subprocess.Popen[bytes]
    conf: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class CorednsLab:
    addresses: Sequence[str]
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    workdir: Path = field(init=False)
    _servers: list[Coredns] = field(default_factory=list, init=False)
    _count: int = field(default=0, init=False)
    _created: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        sb.CREATED_RUNS.add(self.run_id)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{sb.PREFIX}-{self.run_id}-"))

    @property
    def ns(self) -> str:
        return f"{sb.PREFIX}-{self.run_id}-lab"

    def __enter__(self) -> CorednsLab:
        try:
            sb.run(["ip", "netns", "add", self.ns])
            self._created = True
            # Nothing here may fall back on the machine's resolver.
            Path(f"/etc/netns/{self.ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{self.ns}/resolv.conf").write_text("nameserver 127.0.0.1\n")
            sb.run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
            sb.run(["ip", "-n", self.ns, "link", "add", "nodelocaldns", "type", "bridge"])
            for address in self.addresses:
                prefix = "/128" if ":" in address else "/32"
                extra = ["nodad"] if ":" in address else []
                sb.run(["ip", "-n", self.ns, "addr", "add", address + prefix, "dev", "nodelocaldns", *extra])
            sb.run(["ip", "-n", self.ns, "link", "set", "nodelocaldns", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for server in list(self._servers):
            self.stop(server)
        if self._created:
            sb.remove_namespace(self.ns)
            self._created = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, corefile: str, name: str = "coredns") -> Coredns:
        self._count += 1
        conf = self.workdir / f"Corefile.{name}.{self._count}"
        conf.write_text(corefile)
        log = self.workdir / f"{name}.{self._count}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sb.COREDNS, "-conf", str(conf)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
            )  # fmt: skip
        server = Coredns(proc, conf, log)
        self._servers.append(server)
        return server

    def stop(self, server: Coredns) -> None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=5)
        if server in self._servers:
            self._servers.remove(server)

    def load(
        self, corefile: str, *, server: str, port: int = 53, name: str = "coredns", timeout: float = 5.0
    ) -> Coredns:
        """Start CoreDNS with ``corefile`` and wait until it answers the health probe at ``server``; raise
        CorednsRejectedError with its output if it exits or stays silent."""
        coredns = self.start(corefile, name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if coredns.proc.poll() is not None:
                self.stop(coredns)
                raise CorednsRejectedError(f"CoreDNS exited {coredns.proc.returncode}:\n{coredns.output()}")
            if self.dig(server, HEALTH_PROBE_NAME, port=port) == HEALTH_PROBE_ANSWER:
                return coredns
            time.sleep(0.02)
        self.stop(coredns)
        raise CorednsRejectedError(f"CoreDNS did not answer within {timeout}s:\n{coredns.output()}")

    @contextlib.contextmanager
    def running(self, corefile: str, *, server: str, port: int = 53) -> Iterator[Coredns]:
        coredns = self.load(corefile, server=server, port=port)
        try:
            yield coredns
        finally:
            self.stop(coredns)

    def exec(self, argv: Sequence[str], *, check: bool = True, timeout: float = 10) -> str:
        return sb.run(["ip", "netns", "exec", self.ns, *argv], check=check, timeout=timeout)

    def dig(self, server: str, name: str, rtype: str = "A", *, port: int = 53, tcp: bool = False) -> str:
        argv = ["dig", f"@{server}", "-p", str(port), name, rtype, "+short", "+time=1", "+tries=1"]
        if tcp:
            argv.append("+tcp")
        return self.exec(argv, check=False).strip()

    def http_get(self, url: str) -> str:
        """``/health`` or ``/ready`` from inside the namespace: the body, or "" unless it answers 200."""
        code = (
            "import sys, urllib.request\n"
            "with urllib.request.urlopen(sys.argv[1], timeout=2) as r:\n"
            "    print(r.read().decode())\n"
        )
        return self.exec([sys.executable, "-c", code, url], check=False).strip()
