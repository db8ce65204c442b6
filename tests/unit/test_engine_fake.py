"""The engine end to end on fakes: reconcile, start failures, shutdown and adoption.

The same behaviours as tests/integration/test_reconcile.py and parts of
test_lifecycle.py, but on ``FakeRuntime`` and ``FakeClock``: fast, deterministic,
and able to put Docker into states that are hard to reach for real (a
container removed behind Roost's back, an event-stream gap). Containers that
"someone else" made are created directly in the fake runtime.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from roost import errors
from roost.adapters.sqlite_tokens import SqliteTokenStore
from roost.core import events as ev
from roost.core import labels
from roost.core.states import AgentState
from roost.ports.runtime import ContainerSpec
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import wait_until
from tests.support import ACT_TIMEOUT, IMAGE, Rig, advance_until, open_rig

S = AgentState


async def _run_container(runtime: FakeRuntime, container_labels: dict[str, str]) -> str:
    """A running container made behind Roost's back (by hand, or by another Roost)."""
    cid = await runtime.create(ContainerSpec(image=IMAGE, labels=container_labels, port=8000))
    await runtime.start(cid)
    return cid


async def _exists(runtime: FakeRuntime, container_id: str) -> bool:
    try:
        await runtime.inspect(container_id)
    except errors.ContainerNotFound:
        return False
    return True


async def _wait_notice(rig: Rig, kind: str) -> None:
    async with asyncio.timeout(ACT_TIMEOUT):
        while not rig.notifier.of_kind(kind):
            rig.notifier.arrived.clear()
            await rig.notifier.arrived.wait()


# -- reconcile -------------------------------------------------------------------------


