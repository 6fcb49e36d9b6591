"""``agent --teardown``: remove the agent's rules (both backends) and its interface, then exit.

Run by the systemd unit's ExecStopPost and by hand. The removal itself is :mod:`agent.node.teardown`'s,
the same the agent's own shutdown uses; this command sets up logging and turns the outcome into the exit
code. The node modules are imported inside the function, so importing this module stays cheap.
"""

from __future__ import annotations

from agent.settings import Settings


def teardown(settings: Settings) -> int:
    """Rules, then addresses and the interface. Idempotent; 0 when all is gone, 1 when something stays."""
    from agent.node.teardown import teardown as remove_networking
    from agent.observe.logs import setup_logging
    from agent.observe.metrics import Metrics

    setup_logging(settings.log_format)
    return 0 if remove_networking(settings, Metrics()) else 1
