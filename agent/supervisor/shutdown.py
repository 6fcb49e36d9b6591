"""The budgeted shutdown, and the handover of the node to another agent.

DNS is handed back to kube-dns while CoreDNS still answers, then CoreDNS stopped, then the interface
removed, then the watchers: all within ``shutdown_budget``. Removing the rules before stopping CoreDNS (not
after) means no query is caught in a closing socket: new queries already go to kube-dns, those on their way
get answered. Another agent on the node (a surge upgrade) keeps the rules and the interface: only the last
agent out removes them; its CoreDNS shares the sockets, so stopping ours once it has bound loses no query.
Each step runs even if an earlier one failed. Every time is read from the supervisor's clock.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.coredns.process import CoreDnsProcess
from agent.observe.logs import get_logger
from agent.settings import Settings
from agent.supervisor.seams import CorefileSource, Network
from agent.supervisor.timing import Timing

log = get_logger("supervisor")

Step = tuple[str, Callable[[], None]]
# How often the handover checks whether the other agent's CoreDNS has bound the addresses.
HANDOVER_POLL = 0.05


def run_steps(steps: Sequence[Step]) -> None:
    """Each step runs even if an earlier one failed; a failure is logged with its traceback."""
    for name, action in steps:
        # The rules get a second try: rules left pointing at a stopped CoreDNS are the one leftover
        # that costs DNS (pods are safe behind the kernel gate; the node's own queries are not).
        for attempt in (1, 2) if name in ("rules", "host rules") else (1,):
            try:
                action()
                break
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.error("shutdown step failed", step=name, attempt=attempt, error=error,
                          traceback=traceback.format_exc())  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """The shutdown's deadline, on the supervisor's clock."""

    deadline: float
    clock: Callable[[], float]

    def left(self, at_most: float) -> float:
        """What is left of the budget, at most ``at_most`` seconds."""
        return min(at_most, max(0.0, self.deadline - self.clock()))


@dataclass
class Shutdown:
    """One shutdown of the node's part of the agent: the networking, the CoreDNS children, the watchers."""

    settings: Settings
    timing: Timing
    network: Network
    corefile: CorefileSource
    children: Sequence[CoreDnsProcess]  # every instance's current child
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    def run(self, first: Sequence[Step]) -> None:
        """``first`` (announcing the stop, stopping the probers), then the node's part within the budget."""
        budget = Budget(self.clock() + self.timing.shutdown_budget, self.clock)
        run_steps(first)
        with self.network.leave_node(budget.left(self.timing.shutdown_budget / 2)) as last:
            run_steps(self._node_steps(last, budget))
        run_steps([
            ("config watchers", lambda: self.corefile.stop_watchers(budget.left(1.0))),
            ("network watchers", lambda: self.network.stop_watchers(budget.left(1.0))),
        ])  # fmt: skip
        if last and self.settings.skip_teardown:
            log.info("networking left in place", cause="-skipteardown")

    def _node_steps(self, last: bool, budget: Budget) -> list[Step]:
        """The last agent out removes what it installed (``-skipteardown``: all but the host rules, which
        must not point the node at a CoreDNS about to stop); another agent staying takes the node over."""
        teardown = last and not self.settings.skip_teardown
        steps: list[Step] = []
        if teardown:
            steps += [
                ("rules", lambda: self.network.remove_rules(budget.deadline)),
                ("drain", lambda: self.sleep(budget.left(self.timing.drain))),
            ]
        elif last:
            steps += [("host rules", lambda: self.network.remove_host_rules(budget.deadline))]
        else:
            steps += [("handover", lambda: self.await_other_coredns(budget))]
        steps.append(("coredns", lambda: self.stop_coredns(budget)))
        if teardown:
            steps.append(("interface", self.network.remove_interface))
        return steps

    def stop_coredns(self, budget: Budget) -> None:
        """Every instance at once: SIGTERM to all, then each waited for within the grace, then killed."""
        for child in self.children:
            child.signal(signal.SIGTERM)
        for child in self.children:
            if child.wait(timeout=budget.left(self.timing.stop_grace)) is None:
                log.warning("coredns did not stop in time, killing it", grace=self.timing.stop_grace,
                            pid=child.pid)  # fmt: skip
                child.kill_group()
                child.wait(timeout=1.0)

    def await_other_coredns(self, budget: Budget) -> None:
        """Handing the node to another agent: its CoreDNS must have bound the addresses before ours stops
        (the other agent may not be serving yet), or pods on the link-local address would find no one."""
        if not any(child.wait(timeout=0) is None for child in self.children):
            return
        until = min(budget.deadline, self.clock() + self.timing.handover_wait)
        while not self.others_listening():
            if self.clock() >= until:
                wait = self.timing.handover_wait
                log.warning(
                    "coredns stopped before the other agent's", waited=wait, cause="it did not bind in time"
                )
                return
            self.sleep(HANDOVER_POLL)
        log.info("the other agent's coredns listens", cause="handing the node over")

    def others_listening(self) -> bool:
        """Another agent's CoreDNS has bound every local address: a process none of our instances is."""
        children = self.children
        ips, port = self.settings.require_local_ips(), self.settings.dns_port
        return bool(children) and children[0].listening(ips, port, ours=False, also=children[1:])
