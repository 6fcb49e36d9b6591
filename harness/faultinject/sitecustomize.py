"""Fault injection for the real agent under test: Python imports this module at start when its directory is
on PYTHONPATH (harness/agentproc.py puts it there when a test asks for a fault).

``AGENT_FAULT=module:Class.method:N`` makes the N-th call of that method raise ``RuntimeError("injected
fault")``; every other call runs the real code. That is how a test reaches the paths no real input can reach
on demand: an unexpected exception in the supervisor's loop, a background thread that dies.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any


def _inject(spec: str) -> None:
    module_name, qualname, nth = spec.split(":")
    owner_name, method_name = qualname.split(".")
    owner = getattr(importlib.import_module(module_name), owner_name)
    real = getattr(owner, method_name)
    calls = 0

    @functools.wraps(real)
    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == int(nth):
            raise RuntimeError(f"injected fault in {qualname} (call {calls})")
        return real(*args, **kwargs)

    setattr(owner, method_name, faulty)


if os.environ.get("AGENT_FAULT"):
    _inject(os.environ["AGENT_FAULT"])
