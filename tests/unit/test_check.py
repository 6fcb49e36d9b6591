"""``agent --check`` and ``agent --ready`` on status files as the agent writes them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from agent.commands.check import check, readiness
from agent.observe.status import Status, now, write_status
from agent.settings import Settings


def settings_with(tmp_path: Path, **changes: Any) -> Settings:
    path = tmp_path / "status.json"
    serving = Status(pid=os.getpid(), heartbeat=now(), state="running", serving=True, detail="healthy")
    write_status(path, dataclasses.replace(serving, **changes))
    return Settings(status_file=path)


def test_ready_only_while_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(settings_with(tmp_path), ready=True) == 0
    not_serving = settings_with(tmp_path, state="backoff", serving=False, detail="exited 1")
    assert readiness(not_serving) == (False, "not serving: coredns backoff: exited 1")
    assert check(not_serving, ready=True) == 1
    assert check(not_serving) == 0  # alive all the same: the agent keeps DNS on kube-dns and retries
    assert "not serving" in capsys.readouterr().err


def test_not_ready_while_shutting_down_or_when_the_loop_is_stuck(tmp_path: Path) -> None:
    leaving = settings_with(tmp_path, shutting_down_since=now(), detail="received SIGTERM")
    assert readiness(leaving) == (False, "shutting down: received SIGTERM")
    stuck = settings_with(tmp_path, heartbeat=now() - 60)
    ready, why = readiness(stuck)
    assert not ready and "no progress" in why
