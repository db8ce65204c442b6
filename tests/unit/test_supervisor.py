"""The supervisor's per-agent actors on fake Docker, fake agent HTTP and fake time.

Every time-driven rule (readiness, restart backoff, idle steps, liveness, the
restart-counter reset) runs on ``FakeClock``: a test moves time with
``clock.advance`` and then waits, with a real-time deadline, for the actor to
have acted (state changes are persisted on the database's writer thread).
No test sleeps to let time pass. Durations in these tests are sums of powers of
two, so fake-time arithmetic is exact and "after exactly N seconds" is exact.

``Rig`` (also used by ``test_engine_fake``) wires ``Engine`` to ``FakeRuntime``,
a probe-switchable ``FakeAgentClient``, ``FakeClock`` and a recording notifier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from roost import errors
from roost.core import events as ev
from roost.core.records import AgentRecord, SessionHealth
from roost.core.states import AgentState
from roost.core.transition import HEALTHCHECK_FAILED
from tests.conftest import wait_until
from tests.support import ACT_TIMEOUT, IMAGE, Rig, open_rig

S = AgentState


def active_at(moment: float) -> Callable[[AgentRecord], bool]:
    return lambda record: record.last_activity_at == moment


def failed_probes(count: int) -> Callable[[AgentRecord], bool]:
    return lambda record: record.liveness_failures == count


# -- start and readiness ----------------------------------------------------------------


async def test_agent_runs_with_url_when_started_and_probe_answers(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        record = await rig.start("echo")
        assert record.state is S.RUNNING
        assert record.container_id is not None
        assert record.url is not None
        assert await rig.container_running(record.container_id)
        state = await rig.runtime.inspect(record.container_id)
        assert record.url == f"http://127.0.0.1:{state.host_port}"
        assert state.labels["roost.instance"] == "unit"
        assert state.labels["roost.agent"] == "echo"
        assert await rig.to_states("echo") == ["starting", "running"]


async def test_agent_stays_starting_until_probe_answers_when_app_is_slow(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        rig.client.refusing = True
        await rig.sup.request("echo", ev.StartRequested())
        await rig.until("echo", lambda r: r.container_id is not None, "container created")
        cid = rig.record("echo").container_id
        assert cid is not None
        await wait_until(lambda: rig.client.probes > 0, timeout=ACT_TIMEOUT, interval=0.001)
        await rig.clock.advance(8)
        assert rig.record("echo").state is S.STARTING
        assert await rig.container_running(cid)  # up, but not ready: not running yet

        rig.client.refusing = False
        await rig.clock.advance(0.0078125)  # > one readiness poll interval
        record = await rig.reaches("echo", S.RUNNING)
        assert record.container_id == cid


async def test_concurrent_wakes_merge_into_one_create_when_agent_is_stopped(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        records = await asyncio.gather(*(rig.start("echo") for _ in range(5)))
        assert len({r.container_id for r in records}) == 1
        assert all(r.state is S.RUNNING for r in records)
        assert len(rig.calls("create")) == 1
        assert (await rig.to_states("echo")).count("starting") == 1


# -- crashes, backoff, failure -----------------------------------------------------------


async def _crash_and_expect_restart(
    rig: Rig, name: str, *, exit_code: int, delay: float, restarts: int
) -> AgentRecord:
    """Crash the agent's container; check it restarts after exactly ``delay`` fake seconds."""
    before = rig.record(name)
    assert before.state is S.RUNNING
    assert before.container_id is not None
    crashed_at = rig.clock.now()
    creates = len(rig.calls("create"))
    rig.runtime.crash(before.container_id, exit_code=exit_code)
    record = await rig.reaches(name, S.RESTARTING)
    assert record.restart_count == restarts
    assert record.restart_at == crashed_at + delay
    assert record.last_exit is not None
    assert record.last_exit.exit_code == exit_code
    assert record.container_id is None

    await rig.clock.advance(delay - 0.5)
    assert rig.record(name).state is S.RESTARTING
    assert len(rig.calls("create")) == creates  # nothing started before the delay
    await rig.clock.advance(0.5)
    record = await rig.reaches(name, S.RUNNING)
    assert record.container_id not in (None, before.container_id)
    assert record.restart_count == restarts
    with pytest.raises(errors.ContainerNotFound):
        await rig.runtime.inspect(before.container_id)  # the crashed one is removed
    return record


