"""Tests for ``roost.core.backoff`` and the restart counter it is applied to.

Backoff rules (the issue): the first delay is ``restart_backoff``, each further
restart doubles it, capped at ``restart_backoff_max``; the restart counter
resets once the agent has stayed running ``restart_reset_after`` seconds.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.config import LifecycleSettings as Policy
from roost.core import events as ev
from roost.core.backoff import restart_delay, restart_delays
from roost.core.records import AgentRecord, ExitInfo
from roost.core.states import AgentState
from roost.core.transition import transition

POLICY = Policy(restart_backoff=10.0, restart_backoff_max=300.0, max_restarts=3)


@pytest.mark.parametrize(
    ("restarts_so_far", "delay"),
    [(0, 10.0), (1, 20.0), (2, 40.0), (3, 80.0), (4, 160.0), (5, 300.0), (6, 300.0)],
)
def test_delay_doubles_from_restart_backoff_when_restarts_accumulate(
    restarts_so_far: int, delay: float
) -> None:
    assert restart_delay(POLICY, restarts_so_far) == delay


def test_first_delay_is_restart_backoff_when_no_restart_happened_yet() -> None:
    assert restart_delay(Policy(restart_backoff=7.5, restart_backoff_max=300.0), 0) == 7.5


def test_delay_is_capped_when_restart_backoff_exceeds_the_maximum() -> None:
    policy = Policy(restart_backoff=50.0, restart_backoff_max=30.0)
    assert [restart_delay(policy, n) for n in range(3)] == [30.0, 30.0, 30.0]


@pytest.mark.parametrize("backoff", [0.0, -1.0])
def test_delay_is_zero_when_backoff_is_disabled(backoff: float) -> None:
    # model_construct: configuration refuses a negative backoff; the core still copes.
    policy = Policy.model_construct(restart_backoff=backoff, restart_backoff_max=300.0)
    assert [restart_delay(policy, n) for n in range(5)] == [0.0] * 5


def test_negative_count_counts_as_none_when_passed() -> None:
    assert restart_delay(POLICY, -3) == restart_delay(POLICY, 0)


def test_huge_count_stays_capped_when_exponent_would_overflow() -> None:
    assert restart_delay(POLICY, 10_000) == 300.0


def test_delays_list_one_delay_per_allowed_restart_when_displayed() -> None:
    assert restart_delays(POLICY) == (10.0, 20.0, 40.0)
    assert restart_delays(POLICY.model_copy(update=dict(max_restarts=0))) == ()


@settings(max_examples=200, deadline=None)
@given(
    backoff=st.floats(min_value=0.0, max_value=1e6),
    backoff_max=st.floats(min_value=0.0, max_value=1e6),
    max_restarts=st.integers(min_value=0, max_value=80),
)
def test_delays_never_shrink_and_stay_capped_when_policy_varies(
    backoff: float, backoff_max: float, max_restarts: int
) -> None:
    policy = Policy(
        restart_backoff=backoff, restart_backoff_max=backoff_max, max_restarts=max_restarts
    )
    delays = restart_delays(policy)
    assert len(delays) == max_restarts
    assert all(0.0 <= d <= max(backoff_max, 0.0) for d in delays)
    assert all(a <= b for a, b in itertools.pairwise(delays))
    if delays and backoff > 0:
        assert delays[0] == min(backoff, backoff_max)


# -- the counter the delays are indexed by ---------------------------------------------

NOW = 20_000.0
CRASH = ExitInfo(exit_code=1)


def running_for(seconds: float, restart_count: int) -> AgentRecord:
    return AgentRecord(
        name="echo",
        state=AgentState.RUNNING,
        container_id="c1",
        url="http://127.0.0.1:40000",
        restart_count=restart_count,
        state_since=NOW - seconds,
        running_since=NOW - seconds,
        last_activity_at=NOW,
    )


def test_counter_resets_when_agent_stayed_running_restart_reset_after() -> None:
    policy = POLICY.model_copy(update=dict(restart_reset_after=600.0))
    decision = transition(
        running_for(600.0, restart_count=3), ev.ContainerExited("c1", CRASH), now=NOW, policy=policy
    )
    assert decision.record.state is AgentState.RESTARTING
    assert decision.record.restart_count == 1
    assert decision.record.restart_at == NOW + restart_delay(policy, 0)


def test_counter_kept_when_agent_crashes_before_restart_reset_after() -> None:
    policy = POLICY.model_copy(update=dict(restart_reset_after=600.0))
    decision = transition(
        running_for(300.0, restart_count=2), ev.ContainerExited("c1", CRASH), now=NOW, policy=policy
    )
    assert decision.record.restart_count == 3
    assert decision.record.restart_at == NOW + restart_delay(policy, 2)


def test_default_reset_window_is_ten_minutes_when_not_configured() -> None:
    assert Policy().restart_reset_after == 600.0
