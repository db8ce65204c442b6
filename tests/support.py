"""Helpers shared by several test modules (not tests themselves)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from roost.ports.agent_http import AgentResponse
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_clock import FakeClock
from roost.testing.fake_runtime import FakeRuntime

__all__ = ["ScriptedAgent", "advance_until"]


class ScriptedAgent(FakeAgentClient):
    """Answers deliveries like an agent told what to do by the message body:
    ``{"status": N}`` answers N; ``{"fail_first": N}`` answers 503 N times first.
    While ``down`` every delivery finds no connection."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.deliveries: list[tuple[str, Any]] = []
        self.down = False
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold: asyncio.Event | None = None
        self._failures: dict[str, int] = {}

    async def post_json(
        self, url: str, body: Any, *, headers: Mapping[str, str], timeout: float
    ) -> AgentResponse:
        if self.down or await self._serves(url) is None:
            raise ConnectionError(f"connection refused: {url}")
        message_id = headers["Roost-Message-Id"]
        self.deliveries.append((message_id, body))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            fields = body if isinstance(body, dict) else {}
            if "status" in fields:
                return AgentResponse(fields["status"], {"error": "scripted"})
            if self._failures.get(message_id, 0) < fields.get("fail_first", 0):
                self._failures[message_id] = self._failures.get(message_id, 0) + 1
                return AgentResponse(503, "busy")
            return AgentResponse(200, {"echo": body, "message_id": message_id})
        finally:
            self.in_flight -= 1


async def advance_until(
    clock: FakeClock,
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    step: float = 0.01,
    limit: float = 600.0,
    what: str = "condition",
) -> float:
    """Advance fake time by ``step`` until ``predicate`` holds; return the fake seconds
    it took. Fails naming ``what`` after ``limit`` fake seconds. Real time passes only
    for the loop to run ready tasks (and threads such as the database writer), which
    a bounded number of real yields allows between steps."""
    started = clock.now()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return clock.now() - started
        if clock.now() - started > limit:
            raise AssertionError(f"{what} did not happen within {limit} fake seconds")
        await clock.advance(step)
        await asyncio.sleep(0.001)  # let threads (SQLite writer) finish what they began