async def test_crash_restarts_after_exactly_the_backoff_when_container_exits_nonzero(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        await rig.start("echo")
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)
        history = await rig.history("echo")
        steps = [(c.to_state.value, c.reason, c.at) for c in history]
        assert [s[0] for s in steps] == [
            "starting",
            "running",
            "crashed",
            "restarting",
            "starting",
            "running",
        ]
        assert "exited with code 1" in steps[2][1]
        assert steps[4][2] - steps[3][2] == 8  # restarting → starting: the backoff, on fake time


async def test_backoff_doubles_and_caps_when_agent_keeps_crashing(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        await rig.start("echo")
        # restart_backoff 8, doubling, capped at restart_backoff_max 20
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)
        await _crash_and_expect_restart(rig, "echo", exit_code=2, delay=16, restarts=2)
        await _crash_and_expect_restart(rig, "echo", exit_code=3, delay=20, restarts=3)


async def test_agent_fails_and_admin_is_notified_once_when_max_restarts_exceeded(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"max_restarts": 2}) as rig:
        await rig.start("echo")
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=16, restarts=2)
        cid = rig.record("echo").container_id
        assert cid is not None
        rig.runtime.log_lines[cid] = [f"line {i}" for i in range(180)] + ["out of memory"]
        rig.runtime.crash(cid, exit_code=137, oom=True)
        record = await rig.reaches("echo", S.FAILED)
        assert record.restart_count == 2
        assert record.last_exit is not None
        assert record.last_exit.oom_killed
        async with asyncio.timeout(ACT_TIMEOUT):
            while not rig.notifier.of_kind("agent.failed"):
                rig.notifier.arrived.clear()
                await rig.notifier.arrived.wait()

        # failed is terminal: no restart however long we wait, and one notice only
        await rig.clock.advance(4096)
        assert rig.record("echo").state is S.FAILED
        assert len(rig.calls("create")) == 3
        notices = rig.notifier.of_kind("agent.failed")
        assert len(notices) == 1
        notice = notices[0]
        assert notice["agent"] == "echo"
        assert notice["exit_code"] == 137
        assert notice["oom_killed"] is True
        assert notice["restart_count"] == 2
        assert notice["max_restarts"] == 2
        tail = notice["log_tail"].splitlines()
        assert tail[-1] == "out of memory"
        assert len(tail) == 100  # the last LOG_TAIL_LINES lines, not the whole log
        assert "OOM" in (await rig.history("echo"))[-1].reason

        with pytest.raises(errors.StateError):
            await rig.sup.request("echo", ev.StartRequested())
        reset = await rig.sup.request("echo", ev.ResetRequested())
        assert reset.state is S.STOPPED
        assert reset.restart_count == 0
        assert reset.last_error == ""
        again = await rig.start("echo")
        assert again.state is S.RUNNING
        assert again.restart_count == 0


async def test_restart_counter_resets_when_agent_ran_longer_than_restart_reset_after(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"restart_reset_after": 64}) as rig:
        await rig.start("echo")
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)
        await rig.clock.advance(64)  # stays up exactly restart_reset_after
        # a fresh crash: first delay again and count 1, not the doubled delay and 2
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)


async def test_restart_counter_keeps_counting_when_agent_crashes_before_restart_reset_after(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"restart_reset_after": 64}) as rig:
        await rig.start("echo")
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=8, restarts=1)
        await rig.clock.advance(63.5)
        await _crash_and_expect_restart(rig, "echo", exit_code=1, delay=16, restarts=2)


# -- idling ----------------------------------------------------------------------------

IDLE_DEFAULTS: dict[str, Any] = {
    "idle_mark_after": 16,
    "pause_after": 32,
    "idle_timeout": 128,
    "idle_action": "stop",
}


