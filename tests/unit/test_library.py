"""``ContainerManager`` and ``AsyncContainerManager`` on a FakeRuntime engine (no
Docker): the replaced code's semantics, exit counting, clean-up, and the sync face
from scripts, threads and running event loops. Real Docker: tests/integration."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import roost
from roost import errors
from roost.config import validate_agent_name
from roost.core import labels
from roost.core.records import SessionHealth
from roost.core.states import AgentState
from roost.library import AsyncContainerManager, ContainerManager, agent_name_for
from roost.library.loop_thread import LoopThread
from roost.ports.runtime import ContainerSpec, RuntimeEvent
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import wait_until
from tests.unit.library_fakes import IMAGE, FakeAsyncManager, FakeManager, skip_docker_check


class GatedEventsRuntime(FakeRuntime):
    """FakeRuntime whose event stream can be held back (``gate``), to decide whether
    Docker's ``die`` reaches Roost before or after a caller reports the exit."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gate = asyncio.Event()
        self.gate.set()
        self.released: list[RuntimeEvent] = []

    def events(self, labels: Any, **options: Any) -> AsyncIterator[RuntimeEvent]:
        return self._gated(super().events(labels, **options))

    async def _gated(self, stream: AsyncIterator[RuntimeEvent]) -> AsyncIterator[RuntimeEvent]:
        async for event in stream:
            await self.gate.wait()
            self.released.append(event)
            yield event


