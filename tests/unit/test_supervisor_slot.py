"""A CoreDNS slot's state machine: only the transitions of its table happen; anything else is a bug."""

from __future__ import annotations

import itertools

import pytest

from agent.supervisor.slot import TRANSITIONS, IllegalTransitionError, Slot
from agent.supervisor.states import CoreDnsState
from agent.supervisor.timing import Timing

ALLOWED = [(before, after) for before, afters in TRANSITIONS.items() for after in sorted(afters)]
FORBIDDEN = [
    (before, after)
    for before, after in itertools.product(CoreDnsState, CoreDnsState)
    if after not in TRANSITIONS[before]
]


def slot_in(state: CoreDnsState) -> Slot:
    slot = Slot(0)
    slot.state, slot.cause = state, "set up by the test"
    return slot


@pytest.mark.parametrize(("before", "after"), ALLOWED, ids=[f"{b}->{a}" for b, a in ALLOWED])
def test_a_transition_in_the_table_changes_the_state_and_returns_the_one_left(
    before: CoreDnsState, after: CoreDnsState
) -> None:
    slot = slot_in(before)
    assert slot.change_state(after, "a new cause") is before
    assert (slot.state, slot.cause) == (after, "a new cause")


@pytest.mark.parametrize(("before", "after"), FORBIDDEN, ids=[f"{b}->{a}" for b, a in FORBIDDEN])
def test_a_transition_not_in_the_table_raises_and_changes_nothing(
    before: CoreDnsState, after: CoreDnsState
) -> None:
    slot = slot_in(before)
    with pytest.raises(IllegalTransitionError, match=f"{before} -> {after} is not an allowed transition"):
        slot.change_state(after, "a new cause")
    assert (slot.state, slot.cause) == (before, "set up by the test")


def test_the_table_forbids_what_a_supervisor_must_never_do() -> None:
    # Healthy only after starting; restarted only after a backoff; nothing after the shutdown but its end.
    assert CoreDnsState.RUNNING not in TRANSITIONS[CoreDnsState.STOPPED]
    assert CoreDnsState.RUNNING not in TRANSITIONS[CoreDnsState.BACKOFF]
    assert CoreDnsState.STARTING not in TRANSITIONS[CoreDnsState.RUNNING]
    assert TRANSITIONS[CoreDnsState.STOPPING] == {CoreDnsState.STOPPED}


def test_the_same_state_for_the_same_cause_is_no_transition() -> None:
    slot = slot_in(CoreDnsState.RUNNING)
    assert slot.change_state(CoreDnsState.RUNNING, "set up by the test") is None
    with pytest.raises(IllegalTransitionError):  # the same state for another cause is a transition
        slot.change_state(CoreDnsState.RUNNING, "another cause")


@pytest.mark.parametrize("state", list(CoreDnsState))
def test_the_shutdown_ends_in_stopped_from_any_state(state: CoreDnsState) -> None:
    slot = slot_in(state)
    slot.stopped("received SIGTERM")
    assert (slot.state, slot.cause) == (CoreDnsState.STOPPED, "received SIGTERM")


def test_the_restart_delay_doubles_up_to_the_cap_and_a_launch_that_never_tried_does_not_count() -> None:
    slot, timing = Slot(0), Timing()
    delays = [slot.schedule_restart(100.0, timing) for _ in range(8)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert slot.restart_at == 110.0
    assert slot.schedule_restart(100.0, timing, count=False) == 10.0 and slot.failures == 8


def test_running_long_enough_forgives_earlier_failures() -> None:
    slot, timing = Slot(0), Timing()
    slot.failures, slot.healthy_since = 5, 100.0
    slot.forgive(100.0 + timing.backoff_reset_after - 1, timing)
    assert slot.failures == 5 and slot.healthy_since is None
    slot.healthy_since = 100.0
    slot.forgive(100.0 + timing.backoff_reset_after, timing)
    assert slot.failures == 0
