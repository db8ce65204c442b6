"""The library's classes with their engine on fakes (no Docker): for unit tests.

``FakeAsyncManager``/``FakeAsyncRunner`` are the async cores with ``_new_engine``
building an ``Engine`` on a given ``FakeRuntime`` and ``FakeAgentClient``;
``FakeManager``/``FakeRunner`` are the sync classes wrapping those cores (on their
private loop thread). ``skip_docker_check`` turns off the constructors'
synchronous Docker ping (call it from an autouse fixture).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from roost.config import Settings
from roost.engine import Engine
from roost.library import embedded
from roost.library.containers import AsyncContainerManager, ContainerManager
from roost.library.swarm import AsyncDockerAgentRunner, DockerAgentRunner
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime

IMAGE = "roost-mimic:latest"


def skip_docker_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "check_reachable", lambda host: "unix:///fake.sock")


def _engine_on(runtime: FakeRuntime, settings: Settings) -> Engine:
    return Engine(settings, runtime=runtime, agent_client=FakeAgentClient(runtime))


class FakeAsyncManager(AsyncContainerManager):
    def __init__(self, runtime: FakeRuntime, **options: Any) -> None:
        self.runtime = runtime
        super().__init__(**options)

    def _new_engine(self, settings: Settings) -> Engine:
        return _engine_on(self.runtime, settings)


class FakeManager(ContainerManager):
    def __init__(self, runtime: FakeRuntime, **options: Any) -> None:
        self.runtime = runtime
        super().__init__(**options)

    def _new_core(self, **options: Any) -> AsyncContainerManager:
        return FakeAsyncManager(self.runtime, **options)


class FakeAsyncRunner(AsyncDockerAgentRunner):
    def __init__(self, runtime: FakeRuntime, *args: Any, **options: Any) -> None:
        self.runtime = runtime
        super().__init__(*args, **options)

    def _new_engine(self, settings: Settings) -> Engine:
        return _engine_on(self.runtime, settings)


class FakeRunner(DockerAgentRunner):
    def __init__(self, runtime: FakeRuntime, *args: Any, **options: Any) -> None:
        self.runtime = runtime
        super().__init__(*args, **options)

    def _new_core(
        self,
        image: str,
        coordinator_url: str | None,
        extra_env: Mapping[str, str] | None,
        **options: Any,
    ) -> AsyncDockerAgentRunner:
        return FakeAsyncRunner(self.runtime, image, coordinator_url, extra_env, **options)