async def test_reconcile_removes_only_this_instances_orphans_when_engine_starts(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    ours = await _run_container(runtime, labels.agent_labels("unit", "ghost", "h"))
    theirs = await _run_container(runtime, labels.agent_labels("other", "ghost", "h"))
    plain = await _run_container(runtime, {"roost.agent": "echo"})  # not managed
    job = await _run_container(runtime, {**labels.ownership("unit"), labels.JOB: "j1"})
    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        assert rig.sup.reconciles == 1
        assert not await _exists(runtime, ours)
        for untouched in (theirs, plain, job):
            assert (await runtime.inspect(untouched)).running
        assert rig.calls("remove") == [ours]
        record = rig.record("echo")
        assert record.state is S.CREATED
        assert record.container_id is None


async def test_reconcile_runs_again_and_removes_orphans_when_event_stream_has_a_gap(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        await rig.start("echo")
        before = rig.sup.reconciles
        orphan = await _run_container(rig.runtime, labels.agent_labels("unit", "ghost", "h"))
        rig.runtime.emit_gap()
        await wait_until(
            lambda: rig.sup.reconciles == before + 1,
            timeout=ACT_TIMEOUT,
            interval=0.001,
            what="reconcile after the gap",
        )

        async def orphan_gone() -> bool:
            return not await _exists(rig.runtime, orphan)

        await wait_until(
            orphan_gone,
            timeout=ACT_TIMEOUT,
            interval=0.001,
            what="orphan removal",
        )
        record = rig.record("echo")
        assert record.state is S.RUNNING  # the agent's own container is adopted as is
        assert len(rig.calls("create")) == 2  # echo's and the orphan, nothing recreated


async def test_agent_is_restarted_as_a_crash_when_its_container_vanished_while_roost_was_down(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    async with open_rig(
        tmp_path, runtime=runtime, clock=clock, docker={"leave_running": True}
    ) as rig:
        first = await rig.start("echo")
    assert first.container_id is not None
    await runtime.remove(first.container_id, force=True)

    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = await rig.reaches("echo", S.RESTARTING)
        assert record.restart_count == 1
        assert record.container_id is None
        assert record.last_exit is not None
        assert record.last_exit.error == "container vanished"
        await rig.clock.advance(8)
        again = await rig.reaches("echo", S.RUNNING)
        assert again.container_id not in (None, first.container_id)
        assert (await rig.to_states("echo"))[-4:] == [
            "crashed",
            "restarting",
            "starting",
            "running",
        ]


async def test_agent_is_restarted_as_a_crash_when_its_container_died_while_roost_was_down(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    async with open_rig(
        tmp_path, runtime=runtime, clock=clock, docker={"leave_running": True}
    ) as rig:
        first = await rig.start("echo")
    assert first.container_id is not None
    runtime.crash(first.container_id, exit_code=137)

    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = await rig.reaches("echo", S.RESTARTING)
        assert record.restart_count == 1
        assert record.last_exit is not None
        assert record.last_exit.exit_code == 137
        assert not await _exists(runtime, first.container_id)
        await rig.clock.advance(8)
        again = await rig.reaches("echo", S.RUNNING)
        assert again.container_id != first.container_id


# -- start failures --------------------------------------------------------------------


async def test_startup_timeout_fails_start_and_names_health_path_when_probe_never_answers(
    tmp_path: Path,
) -> None:
    agents = {"slow": {"image": IMAGE, "health_path": "/ready", "startup_timeout": 2}}
    async with open_rig(tmp_path, agents=agents, defaults={"max_restarts": 0}) as rig:
        rig.client.refusing = True
        waiter = asyncio.create_task(
            rig.sup.ensure_running("slow", timeout=ACT_TIMEOUT, fail_fast=True)
        )
        record = await rig.until("slow", lambda r: r.container_id is not None, "container")
        cid = record.container_id
        assert cid is not None
        rig.runtime.log_lines[cid] = ["booting", "still loading the model"]
        await wait_until(lambda: rig.client.probes > 0, timeout=ACT_TIMEOUT, interval=0.001)

        await rig.clock.advance(1.75)
        assert rig.record("slow").state is S.STARTING
        assert not waiter.done()
        await rig.clock.advance(0.5)
        with pytest.raises(errors.ContainerError) as caught:
            await waiter
        assert "slow" in str(caught.value)
        record = await rig.reaches("slow", S.FAILED)
        assert "did not answer GET /ready with 200 within 2s" in record.last_error
        assert "still loading the model" in record.last_error  # the log tail
        assert record.container_id is None
        await wait_until(lambda: rig.calls("remove") == [cid], timeout=ACT_TIMEOUT, interval=0.001)
        await _wait_notice(rig, "agent.failed")
        notice = rig.notifier.of_kind("agent.failed")[0]
        assert "still loading the model" in notice["log_tail"]


async def test_startup_timeout_is_retried_with_backoff_when_restarts_remain(
    tmp_path: Path,
) -> None:
    agents = {"slow": {"image": IMAGE, "startup_timeout": 2}}
    async with open_rig(tmp_path, agents=agents) as rig:
        rig.client.refusing = True
        await rig.sup.request("slow", ev.StartRequested())
        await rig.until("slow", lambda r: r.container_id is not None, "container")
        await wait_until(lambda: rig.client.probes > 0, timeout=ACT_TIMEOUT, interval=0.001)
        await rig.clock.advance(2.25)
        record = await rig.reaches("slow", S.RESTARTING)
        assert record.restart_count == 1
        rig.client.refusing = False
        await rig.clock.advance(8)
        record = await rig.reaches("slow", S.RUNNING)
        assert len(rig.calls("create")) == 2


async def test_start_pulls_the_image_then_creates_again_when_the_create_found_it_absent(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[], pullable=[IMAGE], clock=clock.now)
    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = await rig.start("echo")
        assert record.state is S.RUNNING
        assert record.restart_count == 0
        # A start creates first (no image lookup on the way); refused, it pulls, then
        # creates again: one container, recorded.
        steps = [op for op, _ in runtime.calls if op in ("ensure_image", "create")]
        assert steps == ["create", "ensure_image", "create"]
        assert rig.calls("create")[0] == ""
        assert rig.calls("create")[1] == record.container_id


async def test_container_goes_unrecorded_while_its_token_cannot_be_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: SqliteTokenStore, agent: str, token_hash: str) -> None:
        raise errors.StoreError("state database: store agent token hash failed: disk I/O error")

    async with open_rig(tmp_path) as rig:
        monkeypatch.setattr(SqliteTokenStore, "put", refuse)
        starting = asyncio.ensure_future(rig.sup.request("echo", ev.StartRequested("test")))
        await advance_until(rig.clock, lambda: rig.engine.health.holds("store"), step=0.05)
        # The container was created while the token was being stored; it holds a token
        # no restarted Roost would know, so nothing records it while the store refuses
        # (a disk's failure, not the agent's: the start waits and counts nothing).
        created = [cid for cid in rig.calls("create") if cid]
        assert created
        record = rig.record("echo")
        assert (record.state, record.container_id, record.restart_count) == (
            AgentState.STARTING,
            None,
            0,
        )
        # Given up (the agent is stopped), that container goes.
        await rig.sup.request("echo", ev.StopRequested("test"))
        await starting
        await advance_until(
            rig.clock,
            lambda: set(created) <= set(rig.calls("remove")),
            step=0.05,
            what="the unrecorded container removed",
        )
        for cid in created:
            assert not await _exists(rig.runtime, cid)
        assert rig.record("echo").container_id is None


async def test_missing_image_fails_terminally_without_restarts_when_it_cannot_be_pulled(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[], clock=clock.now)  # nothing present, nothing pullable
    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        with pytest.raises(errors.ContainerError) as caught:
            await rig.start("echo")
        assert IMAGE in str(caught.value)
        record = await rig.reaches("echo", S.FAILED)
        assert IMAGE in record.last_error
        assert record.restart_count == 0
        await rig.clock.advance(4096)
        assert rig.record("echo").state is S.FAILED
        assert rig.calls("ensure_image") == [IMAGE]  # tried once: retrying cannot help
        # The one create that found the image absent (a start creates first and pulls
        # only then); none after the pull failed.
        assert rig.calls("create") == [""]
        await _wait_notice(rig, "agent.failed")
        assert len(rig.notifier.of_kind("agent.failed")) == 1


# -- shutdown and adoption -------------------------------------------------------------


async def test_shutdown_stops_containers_and_records_no_crash_when_not_leaving_them_running(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    runtime.stop_exit_code = 143
    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        first = await rig.start("echo")
    assert first.container_id is not None
    assert not (await runtime.inspect(first.container_id)).running
    assert ("stop", first.container_id) in runtime.calls

    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = rig.record("echo")
        assert record.state is S.STOPPED
        assert record.restart_count == 0
        assert record.container_id == first.container_id  # kept for the next wake
        assert "crashed" not in await rig.to_states("echo")
        woken = await rig.start("echo")
        assert woken.container_id == first.container_id
        assert len(rig.calls("create")) == 1


async def test_running_containers_are_adopted_with_same_ids_when_left_running_at_shutdown(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    agents = {"alpha": {"image": IMAGE}, "beta": {"image": IMAGE}}
    idle = {"idle_mark_after": 16, "idle_timeout": 64}
    async with open_rig(
        tmp_path,
        runtime=runtime,
        clock=clock,
        agents=agents,
        defaults=idle,
        docker={"leave_running": True},
    ) as rig:
        ids = {name: (await rig.start(name)).container_id for name in agents}
    for cid in ids.values():
        assert cid is not None
        assert (await runtime.inspect(cid)).running
    starts = len([c for c in runtime.calls if c[0] in ("create", "start")])

    async with open_rig(
        tmp_path, runtime=runtime, clock=clock, agents=agents, defaults=idle
    ) as rig:
        for name, cid in ids.items():
            record = rig.record(name)
            assert record.state is S.RUNNING, name
            assert record.container_id == cid, "adopted, not recreated"
            assert record.restart_count == 0
            assert (await rig.to_states(name)).count("starting") == 1
        assert len([c for c in runtime.calls if c[0] in ("create", "start")]) == starts
        # an adopted agent is supervised like any other: crashes and idling are seen
        alpha = ids["alpha"]
        assert alpha is not None
        runtime.crash(alpha, exit_code=1)
        await rig.reaches("alpha", S.RESTARTING)
        await rig.clock.advance(16)
        await rig.reaches("beta", S.IDLE)


async def test_paused_container_stays_paused_when_adopted_after_leave_running(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    async with open_rig(
        tmp_path, runtime=runtime, clock=clock, docker={"leave_running": True}
    ) as rig:
        first = await rig.start("echo")
        await rig.sup.request("echo", ev.PauseRequested())
    assert first.container_id is not None
    assert (await runtime.inspect(first.container_id)).paused

    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = rig.record("echo")
        assert record.state is S.PAUSED
        assert record.container_id == first.container_id
        assert (await runtime.inspect(first.container_id)).paused
        woken = await rig.start("echo")
        assert woken.container_id == first.container_id
        assert rig.calls("unpause") == [first.container_id]


async def test_pending_restart_happens_when_roost_restarted_during_the_backoff(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = FakeRuntime(images=[IMAGE], clock=clock.now)
    async with open_rig(
        tmp_path, runtime=runtime, clock=clock, docker={"leave_running": True}
    ) as rig:
        first = await rig.start("echo")
        assert first.container_id is not None
        runtime.crash(first.container_id, exit_code=1)
        waiting = await rig.reaches("echo", S.RESTARTING)
    assert waiting.restart_at is not None

    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        assert rig.record("echo").state is S.RESTARTING
        await rig.clock.advance(8)
        again = await rig.reaches("echo", S.RUNNING)
        assert again.container_id not in (None, first.container_id)
        assert again.restart_count == 1


class GapOnCreateRuntime(FakeRuntime):
    """A FakeRuntime whose event stream reconnects right after a container is created,
    so a reconcile lists the container while the start that created it is in flight."""

    async def create(self, spec: ContainerSpec) -> str:
        container_id = await super().create(spec)
        self.emit_gap()
        return container_id


async def test_reconcile_keeps_the_new_container_when_a_start_is_in_flight(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = GapOnCreateRuntime(images=[IMAGE], clock=clock.now)
    async with open_rig(tmp_path, runtime=runtime, clock=clock) as rig:
        record = await rig.start("echo")
        await wait_until(
            lambda: rig.sup.reconciles == 2, timeout=ACT_TIMEOUT, interval=0.001, what="reconcile"
        )
        assert record.restart_count == 0
        assert len(rig.calls("create")) == 1
        assert not rig.calls("remove")
        assert "crashed" not in await rig.to_states("echo")
