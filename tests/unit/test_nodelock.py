"""The agents lock, on real open-file-description locks: each NodeLock is its own open of the file, so two in
one process stand for two agents, as the kernel sees them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from agent.node.nodelock import NodeLock, NodeLockError

REPO = Path(__file__).resolve().parents[2]


def test_each_agent_sees_the_other_until_it_leaves(tmp_path: Path) -> None:
    path = tmp_path / "agents.lock"
    a, b = NodeLock(path), NodeLock(path)
    a.join()
    assert not a.others_alive()
    b.join()
    assert a.others_alive() and b.others_alive()
    with a.turn(1.0):
        a.leave()
    assert not b.others_alive()
    a.close()
    b.close()


def test_a_killed_agent_is_gone_at_once_and_its_coredns_never_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "agents.lock"
    agent = textwrap.dedent(
        f"""
        import subprocess, sys
        from pathlib import Path
        from agent.node.nodelock import NodeLock
        NodeLock(Path({str(path)!r})).join()
        child = subprocess.Popen(["sleep", "30"])  # stands for CoreDNS, which outlives a SIGKILLed agent
        print(child.pid, flush=True)
        sys.stdin.read()
        """
    )
    me = NodeLock(path)
    with subprocess.Popen(
        [sys.executable, "-c", agent], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    ) as proc:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        try:
            me.join()
            assert me.others_alive()
            proc.kill()
            proc.wait(5)
            assert not me.others_alive()
        finally:
            subprocess.run(["kill", "-9", str(child)], check=False)
            me.close()


def test_a_decision_waits_for_the_other_agents_turn(tmp_path: Path) -> None:
    path = tmp_path / "agents.lock"
    a, b = NodeLock(path), NodeLock(path)
    a.join()
    b.join()
    order: list[str] = []

    def b_decides() -> None:
        with b.turn(5.0):
            order.append("b decides")

    with a.turn(1.0):
        thread = threading.Thread(target=b_decides)
        thread.start()
        time.sleep(0.2)
        order.append("a done")
    thread.join(5)
    assert order == ["a done", "b decides"]
    started = time.monotonic()
    with a.turn(1.0), b.turn(0.3):  # kept past the timeout: b decides anyway, after the bound
        assert 0.3 <= time.monotonic() - started < 1.0
    a.close()
    b.close()


def test_an_unusable_path_is_named_in_the_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    try:
        NodeLock(blocker / "agents.lock").join()
    except NodeLockError as exc:
        assert str(blocker / "agents.lock") in str(exc)
    else:
        raise AssertionError("joined through a regular file")
    lonely = NodeLock(blocker / "agents.lock")
    assert not lonely.others_alive()
    with lonely.turn(0.1):
        pass  # without the lock a decision still runs
