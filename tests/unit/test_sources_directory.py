"""The directory source: one debounced event per kubelet ``..data`` swap or file edit, none for reads."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.corefile.kubedns import read_kubedns_dir
from agent.sources import SourceError
from agent.sources.directory import DirectoryWatcher
from harness.configmapdir import publish


class Calls:
    """Records on_change calls; ``wait_for(n)`` blocks until there were n (bounded)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.count = 0
        self.fail_first = fail_first
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()
        if self.fail_first and self.count == 1:
            raise RuntimeError("handler failed")

    def wait_for(self, n: int, timeout: float = 3.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, timeout)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[tuple[Path, Calls, DirectoryWatcher]]:
    directory = tmp_path / "kube-dns"
    publish(directory, {"stubDomains": '{"acme.local": ["10.0.0.1"]}'})
    calls = Calls()
    watcher = DirectoryWatcher(directory, calls, debounce=0.1)
    watcher.start()
    yield directory, calls, watcher
    watcher.stop()


def test_a_kubelet_data_swap_is_one_change(watch: tuple[Path, Calls, DirectoryWatcher]) -> None:
    directory, calls, _ = watch
    started = time.monotonic()
    publish(directory, {"stubDomains": '{"acme.local": ["10.0.0.2"]}', "upstreamNameservers": '["1.1.1.1"]'})
    assert calls.wait_for(1)
    assert time.monotonic() - started < 1.0
    time.sleep(0.3)  # longer than the debounce: nothing else arrives
    assert calls.count == 1
    assert read_kubedns_dir(directory).upstream_nameservers == ("1.1.1.1",)


def test_reading_the_directory_is_not_a_change(watch: tuple[Path, Calls, DirectoryWatcher]) -> None:
    directory, calls, _ = watch
    for _ in range(3):
        read_kubedns_dir(directory)
    time.sleep(0.3)
    assert calls.count == 0


@contextlib.contextmanager
def watching(directory: Path, calls: Calls) -> Iterator[None]:
    watcher = DirectoryWatcher(directory, calls, debounce=0.05)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


def test_reading_a_plain_file_is_not_a_change(tmp_path: Path) -> None:
    # The agent re-reads its template after each change: inotify reports that open and close too.
    template = tmp_path / "Corefile.base"
    template.write_text(".:53 {}\n")
    calls = Calls()
    with watching(tmp_path, calls):
        for _ in range(3):
            template.read_text()
        time.sleep(0.2)
        assert calls.count == 0


def test_a_plain_file_edit_is_a_change(tmp_path: Path) -> None:
    template = tmp_path / "Corefile.base"
    template.write_text(".:53 {}\n")
    calls = Calls()
    with watching(tmp_path, calls):
        template.write_text(".:53 {\n    whoami\n}\n")
        assert calls.wait_for(1)


def test_a_failing_handler_does_not_stop_the_watcher(tmp_path: Path) -> None:
    calls = Calls(fail_first=True)
    with watching(tmp_path, calls):
        publish(tmp_path, {"stubDomains": "{}"})
        assert calls.wait_for(1)
        publish(tmp_path, {"stubDomains": '{"a.example": ["10.0.0.1"]}'})
        assert calls.wait_for(2)


def test_stop_ends_the_watchers_threads(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    watcher = DirectoryWatcher(tmp_path, Calls())
    watcher.start()
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 2.0
    assert set(threading.enumerate()) <= before


def test_a_missing_directory_cannot_be_watched(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="missing: not a directory, cannot watch it"):
        DirectoryWatcher(tmp_path / "missing", Calls()).start()


def test_only_the_files_the_agent_reads_count_not_a_log_file_beside_them(tmp_path: Path) -> None:
    template = tmp_path / "Corefile.base"
    template.write_text(". { whoami }\n")
    calls = Calls()
    watcher = DirectoryWatcher(tmp_path, calls, debounce=0.05, names=frozenset({template.name}))
    watcher.start()
    try:
        log = tmp_path / "agent.log"
        for i in range(10):  # a log written beside the template every few ms
            with log.open("a") as f:
                f.write(f"line {i}\n")
            time.sleep(0.02)
        time.sleep(0.2)
        assert calls.count == 0
        swap = tmp_path / ".Corefile.base.swp"  # an editor's save: a temp file renamed over the template
        swap.write_text(". { whoami }\n# edited\n")
        swap.rename(template)
        assert calls.wait_for(1)
        publish(tmp_path / "cm", {"Corefile.base": "x"})  # unrelated subdirectory events: non-recursive
        time.sleep(0.2)
        assert calls.count == 1
    finally:
        watcher.stop()
    assert not watcher.alive


def test_a_kubelet_swap_counts_when_only_named_keys_are_watched(tmp_path: Path) -> None:
    publish(tmp_path, {"stubDomains": "{}"})
    calls = Calls()
    watcher = DirectoryWatcher(tmp_path, calls, debounce=0.05, names=frozenset({"stubDomains"}))
    watcher.start()
    try:
        assert watcher.alive
        publish(tmp_path, {"stubDomains": '{"acme.local": ["10.0.0.1"]}'})  # only ..data moves
        assert calls.wait_for(1)
    finally:
        watcher.stop()
