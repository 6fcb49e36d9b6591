"""Where the configuration comes from, watched: a mounted directory (:mod:`agent.sources.directory`) and the
Kubernetes API (:mod:`agent.sources.api`).

The watchers only post events: they call the callback they were given, from their own thread, and never touch
the agent's state. The supervisor re-reads, validates and decides. A callback that raises is logged and the
watcher carries on; a watcher never stops by itself before its ``stop()``.
"""


class SourceError(RuntimeError):
    """A configuration source could not be read (API unreachable or refusing, directory missing, ...)."""
