"""The mounted directory (a ConfigMap volume, a host's template folder), watched with watchdog (inotify)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.observe.logs import get_logger
from agent.sources import SourceError

log = get_logger("sources")

# Events that only say someone read a file (the agent itself, re-reading after a change): not changes.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})

# The kubelet's atomic writer renames a new ``..data`` symlink into place for every ConfigMap version.
KUBELET_DATA_LINK = "..data"


class DirectoryWatcher:
    """Calls ``on_change()`` once a burst of changes in directory ``path`` has been quiet for ``debounce`` s.

    The kubelet publishes a new ConfigMap version by creating a ``..TIMESTAMP`` directory, renaming a
    ``..data_tmp`` symlink over ``..data`` and deleting the old version: four events for one change, all in
    the mounted directory itself (the key symlinks never change), so a non-recursive watch of the directory
    sees them and one call follows. Plain edits of a file in the directory (a host's template) count too.

    ``names``: only changes to these files (and a ``..data`` swap) count; None counts every file. A log file
    or an editor's swap file next to the template must not re-render the Corefile in a loop."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None],
        debounce: float = 0.2,
        names: frozenset[str] | None = None,
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.debounce = debounce
        self.names = None if names is None else names | {KUBELET_DATA_LINK}
        self._cond = threading.Condition()
        self._due: float | None = None
        self._stopped = False
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        if not self.path.is_dir():
            raise SourceError(f"{self.path}: not a directory, cannot watch it")
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in _READ_ONLY_EVENTS and watcher.concerns(event):
                    watcher._poke()

        self._thread = threading.Thread(target=self._run, name=f"watch {self.path}", daemon=True)
        self._thread.start()
        self._observer = Observer()
        try:
            self._observer.schedule(Handler(), str(self.path), recursive=False)
            self._observer.start()
        except OSError as exc:  # inotify's per-user instance or watch limit, most often
            self.stop(timeout=1.0)
            raise SourceError(f"{self.path}: cannot watch it: {exc}") from exc
        log.info("directory_watch_started", path=str(self.path))

    def concerns(self, event: Any) -> bool:
        """Whether a watchdog event touches a file that counts (a move counts by either name)."""
        if self.names is None:
            return True
        paths = (event.src_path, getattr(event, "dest_path", "") or "")
        return any(Path(os.fsdecode(p)).name in self.names for p in paths if p)

    @property
    def alive(self) -> bool:
        """Both threads (the debouncer and watchdog's observer) run; False after :meth:`stop`."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._observer is not None
            and self._observer.is_alive()
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Both threads within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(max(0.0, deadline - time.monotonic()))
            self._observer = None
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None

    def _poke(self) -> None:
        with self._cond:
            self._due = time.monotonic() + self.debounce
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._due is None:
                        self._cond.wait()
                        continue
                    remaining = self._due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopped:
                    return
                self._due = None
            log.info("directory_changed", path=str(self.path))
            try:
                self.on_change()
            except Exception as exc:
                log.error("directory_change_handler_failed", path=str(self.path), error=repr(exc))
