"""One bounded polling loop for the tests, the demo and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(probe: Callable[[], T], timeout: float, every: float = 0.05) -> T:
    """Call ``probe`` until it returns something truthy or ``timeout`` seconds have passed, and return what it
    returned last (falsy on a timeout). It is called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        left = deadline - time.monotonic()
        if result or left <= 0:
            return result
        time.sleep(min(every, left))