async def test_idle_agent_is_marked_paused_then_stopped_when_quiet(tmp_path: Path) -> None:
    async with open_rig(tmp_path, defaults=IDLE_DEFAULTS) as rig:
        record = await rig.start("echo")
        cid = record.container_id
        assert cid is not None
        rig.runtime.stop_exit_code = 143  # the app dies of SIGTERM: still no crash

        await rig.clock.advance(15.5)
        assert rig.record("echo").state is S.RUNNING
        await rig.clock.advance(0.5)
        await rig.reaches("echo", S.IDLE)
        assert await rig.container_running(cid)

        await rig.clock.advance(15.5)
        assert rig.record("echo").state is S.IDLE
        await rig.clock.advance(0.5)
        await rig.reaches("echo", S.PAUSED)
        await wait_until(lambda: rig.calls("pause") == [cid], timeout=ACT_TIMEOUT, interval=0.001)
        assert (await rig.runtime.inspect(cid)).paused

        await rig.clock.advance(95.5)
        assert rig.record("echo").state is S.PAUSED
        assert not rig.calls("stop")
        await rig.clock.advance(0.5)
        await rig.reaches("echo", S.STOPPED)
        stopped = await rig.until(
            "echo", lambda r: r.last_exit is not None, "the exit of the idle-stopped container"
        )
        assert rig.calls("stop") == [cid]
        assert not (await rig.runtime.inspect(cid)).running
        assert stopped.last_exit is not None
        assert stopped.last_exit.exit_code == 143
        assert stopped.restart_count == 0
        assert stopped.container_id == cid  # kept: the next wake starts it again
        history = await rig.history("echo")
        assert [c.to_state.value for c in history][-3:] == ["idle", "paused", "stopped"]
        running_at = history[1].at
        assert [c.at - running_at for c in history[-3:]] == [16, 32, 128]

        woken = await rig.start("echo")
        assert woken.container_id == cid
        assert len(rig.calls("create")) == 1


async def test_activity_postpones_idling_when_agent_is_touched(tmp_path: Path) -> None:
    async with open_rig(tmp_path, defaults=IDLE_DEFAULTS) as rig:
        await rig.start("echo")
        await rig.clock.advance(12)
        touched_at = rig.clock.now()
        rig.actor("echo").touch()
        await rig.until("echo", lambda r: r.last_activity_at == touched_at, "activity recorded")

        await rig.clock.advance(15.5)  # past the first mark, counted from the start
        assert rig.record("echo").state is S.RUNNING
        await rig.clock.advance(0.5)
        await rig.reaches("echo", S.IDLE)
        assert (await rig.history("echo"))[-1].at - touched_at == 16

        # activity wakes an idle agent back to running, and the clock starts again
        rig.actor("echo").touch()
        await rig.reaches("echo", S.RUNNING)
        await rig.clock.advance(15.5)
        assert rig.record("echo").state is S.RUNNING
        assert not rig.calls("pause")


async def test_busy_agent_is_never_paused_when_activity_outlasts_idle_timeout(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults=IDLE_DEFAULTS) as rig:
        record = await rig.start("echo")
        assert record.container_id is not None
        actor = rig.actor("echo")
        async with actor.busy():
            for _ in range(10):  # 160 fake seconds, beyond idle_timeout (128)
                await rig.clock.advance(16)
                now = rig.clock.now()
                await rig.until("echo", active_at(now), "busy tick recorded")
                assert rig.record("echo").state is S.RUNNING
            assert not rig.calls("pause")
            assert not rig.calls("stop")
            assert await rig.container_running(record.container_id)
        released_at = rig.clock.now()
        # once the work is done, idling resumes from the end of the activity
        await rig.clock.advance(15.5)
        assert rig.record("echo").state is S.RUNNING
        await rig.clock.advance(0.5)
        await rig.reaches("echo", S.IDLE)
        assert (await rig.history("echo"))[-1].at - released_at == 16


async def test_idle_agent_is_paused_not_stopped_when_idle_action_is_pause(
    tmp_path: Path,
) -> None:
    defaults = {"idle_mark_after": 16, "idle_timeout": 64, "idle_action": "pause"}
    async with open_rig(tmp_path, defaults=defaults) as rig:
        record = await rig.start("echo")
        cid = record.container_id
        assert cid is not None
        await rig.clock.advance(16)
        await rig.reaches("echo", S.IDLE)
        await rig.clock.advance(48)
        await rig.reaches("echo", S.PAUSED)
        await rig.clock.advance(4096)
        assert rig.record("echo").state is S.PAUSED
        await wait_until(lambda: rig.calls("pause") == [cid], timeout=ACT_TIMEOUT, interval=0.001)
        assert not rig.calls("stop")
        woken = await rig.start("echo")
        assert woken.container_id == cid
        assert rig.calls("unpause") == [cid]


