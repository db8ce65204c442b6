"""Test doubles shipped with Roost, so users can test code built on it without Docker.

- ``FakeRuntime``: an in-memory ``ContainerRuntime`` that passes the same
  contract tests as ``DockerRuntime`` (it does not lie).
- ``FakeAgentClient``: answers probes for containers the fake runtime runs.
- ``FakeClock``: time moves only when a test advances it.
- ``EngineHarness``: an engine on those fakes with Roost's whole HTTP surface
  (``roost.edge``) and an in-process ``httpx`` client.
"""

from __future__ import annotations

from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime
from roost.testing.harness import EngineHarness

__all__ = ["EngineHarness", "FakeAgentClient", "FakeClock", "FakeRuntime"]