@pytest.fixture(autouse=True)
def _no_docker_check(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_docker_check(monkeypatch)


@pytest.fixture
def runtime() -> GatedEventsRuntime:
    return GatedEventsRuntime(images=[IMAGE])


@pytest.fixture
async def manager(runtime: FakeRuntime) -> AsyncIterator[FakeAsyncManager]:
    made = FakeAsyncManager(runtime)
    yield made
    await made.stop_all()


def _name(agent_type: str) -> str:
    return agent_name_for(agent_type)


async def _creates(runtime: FakeRuntime) -> int:
    return sum(1 for method, _ in runtime.calls if method == "create")


# -- the public surface ------------------------------------------------------------


def test_the_public_names_are_the_sync_classes_and_their_async_twins() -> None:
    # __all__ itself is pinned in test_public_api.
    assert roost.ContainerManager is ContainerManager
    assert roost.AsyncContainerManager is AsyncContainerManager


@pytest.mark.parametrize("agent_type", ["issue-triage", "echo", "a1"])
def test_agent_name_is_the_agent_type_when_it_is_a_dns_label(agent_type: str) -> None:
    assert agent_name_for(agent_type) == agent_type


@pytest.mark.parametrize(
    ("agent_type", "slug"),
    [
        ("Echo", "echo"),
        ("code_agent", "code-agent"),
        ("Issue Triage!", "issue-triage"),
        ("", "agent"),
        ("!!!", "agent"),
        ("Ünïcode Agent", "n-code-agent"),
    ],
)
def test_agent_name_is_a_slug_and_a_hash_when_the_agent_type_is_no_dns_label(
    agent_type: str, slug: str
) -> None:
    name = agent_name_for(agent_type)

    assert validate_agent_name(name) == name
    assert re.fullmatch(rf"{slug}-[0-9a-f]{{8}}", name)


def test_agent_names_differ_when_types_differ_only_in_spelling() -> None:
    names = {agent_name_for(t) for t in ("code-agent", "Code-Agent", "code_agent", "code agent")}
    assert len(names) == 4
    assert len(agent_name_for("x" * 200)) <= 63


def test_defaults_follow_the_replaced_code_when_nothing_is_given(runtime: FakeRuntime) -> None:
    defaults = FakeAsyncManager(runtime).settings.defaults
    assert (defaults.max_restarts, defaults.restart_backoff) == (1, 0.0)
    assert (defaults.port, defaults.host_ip, defaults.health_path) == (8000, "127.0.0.1", "/health")
    assert defaults.idle_timeout == 0.0

    changed = FakeAsyncManager(runtime, max_restarts=3, restart_backoff=2.5).settings.defaults
    assert (changed.max_restarts, changed.restart_backoff) == (3, 2.5)


def test_construction_raises_container_error_when_docker_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the real check
    with pytest.raises(roost.ContainerError, match="not reachable"):
        ContainerManager(docker_host=f"unix://{tmp_path}/no-docker.sock")


# -- start_agent ---------------------------------------------------------------------


async def test_start_agent_publishes_container_port_on_the_host_port_when_port_given(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    url = await manager.start_agent("issue-triage", image=IMAGE, port=9001)

    assert url == "http://localhost:9001"
    engine = manager.engine
    assert engine is not None
    record = engine.agents.get("issue-triage")
    assert record.container_id is not None
    spec = runtime.container_spec(record.container_id)
    assert (spec.port, spec.host_port, spec.publish_host) == (8000, 9001, "127.0.0.1")
    assert manager.health("issue-triage") is SessionHealth.HEALTHY
    assert manager.url("issue-triage") == url


async def test_start_agent_keeps_a_random_host_port_when_port_is_none(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    url = await manager.start_agent("worker", image=IMAGE, port=None)

    engine = manager.engine
    assert engine is not None
    cid = engine.agents.get("worker").container_id
    assert cid is not None
    state = await runtime.inspect(cid)
    assert runtime.container_spec(cid).host_port is None
    assert url == f"http://localhost:{state.host_port}"


async def test_start_agent_uses_container_port_and_bind_when_options_say_so(
    runtime: FakeRuntime,
) -> None:
    async with FakeAsyncManager(runtime, container_port=9000, bind="192.0.2.7") as manager:
        url = await manager.start_agent("a", image=IMAGE, port=9002)
        assert url == "http://192.0.2.7:9002"
        engine = manager.engine
        assert engine is not None
        cid = engine.agents.get("a").container_id
        assert cid is not None
        spec = runtime.container_spec(cid)
        assert (spec.port, spec.host_port, spec.publish_host) == (9000, 9002, "192.0.2.7")


async def test_start_agent_accepts_any_agent_type_when_it_is_no_dns_label(
    manager: FakeAsyncManager,
) -> None:
    one = await manager.start_agent("Code Agent #1", image=IMAGE)
    two = await manager.start_agent("code-agent-1", image=IMAGE)

    assert one != two
    assert manager.state("Code Agent #1") is AgentState.RUNNING
    engine = manager.engine
    assert engine is not None
    assert sorted(engine.agents.names()) == sorted([_name("Code Agent #1"), "code-agent-1"])


async def test_start_agent_reuses_the_running_agent_when_called_again(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    url = await manager.start_agent("a", image=IMAGE, port=9001)
    creates = await _creates(runtime)

    assert await manager.start_agent("a", image=IMAGE, port=9001) == url
    assert await _creates(runtime) == creates


async def test_start_agent_moves_the_agent_when_called_with_another_port(
    manager: FakeAsyncManager,
) -> None:
    await manager.start_agent("a", image=IMAGE, port=9001)

    url = await manager.start_agent("a", image=IMAGE, port=9002)

    assert url == "http://localhost:9002"
    assert manager.url("a") == url


async def test_start_agent_raises_container_error_naming_the_port_when_it_is_taken(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    squatter = await runtime.create(
        ContainerSpec(image=IMAGE, labels={"someone": "else"}, port=80, host_port=9001)
    )
    await runtime.start(squatter)

    with pytest.raises(errors.ContainerError, match=r"127\.0\.0\.1:9001 is already in use"):
        await manager.start_agent("a", image=IMAGE, port=9001)

    # Nothing keeps running or retrying behind the failed start.
    assert manager.state("a") in (AgentState.STOPPED, AgentState.FAILED)
    mine = await runtime.list({"roost.instance": manager.instance})
    assert [c.status for c in mine if c.status != "created"] == []


async def test_start_agent_starts_a_failed_agent_again_when_called(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    await manager.start_agent("a", image=IMAGE, port=9001)
    for _ in range(2):  # one restart, then failed
        engine = manager.engine
        assert engine is not None
        cid = engine.agents.get("a").container_id
        assert cid is not None
        runtime.crash(cid)
        await manager.handle_container_exit("a", image=IMAGE, port=9001)
    assert manager.state("a") is AgentState.FAILED

    assert await manager.start_agent("a", image=IMAGE, port=9001) == "http://localhost:9001"
    assert manager.health("a") is SessionHealth.HEALTHY


# -- handle_container_exit -------------------------------------------------------------


async def _running_container(manager: FakeAsyncManager, agent_type: str) -> str:
    engine = manager.engine
    assert engine is not None
    record = engine.agents.get(_name(agent_type))
    assert record.container_id is not None
    return record.container_id


async def test_exit_is_counted_once_when_the_die_event_arrives_before_the_call(
    manager: FakeAsyncManager, runtime: GatedEventsRuntime
) -> None:
    url = await manager.start_agent("a", image=IMAGE, port=9001)
    first = await _running_container(manager, "a")

    runtime.crash(first)
    await wait_until(
        lambda: any(e.kind == "die" and e.container_id == first for e in runtime.released),
        what="the die event to reach Roost",
    )
    await manager.handle_container_exit("a", image=IMAGE, port=9001)

    engine = manager.engine
    assert engine is not None
    record = engine.agents.get("a")
    assert record.state is AgentState.RUNNING
    assert record.restart_count == 1
    assert manager.url("a") == url
    assert await _running_container(manager, "a") != first


async def test_exit_is_counted_once_when_the_die_event_arrives_after_the_call(
    manager: FakeAsyncManager, runtime: GatedEventsRuntime
) -> None:
    url = await manager.start_agent("a", image=IMAGE, port=9001)
    first = await _running_container(manager, "a")
    runtime.gate.clear()  # Docker's events are late

    runtime.crash(first)
    await manager.handle_container_exit("a", image=IMAGE, port=9001)
    runtime.gate.set()
    await wait_until(
        lambda: any(e.kind == "die" and e.container_id == first for e in runtime.released),
        what="the late die event to reach Roost",
    )

    engine = manager.engine
    assert engine is not None
    # Queued behind the late die event: once this is decided, so is the die.
    await engine.agents.act("a", "start")
    record = engine.agents.get("a")
    assert record.state is AgentState.RUNNING
    assert record.restart_count == 1
    assert manager.url("a") == url
    second = await _running_container(manager, "a")
    assert second != first
    assert (await runtime.inspect(second)).running


async def test_handle_container_exit_logs_critical_and_starts_nothing_when_limit_is_used(
    manager: FakeAsyncManager, runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    await manager.start_agent("a", image=IMAGE, port=9001)
    runtime.crash(await _running_container(manager, "a"))
    await manager.handle_container_exit("a", image=IMAGE, port=9001)
    second = await _running_container(manager, "a")
    creates = await _creates(runtime)

    runtime.crash(second)
    with caplog.at_level(logging.CRITICAL, logger="roost.library"):
        await manager.handle_container_exit("a", image=IMAGE, port=9001)  # returns None
        await manager.handle_container_exit("a", image=IMAGE, port=9001)  # returns None

    assert manager.state("a") is AgentState.FAILED
    assert manager.health("a") is SessionHealth.UNHEALTHY
    assert await _creates(runtime) == creates
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 2
    assert "'a' failed permanently after 1 restart(s)" in critical[0].getMessage()
    exit_info = manager.exit_info("a")
    assert exit_info is not None
    assert exit_info.exit_code == 1


async def test_handle_container_exit_starts_the_agent_when_it_exited_cleanly(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    await manager.start_agent("a", image=IMAGE, port=9001)
    runtime.crash(await _running_container(manager, "a"), exit_code=0)
    engine = manager.engine
    assert engine is not None
    await engine.agents.observe("a")
    assert manager.state("a") is AgentState.STOPPED

    await manager.handle_container_exit("a", image=IMAGE, port=9001)

    assert manager.url("a") == "http://localhost:9001"
    assert engine.agents.get("a").restart_count == 0


async def test_handle_container_exit_starts_the_agent_when_it_was_never_started(
    manager: FakeAsyncManager,
) -> None:
    await manager.handle_container_exit("fresh", image=IMAGE, port=9003)

    assert manager.url("fresh") == "http://localhost:9003"


# -- stop_all ---------------------------------------------------------------------


async def test_stop_all_leaves_nothing_behind_and_is_idempotent(
    runtime: FakeRuntime,
) -> None:
    manager = FakeAsyncManager(runtime)
    await manager.start_agent("a", image=IMAGE, port=9001)
    await manager.start_agent("b", image=IMAGE)
    engine = manager.engine
    assert engine is not None
    state_dir = engine.settings.state_path()
    assert state_dir.is_dir()

    await manager.stop_all()
    await manager.stop_all()

    assert await runtime.list({"roost.instance": manager.instance}) == []
    assert not state_dir.exists()
    assert manager.engine is None
    assert manager.health("a") is SessionHealth.UNKNOWN


async def test_stop_all_removes_a_container_no_agent_recorded_when_a_start_was_cut_short(
    manager: FakeAsyncManager, runtime: FakeRuntime
) -> None:
    await manager.start_agent("a", image=IMAGE)
    # What a start cancelled between create and its report leaves: labelled, unrecorded.
    stray = await runtime.create(
        ContainerSpec(image=IMAGE, labels=labels.agent_labels(manager.instance, "a", "h"))
    )
    foreign = await runtime.create(
        ContainerSpec(image=IMAGE, labels=labels.agent_labels("someone-else", "a", "h"))
    )

    await manager.stop_all()

    assert [c.id for c in await runtime.list({})] == [foreign]
    assert stray != foreign


async def test_stop_all_keeps_a_state_dir_the_caller_gave(
    tmp_path: Path, runtime: FakeRuntime
) -> None:
    async with FakeAsyncManager(runtime, state_dir=tmp_path / "mine") as manager:
        await manager.start_agent("a", image=IMAGE)

    assert (tmp_path / "mine").is_dir()


async def test_start_agent_works_again_when_called_after_stop_all(
    manager: FakeAsyncManager,
) -> None:
    await manager.start_agent("a", image=IMAGE, port=9001)
    await manager.stop_all()

    assert await manager.start_agent("a", image=IMAGE, port=9001) == "http://localhost:9001"


# -- the sync face -----------------------------------------------------------------


def _loop_threads(instance: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"roost-{instance}"]


@pytest.fixture
def sync_manager(runtime: FakeRuntime) -> Iterator[FakeManager]:
    made = FakeManager(runtime)
    yield made
    made.stop_all()


def test_sync_manager_runs_the_replaced_codes_calls_when_used_from_a_script(
    sync_manager: FakeManager, runtime: FakeRuntime
) -> None:
    assert _loop_threads(sync_manager.instance) == []  # started on first use

    url = sync_manager.start_agent("issue-triage", image=IMAGE, port=9001)
    assert url == "http://localhost:9001"
    assert len(_loop_threads(sync_manager.instance)) == 1
    cid = sync_manager.core.engine.agents.get("issue-triage").container_id  # type: ignore[union-attr]
    assert cid is not None
    runtime.crash(cid)
    sync_manager.handle_container_exit("issue-triage", image=IMAGE, port=9001)  # returns None
    assert sync_manager.health("issue-triage") is SessionHealth.HEALTHY
    assert sync_manager.url("issue-triage") == url

    sync_manager.stop_all()
    sync_manager.stop_all()
    assert _loop_threads(sync_manager.instance) == []
    assert asyncio.run(runtime.list({"roost.instance": sync_manager.instance})) == []
    assert sync_manager.health("issue-triage") is SessionHealth.UNKNOWN


def test_sync_manager_stops_everything_when_its_with_block_ends(runtime: FakeRuntime) -> None:
    with FakeManager(runtime) as manager:
        manager.start_agent("a", image=IMAGE, port=9001)
        instance = manager.instance

    assert _loop_threads(instance) == []
    assert asyncio.run(runtime.list({"roost.instance": instance})) == []


def test_sync_manager_serves_every_thread_when_called_from_several_at_once(
    sync_manager: FakeManager,
) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        urls = list(
            pool.map(
                lambda n: sync_manager.start_agent(f"agent {n}", image=IMAGE, port=9100 + n),
                range(8),
            )
        )

    assert urls == [f"http://localhost:{9100 + n}" for n in range(8)]
    assert len(_loop_threads(sync_manager.instance)) == 1


async def test_sync_manager_works_when_called_inside_a_running_event_loop(
    sync_manager: FakeManager,
) -> None:
    # As from a FastAPI handler or Jupyter: this loop blocks for the call, while the
    # engine runs on its own loop thread, so nothing waits on this one.
    url = sync_manager.start_agent("a", image=IMAGE, port=9001)

    assert url == "http://localhost:9001"
    assert sync_manager.health("a") is SessionHealth.HEALTHY
    sync_manager.stop_all()
    assert _loop_threads(sync_manager.instance) == []


def test_sync_manager_starts_a_new_loop_thread_when_used_after_stop_all(
    sync_manager: FakeManager,
) -> None:
    sync_manager.start_agent("a", image=IMAGE, port=9001)
    first = _loop_threads(sync_manager.instance)
    sync_manager.stop_all()

    assert sync_manager.start_agent("a", image=IMAGE, port=9001) == "http://localhost:9001"

    again = _loop_threads(sync_manager.instance)
    assert len(again) == 1
    assert again != first


# -- the loop thread ----------------------------------------------------------------


def test_loop_thread_raises_instead_of_deadlocking_when_called_from_its_own_loop() -> None:
    loop_thread = LoopThread("roost-test-loop")

    async def reenter() -> None:
        async def nothing() -> None:
            return None

        loop_thread.run(nothing())

    try:
        with pytest.raises(RuntimeError, match="would deadlock"):
            loop_thread.run(reenter())
    finally:
        loop_thread.stop()
    loop_thread.stop()  # idempotent
    assert not loop_thread.running


def test_loop_thread_cancels_unfinished_work_when_stopped() -> None:
    loop_thread = LoopThread("roost-test-loop")
    started = threading.Event()
    cancelled = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(loop_thread.run, forever())
        assert started.wait(5)
        loop_thread.stop()
        with pytest.raises(BaseException):  # noqa: B017, PT011 - concurrent.futures.CancelledError
            pending.result(timeout=5)
    assert cancelled.is_set()