async def test_agent_paused_while_healthy_is_running_at_unpause_without_a_probe(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        record = await rig.start("echo")
        cid = record.container_id
        await rig.sup.request("echo", ev.PauseRequested("test"))
        await wait_until(lambda: rig.calls("pause") == [cid], timeout=ACT_TIMEOUT, interval=0.001)
        probes = rig.client.probes
        rig.client.refusing = True  # a probe now would fail: none must be needed
        woken = await rig.start("echo")
        assert woken.state is S.RUNNING
        assert woken.container_id == cid
        assert rig.calls("unpause") == [cid]
        assert rig.client.probes == probes


async def test_agent_paused_after_a_failed_probe_is_probed_again_at_unpause(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"liveness_failures": 3}) as rig:
        record = await rig.start("echo")
        cid = record.container_id
        assert cid is not None
        await rig.actor("echo").submit(ev.LivenessProbed(cid, False, "HTTP 503"))
        assert rig.record("echo").liveness_failures == 1
        await rig.sup.request("echo", ev.PauseRequested("test"))
        await wait_until(lambda: rig.calls("pause") == [cid], timeout=ACT_TIMEOUT, interval=0.001)
        rig.client.refusing = True
        probes = rig.client.probes
        waking = asyncio.ensure_future(rig.start("echo"))
        await wait_until(
            lambda: rig.client.probes > probes, timeout=ACT_TIMEOUT, what="a readiness probe"
        )
        assert rig.record("echo").state is S.STARTING  # not running while it fails
        assert not waking.done()
        rig.client.refusing = False
        await rig.clock.advance(0.25)  # the readiness loop's next poll
        woken = await waking
        assert woken.state is S.RUNNING
        assert woken.container_id == cid


# -- liveness ----------------------------------------------------------------------------


async def test_unhealthy_agent_is_restarted_when_liveness_probes_fail(tmp_path: Path) -> None:
    defaults = {"liveness_interval": 4, "liveness_failures": 3}
    async with open_rig(tmp_path, defaults=defaults) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        assert first.url is not None
        state = await rig.runtime.inspect(first.container_id)
        assert state.host_port is not None
        rig.client.unhealthy_ports.add(state.host_port)

        for failures in (1, 2):
            await rig.clock.advance(4)
            record = await rig.until("echo", failed_probes(failures), f"{failures} failures")
            assert record.state is S.RUNNING
            assert record.container_id == first.container_id
        await rig.clock.advance(4)
        record = await rig.reaches("echo", S.RESTARTING)
        assert record.restart_count == 1
        assert record.last_exit is not None
        assert "unhealthy: 3 failed health checks (HTTP 503)" in record.last_exit.error
        crashed = [c for c in await rig.history("echo") if c.to_state is S.CRASHED]
        assert len(crashed) == 1
        assert "unhealthy" in crashed[0].reason

        await rig.clock.advance(8)
        again = await rig.reaches("echo", S.RUNNING)
        assert again.container_id != first.container_id
        assert again.liveness_failures == 0
        with pytest.raises(errors.ContainerNotFound):
            await rig.runtime.inspect(first.container_id)


