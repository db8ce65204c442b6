"""``serving.serve`` freezes start-up's objects only when it owns the process."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from roost import serving
from roost.engine import Engine
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings

IMAGE = "roost-mimic:latest"


async def _serve_once(tmp_path: Path, *, handle_signals: bool) -> int:
    settings = make_settings(tmp_path, "heap-test", agents={"echo": {"image": IMAGE}})
    runtime = FakeRuntime(images=[IMAGE])
    engine = Engine(settings, runtime=runtime, agent_client=FakeAgentClient(runtime))
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    stop = asyncio.Event()
    stop.set()  # stops as soon as it serves: what matters happened before
    return await serving.serve(
        settings, engine=engine, listen_socket=sock, shutdown=stop, handle_signals=handle_signals
    )


@pytest.mark.parametrize("owns_process", [True, False])
async def test_startup_heap_is_frozen_only_when_serve_owns_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owns_process: bool
) -> None:
    frozen: list[bool] = []
    monkeypatch.setattr(serving, "freeze_startup_heap", lambda: frozen.append(True))
    assert await _serve_once(tmp_path, handle_signals=owns_process) == serving.EXIT_OK
    assert frozen == ([True] if owns_process else [])


def test_freezing_the_heap_exempts_the_objects_alive_now_from_collection() -> None:
    before = gc.get_freeze_count()
    try:
        serving.freeze_startup_heap()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
