"""As PID 1 of a container the agent reaps orphans and passes signals on (a real PID namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs as PID 1 of a fresh PID namespace. Its "agent" leaves an orphan that exits at once (a zombie
# unless PID 1 reaps it), reports, then waits for SIGTERM and exits 7.
INIT = """
import os, signal, subprocess, sys, time
from agent.commands.pid1 import run_as_init

def fake_agent() -> int:
    subprocess.Popen(["sh", "-c", "sleep 0.2 & exit 0"]).wait()   # the sleep is orphaned to PID 1
    time.sleep(0.6)
    zombies = [p for p in os.listdir("/proc") if p.isdigit()
               and open(f"/proc/{p}/stat").read().split()[2] == "Z"]
    print(f"pid1={os.getppid()} zombies={len(zombies)}", flush=True)
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    while not got:
        time.sleep(0.05)
    print("child got SIGTERM", flush=True)
    return 7

assert os.getpid() == 1
sys.exit(run_as_init(fake_agent))
"""


def test_pid1_reaps_orphans_forwards_sigterm_and_returns_the_agents_exit_code() -> None:
    with subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", INIT],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "pid1=1 zombies=0"
        # unshare --fork forwards nothing; signal the namespace's PID 1 directly.
        init_pid = int(
            subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
        time.sleep(0.1)
        os.kill(init_pid, signal.SIGTERM)
        assert proc.stdout.readline().strip() == "child got SIGTERM"
        assert proc.wait(timeout=10) == 7
