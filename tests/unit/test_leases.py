"""Leases: the HTTP routes (httpx ASGI transport) and the idle/expiry behaviour on
fake time, over a FakeRuntime engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import errors
from roost.core.states import AgentState
from roost.reactor.leasing import MAX_TTL, validate_ttl
from roost.testing import EngineHarness
from roost.testing.fake_clock import FakeClock
from tests.conftest import make_settings

IMAGE = "roost-mimic:latest"
TOKEN = "lease-token"
S = AgentState


class Harness:
    def __init__(self, harness: EngineHarness, clock: FakeClock) -> None:
        self.engine = harness.engine
        self.runtime = harness.runtime
        self.client = harness.client
        self.clock = clock

    def state(self, name: str = "echo") -> S:
        return self.engine.agents.get(name).state

    async def take(self, ttl: Any = 60, **extra: Any) -> httpx.Response:
        return await self.client.post("/api/agents/echo/leases", json={"ttl": ttl, **extra})

    async def advance_until_stopped(self, *, step: float = 1.0, limit: float = 60.0) -> float:
        """Advance fake time until the agent stops; return the fake seconds it took."""
        started = self.clock.now()
        while self.state() is not S.STOPPED:
            assert self.clock.now() - started < limit, f"still {self.state()} after {limit}s"
            await self.clock.advance(step)
        return self.clock.now() - started

    def kinds(self) -> list[str]:
        return [e.kind for e in self.engine.events.recent(1000)]


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path, *, token: str | None = None, defaults: dict[str, Any] | None = None
) -> AsyncIterator[Harness]:
    settings = make_settings(
        tmp_path,
        "lease-test",
        agents={"echo": {"image": IMAGE}, "broken": {"image": "roost-nowhere:1"}},
        defaults={"idle_timeout": 10, "liveness_interval": 3600, **(defaults or {})},
    )
    clock = FakeClock()
    async with EngineHarness.running(settings, images=[IMAGE], clock=clock, token=token) as h:
        yield Harness(h, clock)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as running:
        yield running


async def test_post_lease_wakes_agent_and_answers_201_when_agent_created(api: Harness) -> None:
    response = await api.take(ttl=60, holder="planner")
    assert response.status_code == 201, response.text
    lease = response.json()
    assert lease["agent"] == "echo"
    assert lease["holder"] == "planner"
    assert lease["ttl"] == 60
    assert lease["expires_at"] == pytest.approx(api.clock.now() + 60)
    assert isinstance(lease["id"], str)
    assert lease["id"]
    assert api.state() is S.RUNNING
    assert api.engine.supervisor.actor("echo").is_busy
    assert "lease.granted" in api.kinds()


async def test_get_leases_lists_held_ones_when_two_taken(api: Harness) -> None:
    first = (await api.take(ttl=30)).json()
    second = (await api.take(ttl=90, holder="b")).json()
    response = await api.client.get("/api/agents/echo/leases")
    assert response.status_code == 200
    assert [lease["id"] for lease in response.json()["leases"]] == [first["id"], second["id"]]


async def test_delete_lease_releases_it_and_answers_204_when_held(api: Harness) -> None:
    lease = (await api.take()).json()
    response = await api.client.delete(f"/api/agents/echo/leases/{lease['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert not api.engine.supervisor.actor("echo").is_busy
    assert (await api.client.get("/api/agents/echo/leases")).json() == {"leases": []}
    assert "lease.released" in api.kinds()
    again = await api.client.delete(f"/api/agents/echo/leases/{lease['id']}")
    assert again.status_code == 404
    assert again.json()["agent"] == "echo"


async def test_delete_lease_answers_404_when_lease_unknown(api: Harness) -> None:
    response = await api.client.delete("/api/agents/echo/leases/nope")
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


@pytest.mark.parametrize(
    "ttl", [0, -1, "60", "abc", None, True, MAX_TTL + 1, float("inf")], ids=repr
)
async def test_post_lease_answers_422_naming_ttl_when_ttl_invalid(api: Harness, ttl: Any) -> None:
    if ttl == float("inf"):
        response = await api.client.post(
            "/api/agents/echo/leases",
            content=b'{"ttl": 1e999}',
            headers={"Content-Type": "application/json"},
        )
    else:
        response = await api.take(ttl=ttl)
    assert response.status_code == 422, response.text
    body = response.json()
    assert "ttl" in body["error"]
    assert body["agent"] == "echo"
    assert api.state() is S.CREATED  # nothing woken


async def test_post_lease_answers_422_naming_ttl_when_ttl_missing(api: Harness) -> None:
    response = await api.client.post("/api/agents/echo/leases", json={"holder": "x"})
    assert response.status_code == 422
    assert "ttl" in response.json()["error"]


async def test_post_lease_answers_422_when_body_is_malformed_json(api: Harness) -> None:
    response = await api.client.post(
        "/api/agents/echo/leases",
        content=b"{ttl: 5",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["error"]


async def test_post_lease_answers_422_and_holds_nothing_when_holder_is_too_long(
    api: Harness,
) -> None:
    response = await api.take(ttl=5, holder="x" * 10_000)
    assert response.status_code == 422
    assert "holder" in response.json()["error"]
    listed = await api.client.get("/api/agents/echo/leases")
    assert listed.json()["leases"] == []
    assert api.state() is S.CREATED


async def test_post_lease_answers_422_naming_field_when_field_unknown(api: Harness) -> None:
    response = await api.take(ttl=5, ttll=6)
    assert response.status_code == 422
    assert "ttll" in response.json()["error"]


async def test_post_lease_answers_404_when_agent_unknown(api: Harness) -> None:
    response = await api.client.post("/api/agents/nobody/leases", json={"ttl": 5})
    assert response.status_code == 404
    assert response.json()["agent"] == "nobody"
    assert (await api.client.get("/api/agents/nobody/leases")).status_code == 404


async def test_post_lease_keeps_nothing_when_agent_cannot_start(api: Harness) -> None:
    response = await api.client.post("/api/agents/broken/leases", json={"ttl": 5})
    assert response.status_code == 502, response.text  # its image is missing: failed
    assert response.json()["agent"] == "broken"
    assert api.state("broken") is S.FAILED
    assert (await api.client.get("/api/agents/broken/leases")).json() == {"leases": []}
    assert not api.engine.supervisor.actor("broken").is_busy


async def test_leases_need_token_when_api_has_one(tmp_path: Path) -> None:
    async with harness(tmp_path, token=TOKEN) as h:
        assert (await h.take()).status_code == 401
        response = await h.client.post(
            "/api/agents/echo/leases",
            json={"ttl": 5},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 201


# --------------------------------------------------------------------------- fake time


async def test_lease_keeps_agent_running_past_idle_timeout_when_held(api: Harness) -> None:
    lease = (await api.take(ttl=1000)).json()
    await api.clock.advance(50)  # idle_timeout is 10
    assert api.state() is S.RUNNING
    await api.client.delete(f"/api/agents/echo/leases/{lease['id']}")
    assert await api.advance_until_stopped() >= 10  # idles normally once released


async def test_lease_expires_by_itself_when_ttl_passes(api: Harness) -> None:
    lease = (await api.take(ttl=30)).json()
    await api.clock.advance(29)
    assert len((await api.client.get("/api/agents/echo/leases")).json()["leases"]) == 1
    await api.clock.advance(2)
    assert (await api.client.get("/api/agents/echo/leases")).json() == {"leases": []}
    assert "lease.expired" in api.kinds()
    assert not api.engine.supervisor.actor("echo").is_busy
    await api.advance_until_stopped()
    assert api.clock.now() >= lease["expires_at"] + 10  # a full idle_timeout after expiry


async def test_put_lease_renews_ttl_from_now_when_held(api: Harness) -> None:
    lease = (await api.take(ttl=30)).json()
    await api.clock.advance(20)
    response = await api.client.put(f"/api/agents/echo/leases/{lease['id']}", json={"ttl": 30})
    assert response.status_code == 200
    assert response.json()["expires_at"] == pytest.approx(api.clock.now() + 30)
    await api.clock.advance(20)  # 40 s after taking it: the first TTL has passed
    assert len((await api.client.get("/api/agents/echo/leases")).json()["leases"]) == 1
    await api.clock.advance(11)
    assert (await api.client.get("/api/agents/echo/leases")).json() == {"leases": []}


async def test_lease_wakes_agent_when_agent_paused(api: Harness) -> None:
    await api.engine.agents.wake("echo", reason="test", timeout=5)
    await api.engine.agents.act("echo", "pause", reason="test")
    assert api.state() is S.PAUSED
    assert (await api.take()).status_code == 201
    assert api.state() is S.RUNNING


async def test_close_releases_every_lease_when_engine_stops(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.take()
        actor = h.engine.supervisor.actor("echo")
        assert actor.is_busy
    assert not actor.is_busy


# --------------------------------------------------------------------------- library


@pytest.mark.parametrize("ttl", [0.001, 1, 3600.5, MAX_TTL])
def test_validate_ttl_returns_float_seconds_when_in_range(ttl: float) -> None:
    assert validate_ttl(ttl) == float(ttl)


@pytest.mark.parametrize("ttl", [0, -0.5, MAX_TTL + 0.001, float("nan"), "1", False])
def test_validate_ttl_raises_naming_ttl_when_out_of_range(ttl: object) -> None:
    with pytest.raises(ValueError, match="ttl"):
        validate_ttl(ttl)


async def test_grant_raises_not_found_when_agent_unknown(api: Harness) -> None:
    leases = api.engine.leases
    with pytest.raises(errors.NotFound):
        await leases.grant("nobody", 5)
    await leases.close()


async def test_release_from_two_sides_ends_lease_once_when_raced(api: Harness) -> None:
    leases = api.engine.leases
    lease = await leases.grant("echo", 5)
    await leases.release("echo", lease.id)
    with pytest.raises(errors.NotFound):
        await leases.release("echo", lease.id)
    await api.clock.advance(10)  # the cancelled timer must not end anything twice
    assert not api.engine.supervisor.actor("echo").is_busy
    await leases.close()