async def test_agent_is_restarted_with_backoff_when_image_healthcheck_reports_unhealthy(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        rig.runtime.report_health(first.container_id, SessionHealth.HEALTHY)
        crashed_at = rig.clock.now()

        rig.runtime.report_health(first.container_id, SessionHealth.UNHEALTHY)

        record = await rig.reaches("echo", S.RESTARTING)
        assert record.restart_count == 1
        assert record.restart_at == crashed_at + 8
        assert record.last_exit is not None
        assert record.last_exit.error == HEALTHCHECK_FAILED
        await rig.clock.advance(8)
        again = await rig.reaches("echo", S.RUNNING)
        assert again.container_id != first.container_id
        with pytest.raises(errors.ContainerNotFound):
            await rig.runtime.inspect(first.container_id)
        assert await rig.to_states("echo") == [
            "starting",
            "running",
            "crashed",
            "restarting",
            "starting",
            "running",
        ]


async def test_fixed_host_port_is_reused_when_restart_replaces_a_running_container(
    tmp_path: Path,
) -> None:
    agents = {"echo": {"image": IMAGE, "host_port": 9001, "host_ip": "0.0.0.0"}}
    async with open_rig(tmp_path, agents=agents) as rig:
        first = await rig.start("echo")
        assert first.url == "http://127.0.0.1:9001"
        assert first.container_id is not None
        spec = rig.runtime.container_spec(first.container_id)
        assert (spec.host_port, spec.publish_host) == (9001, "0.0.0.0")

        await rig.sup.request("echo", ev.RestartRequested())
        again = await rig.reaches("echo", S.RUNNING)

        assert again.container_id is not None
        assert again.container_id != first.container_id
        assert again.url == "http://127.0.0.1:9001"
        assert again.restart_count == 0
        # The old container holds the port until it is removed (a real removal takes
        # ~100 ms): the new one is created only after that, never beside it.
        calls = rig.runtime.calls
        assert calls.index(("remove", first.container_id)) < calls.index(
            ("create", again.container_id)
        )


async def test_liveness_failures_reset_when_a_probe_succeeds_again(tmp_path: Path) -> None:
    defaults = {"liveness_interval": 4, "liveness_failures": 3}
    async with open_rig(tmp_path, defaults=defaults) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        port = (await rig.runtime.inspect(first.container_id)).host_port
        assert port is not None
        rig.client.unhealthy_ports.add(port)
        for failures in (1, 2):
            await rig.clock.advance(4)
            await rig.until("echo", failed_probes(failures), "failures")
        rig.client.unhealthy_ports.clear()
        await rig.clock.advance(4)
        await rig.until("echo", lambda r: r.liveness_failures == 0, "recovered")
        rig.client.unhealthy_ports.add(port)
        for failures in (1, 2):
            await rig.clock.advance(4)
            await rig.until("echo", failed_probes(failures), "failures")
        record = rig.record("echo")
        assert record.state is S.RUNNING
        assert record.container_id == first.container_id
        assert record.restart_count == 0


# -- exits Roost caused ------------------------------------------------------------------


async def test_stop_cancels_the_start_when_agent_is_still_starting(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        rig.client.refusing = True
        await rig.sup.request("echo", ev.StartRequested())
        record = await rig.until("echo", lambda r: r.container_id is not None, "container created")
        cid = record.container_id
        assert cid is not None
        await wait_until(lambda: rig.client.probes > 0, timeout=ACT_TIMEOUT, interval=0.001)

        stopped = await rig.sup.request("echo", ev.StopRequested())
        assert stopped.state is S.STOPPED
        await rig.until("echo", lambda r: r.last_exit is not None, "the container's exit")
        assert not (await rig.runtime.inspect(cid)).running
        probes = rig.client.probes
        # the readiness loop is gone: no probe, no startup timeout, no crash, ever
        await rig.clock.advance(64)
        assert rig.client.probes == probes
        record = rig.record("echo")
        assert record.state is S.STOPPED
        assert record.restart_count == 0
        assert record.last_error == ""
        assert "crashed" not in await rig.to_states("echo")


async def test_exit_roost_caused_is_never_a_crash_when_agent_is_stopped(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        rig.runtime.stop_exit_code = 143  # nonzero, as an app killed by SIGTERM
        await rig.sup.request("echo", ev.StopRequested())
        record = await rig.until("echo", lambda r: r.last_exit is not None, "the exit")
        assert record.last_exit is not None
        assert record.last_exit.exit_code == 143
        await rig.clock.advance(4096)
        record = rig.record("echo")
        assert record.state is S.STOPPED
        assert record.restart_count == 0
        assert await rig.to_states("echo") == ["starting", "running", "stopped"]
        assert len(rig.calls("create")) == 1


async def test_exit_zero_is_stopped_not_crashed_when_nobody_asked_for_it(tmp_path: Path) -> None:
    async with open_rig(tmp_path) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        rig.runtime.crash(first.container_id, exit_code=0)
        record = await rig.reaches("echo", S.STOPPED)
        assert record.restart_count == 0
        assert record.last_exit is not None
        assert record.last_exit.exit_code == 0
        await rig.clock.advance(4096)
        assert rig.record("echo").state is S.STOPPED
        assert len(rig.calls("create")) == 1
