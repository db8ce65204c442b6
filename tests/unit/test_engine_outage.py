"""The engine's and the disk's bad days, on fakes and fake time: an unreachable Docker
engine is not an agent failure, and a state write that fails is retried, never dropped.

The same scenarios run against a real second dockerd that is stopped and restarted
in the fault suite (tests/faults, ``make faults``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from roost import errors
from roost.core import events as ev
from roost.core.records import AgentRecord, ExitInfo, StateChange
from roost.core.states import AgentState
from roost.ports.runtime import ContainerInfo
from tests.support import ScriptedAgent, advance_until, open_rig

S = AgentState


def notices(rig: Any, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = rig.notifier.of_kind(kind)
    return found


async def test_start_waits_for_the_engine_uncounted_and_runs_when_it_comes_back(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"max_restarts": 0}) as rig:
        rig.runtime.go_down()
        await rig.sup.request("echo", ev.StartRequested("test"))
        waiting = await rig.reaches("echo", S.RESTARTING)
        assert waiting.restart_at is None
        assert waiting.restart_count == 0
        assert waiting.last_error.startswith("engine unavailable")
        # Time passes: a waiting start has no deadline, and max_restarts 0 is not used up.
        await rig.clock.advance(600)
        assert rig.record("echo").state is S.RESTARTING
        assert notices(rig, "agent.failed") == []
        assert len(notices(rig, "engine.unavailable")) == 1

        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.1)
        assert rig.record("echo").restart_count == 0
        await advance_until(rig.clock, lambda: bool(notices(rig, "engine.recovered")), step=0.1)
        assert len(notices(rig, "engine.recovered")) == 1
        assert len(notices(rig, "engine.unavailable")) == 1


async def test_exits_when_the_daemon_stops_are_blamed_on_it_and_agents_come_back_uncounted(
    tmp_path: Path,
) -> None:
    agents = {"one": {"image": "roost-mimic:latest"}, "two": {"image": "roost-mimic:latest"}}
    async with open_rig(
        tmp_path, agents=agents, defaults={"max_restarts": 0, "restart_backoff": 0}
    ) as rig:
        for name in agents:
            await rig.start(name)
        # A daemon stop without live-restore: every container dies, then the stream is lost.
        rig.runtime.go_down(kill_containers=True, exit_code=143)
        for name in agents:
            await rig.until(
                name,
                lambda r: r.state is S.RESTARTING and r.restart_at is None,
                "waiting for the engine",
            )
        assert notices(rig, "agent.failed") == []
        rig.runtime.come_back()
        for name in agents:

            def running(n: str = name) -> bool:
                return rig.record(n).state is S.RUNNING

            await advance_until(rig.clock, running, step=0.1, what=name)
            assert rig.record(name).restart_count == 0
        assert notices(rig, "agent.failed") == []
        assert len(notices(rig, "engine.unavailable")) == 1


async def test_an_exit_while_the_engine_is_stopping_never_fails_the_agent_when_restarts_are_used_up(
    tmp_path: Path,
) -> None:
    # dockerd stops accepting connections first, then stops its containers (SIGKILL
    # after their stop timeout: exit 137) while it still answers on open connections:
    # the inspect before giving up works, only a new connection tells it is going.
    async with open_rig(tmp_path, defaults={"max_restarts": 0, "restart_backoff": 0}) as rig:
        started = await rig.start("echo")
        assert started.container_id is not None
        rig.runtime.begin_stopping()
        rig.runtime.crash(started.container_id, exit_code=137)
        waiting = await rig.until(
            "echo",
            lambda r: r.state is S.RESTARTING and r.restart_at is None,
            "waiting for the engine",
        )
        assert waiting.restart_count == 0
        assert notices(rig, "agent.failed") == []
        rig.runtime.go_down()
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.1)
        assert rig.record("echo").restart_count == 0
        assert notices(rig, "agent.failed") == []
        assert len(notices(rig, "engine.unavailable")) == 1


async def test_exits_after_the_engine_was_found_stopping_are_its_doing_and_cost_no_restart(
    tmp_path: Path,
) -> None:
    agents = {"one": {"image": "roost-mimic:latest"}, "two": {"image": "roost-mimic:latest"}}
    async with open_rig(
        tmp_path, agents=agents, defaults={"max_restarts": 1, "restart_backoff": 0}
    ) as rig:
        one = await rig.start("one")
        two = await rig.start("two")
        assert one.container_id is not None
        assert two.container_id is not None
        rig.runtime.begin_stopping()
        # One crash restarts at once; that start fails (500), and the engine, asked
        # on a new connection, is found going: the start waits for it.
        rig.runtime.crash(one.container_id, exit_code=137)
        await advance_until(rig.clock, lambda: rig.engine.health.holds("engine"), step=0.1)
        # Later exits come from the stopping engine (it still streams its events).
        rig.runtime.crash(two.container_id, exit_code=137)
        for name in agents:
            await rig.until(
                name,
                lambda r: r.state is S.RESTARTING and r.restart_at is None,
                "waiting for the engine",
            )
        rig.runtime.go_down()
        rig.runtime.come_back()
        for name in agents:

            def running(n: str = name) -> bool:
                return rig.record(n).state is S.RUNNING

            await advance_until(rig.clock, running, step=0.1, what=name)
            assert rig.record(name).restart_count == 0, name
        assert notices(rig, "agent.failed") == []


async def test_running_agent_keeps_its_container_when_the_engine_restarts_with_live_restore(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        before = await rig.start("echo")
        creates = len(rig.calls("create"))
        rig.runtime.go_down()  # live-restore: containers keep running
        await advance_until(rig.clock, lambda: rig.engine.health.holds("engine"), step=0.1)
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: not rig.engine.health.holds("engine"), step=0.1)
        after = await rig.until("echo", lambda r: r.state is S.RUNNING, "still running")
        assert after.container_id == before.container_id
        assert after.restart_count == 0
        assert len(rig.calls("create")) == creates


async def test_failed_liveness_probes_while_the_engine_is_down_cost_no_restart_when_it_returns(
    tmp_path: Path,
) -> None:
    # Live-restore: the container runs on, but probes go through the engine's port
    # proxy, which is down with it.
    async with open_rig(
        tmp_path, defaults={"liveness_interval": 1, "liveness_failures": 2, "max_restarts": 0}
    ) as rig:
        before = await rig.start("echo")
        rig.runtime.go_down()
        rig.client.refusing = True
        probes = rig.client.probes
        await advance_until(rig.clock, lambda: rig.client.probes >= probes + 5, step=0.25)
        assert rig.record("echo").state is S.RUNNING
        assert rig.record("echo").container_id == before.container_id
        rig.runtime.come_back()
        rig.client.refusing = False
        await advance_until(rig.clock, lambda: not rig.engine.health.holds("engine"), step=0.1)
        probes = rig.client.probes
        await advance_until(rig.clock, lambda: rig.client.probes >= probes + 3, step=0.25)
        after = rig.record("echo")
        assert after.state is S.RUNNING
        assert after.container_id == before.container_id
        assert after.restart_count == 0
        assert notices(rig, "agent.failed") == []


async def test_messages_stay_queued_through_an_outage_and_are_delivered_in_order_after(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"max_restarts": 0}) as rig:
        agent = ScriptedAgent(rig.runtime)
        rig.engine.dispatcher.agent_client = agent
        rig.runtime.go_down()
        sent = [
            (await rig.engine.dispatcher.submit("echo", json.dumps({"i": i}).encode()))[0]
            for i in range(5)
        ]
        await rig.reaches("echo", S.RESTARTING)
        await rig.clock.advance(120)
        for message in sent:
            stored = await rig.engine.inbox.get("echo", message.id)
            assert stored is not None
            assert stored.status.value in ("queued", "delivering")
        rig.runtime.come_back()
        await advance_until(
            rig.clock, lambda: rig.engine.inbox.pending_count("echo") == 0, step=0.1
        )
        assert [body["i"] for _, body in agent.deliveries] == [0, 1, 2, 3, 4]


async def test_a_failed_state_write_is_retried_until_stored_and_the_store_announced_once(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        store = rig.engine.store
        real_update = store.update_agent
        failures = {"left": 5}

        async def flaky_update(
            record: AgentRecord,
            *,
            changes: Sequence[StateChange] = (),
            exit: ExitInfo | None = None,
        ) -> AgentRecord:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise errors.StorageFull("state database: database or disk is full")
            return await real_update(record, changes=changes, exit=exit)

        store.update_agent = flaky_update  # type: ignore[method-assign]
        starting = asyncio.ensure_future(rig.sup.request("echo", ev.StartRequested("test")))
        await advance_until(rig.clock, lambda: rig.engine.health.holds("store"), step=0.01)
        # Not moved past what is stored: the record is still as it was.
        assert rig.record("echo").state is S.CREATED
        assert rig.engine.agents.describe("echo")["degraded"] is not None
        await advance_until(rig.clock, starting.done, step=0.5)
        assert failures["left"] == 0
        await rig.reaches("echo", S.RUNNING)
        assert rig.engine.agents.describe("echo")["degraded"] is None
        assert not rig.engine.health.holds("store")
        assert len(notices(rig, "store.degraded")) == 1
        assert len(notices(rig, "store.recovered")) == 1
        stored = await store.get_agent("echo")
        assert stored is not None
        assert stored.record.state is S.RUNNING


async def test_a_start_waits_while_its_token_cannot_be_stored_and_counts_no_failure(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"max_restarts": 0}) as rig:
        credentials = rig.engine.credentials
        real_install = credentials.install
        failures = {"left": 5}

        async def flaky_install(agent: str, token: str) -> None:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise errors.StorageFull("state database: database or disk is full")
            await real_install(agent, token)

        credentials.install = flaky_install  # type: ignore[method-assign]
        starting = asyncio.ensure_future(rig.sup.request("echo", ev.StartRequested("test")))
        await advance_until(rig.clock, lambda: rig.engine.health.holds("store"), step=0.01)
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.5)
        await starting
        assert failures["left"] == 0
        assert rig.record("echo").restart_count == 0
        assert not rig.record("echo").last_error
        assert not rig.engine.health.holds("store")
        assert len(notices(rig, "store.degraded")) == 1


async def test_waiting_starts_are_released_when_the_engine_refuses_to_remove_an_orphan_after_it(
    tmp_path: Path,
) -> None:
    # Seen against a real daemon restart: `docker rm -f` of an old container failed
    # (500), which ended the recovery before it released the waiting agents.
    async with open_rig(tmp_path, defaults={"max_restarts": 0, "restart_backoff": 0}) as rig:
        started = await rig.start("echo")
        old = started.container_id
        assert old is not None
        rig.runtime.go_down(kill_containers=True, exit_code=0)
        await rig.until(
            "echo",
            lambda r: r.state is S.RESTARTING and r.restart_at is None,
            "waiting for the engine",
        )
        real_remove = rig.runtime.remove

        async def refusing_remove(container_id: str, *, force: bool = False) -> None:
            if container_id == old:
                raise errors.ContainerError(
                    f"cannot remove container {old}: driver failed to remove its root file system",
                    status=500,
                )
            await real_remove(container_id, force=force)

        rig.runtime.remove = refusing_remove  # type: ignore[method-assign]
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.1)
        assert rig.record("echo").container_id != old
        assert rig.record("echo").restart_count == 0


async def test_agents_recover_when_the_engine_goes_down_again_during_the_recovery_reconcile(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path, defaults={"max_restarts": 0, "restart_backoff": 0}) as rig:
        await rig.start("echo")
        rig.runtime.go_down(kill_containers=True, exit_code=0)
        await rig.until(
            "echo",
            lambda r: r.state is S.RESTARTING and r.restart_at is None,
            "waiting for the engine",
        )
        real_list = rig.runtime.list
        lists = {"refused": 0}

        async def list_once_refused(labels: Mapping[str, str]) -> list[ContainerInfo]:
            if lists["refused"] == 0:
                lists["refused"] += 1
                rig.runtime.go_down()  # gone again while the recovery reconciles
                raise errors.DockerUnavailable("Docker engine is not reachable")
            return await real_list(labels)

        rig.runtime.list = list_once_refused  # type: ignore[method-assign]
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: lists["refused"] == 1, step=0.1)
        assert rig.engine.health.holds("engine")
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.1)
        assert not rig.engine.health.holds("engine")
        assert rig.record("echo").restart_count == 0


async def test_the_job_orphan_scan_logs_no_warning_per_interval_when_the_engine_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_rig(tmp_path) as rig:
        rig.runtime.go_down()
        await advance_until(rig.clock, lambda: rig.engine.health.holds("engine"), step=0.1)
        with caplog.at_level(logging.DEBUG, logger="roost.jobs"):
            await rig.clock.advance(600)  # ten orphan scans (every 60 s by default)
        skipped = [r for r in caplog.records if r.name == "roost.jobs"]
        assert skipped, "no orphan scan ran"
        assert all(r.levelno == logging.DEBUG for r in skipped), [r.getMessage() for r in skipped]
        rig.runtime.come_back()


async def test_an_agent_whose_exit_the_stream_never_told_restarts_uncounted_after_the_outage(
    tmp_path: Path,
) -> None:
    # The container ended after the daemon's event stream broke (no die): the
    # reconcile after the outage finds it exited, and that is the engine's doing.
    async with open_rig(tmp_path, defaults={"max_restarts": 0, "restart_backoff": 0}) as rig:
        before = await rig.start("echo")
        rig.runtime.go_down(kill_containers=True, exit_code=0, unseen=True)
        await advance_until(rig.clock, lambda: rig.engine.health.holds("engine"), step=0.1)
        assert rig.record("echo").state is S.RUNNING  # nothing told it otherwise
        rig.runtime.come_back()
        await advance_until(
            rig.clock,
            lambda: (
                rig.record("echo").state is S.RUNNING
                and rig.record("echo").container_id != before.container_id
            ),
            step=0.1,
        )
        assert rig.record("echo").restart_count == 0
        assert notices(rig, "agent.failed") == []


async def test_a_clean_exit_while_the_engine_stops_is_blamed_on_it_before_a_wake_restarts_it(
    tmp_path: Path,
) -> None:
    async with open_rig(tmp_path) as rig:
        started = await rig.start("echo")
        assert started.container_id is not None
        rig.runtime.begin_stopping()
        rig.runtime.crash(started.container_id, exit_code=0)  # the daemon's SIGTERM
        waiting = await rig.until(
            "echo",
            lambda r: r.state is S.RESTARTING and r.restart_at is None,
            "waiting for the engine",
        )
        assert waiting.restart_count == 0
        starts = len(rig.calls("start"))
        await rig.sup.request("echo", ev.StartRequested("a message for it"))
        assert rig.record("echo").state is S.RESTARTING  # merged: no start meanwhile
        assert len(rig.calls("start")) == starts
        rig.runtime.go_down()
        rig.runtime.come_back()
        await advance_until(rig.clock, lambda: rig.record("echo").state is S.RUNNING, step=0.1)
        assert rig.record("echo").restart_count == 0
