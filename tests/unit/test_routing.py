"""Routing by event type: the pure rules (table and property tests) and
``POST /api/route/{event_type}`` on a FakeRuntime engine: first match in
configuration order, ``?all=true`` fan-out, 404 naming the type, the prefix rule,
``Roost-Event-Type`` on delivery, and what ``GET /api/agents`` shows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.core import routing
from roost.ports.agent_http import AgentResponse, Headers
from roost.testing import EngineHarness
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"


# -- the rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "event_types", "event_type", "handled"),
    [
        ("issue-triage", None, "issue.opened", True),
        ("issue-triage", None, "issue.comment.created", True),
        ("issue-triage", None, "issue", False),
        ("issue-triage", None, "pr.opened", False),
        ("issue-triage", None, "triage.x", False),
        ("echo", None, "echo.hello", True),
        ("any", ["issue.opened", "pr.*"], "issue.opened", True),
        ("any", ["issue.opened", "pr.*"], "issue.closed", False),
        ("any", ["issue.opened", "pr.*"], "pr.review.done", True),
        ("any", ["pr.?"], "pr.x", True),
        ("any", ["pr.?"], "pr.xy", False),
        ("any", ["Pr.*"], "pr.x", False),
        ("any", [], "any.thing", False),
        ("any", ["*"], "whatever", True),
    ],
)
def test_agent_handles_event_type_by_its_patterns_or_the_prefix_rule(
    agent: str, event_types: list[str] | None, event_type: str, handled: bool
) -> None:
    assert routing.handles(routing.patterns_of(agent, event_types), event_type) is handled


def test_route_picks_first_match_in_order_or_every_match_when_fanning_out() -> None:
    candidates = [("a", ("x.*",)), ("b", ("x.y",)), ("c", ("z.*",)), ("d", ("x.*",))]
    assert routing.route(candidates, "x.y") == ["a"]
    assert routing.route(candidates, "x.y", fan_out=True) == ["a", "b", "d"]
    assert routing.route(candidates, "q.q") == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.lists(st.sampled_from(["x.*", "x.y", "*.y", "y.*", "x.?", "*"]), max_size=3),
        ),
        max_size=6,
        unique_by=lambda c: c[0],
    ),
    st.sampled_from(["x.y", "y.x", "x.z", "zz", "x.yy"]),
)
def test_first_match_is_the_head_of_the_fan_out_when_any_matches(
    candidates: list[tuple[str, list[str]]], event_type: str
) -> None:
    everyone = routing.route(candidates, event_type, fan_out=True)
    first = routing.route(candidates, event_type)
    assert first == everyone[:1]
    assert everyone == [name for name, p in candidates if routing.handles(p, event_type)]


@pytest.mark.parametrize("bad", ["", " x", "x y", "a/b", "-x", "x" * 201, "é.x"])
def test_check_event_type_refuses_names_that_cannot_travel_in_a_path(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid event type"):
        routing.check_event_type(bad)


# -- over HTTP -----------------------------------------------------------------------


class HeaderRecorder(FakeAgentClient):
    """Records the headers of every delivery."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__(runtime)
        self.headers: list[dict[str, str]] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Headers = (),
        timeout: float,
    ) -> AgentResponse:
        self.headers.append({k.decode(): v.decode() for k, v in headers})
        return await super().request(method, url, body=body, headers=headers, timeout=timeout)


AGENTS: dict[str, dict[str, Any]] = {
    # configuration order, not alphabetical: "zeta" comes first
    "zeta": {"image": IMAGE, "event_types": ["issue.opened", "pr.*"]},
    "issue-triage": {"image": IMAGE},
    "alpha": {"image": IMAGE, "event_types": ["issue.*"]},
    "quiet": {"image": IMAGE, "event_types": []},
}


@pytest.fixture
async def roost(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    runtime = FakeRuntime(images=[IMAGE])
    settings = make_settings(tmp_path, "routing-test", agents=AGENTS)
    async with EngineHarness.running(
        settings, runtime=runtime, agent_client=HeaderRecorder(runtime)
    ) as harness:
        yield harness


async def test_route_stores_for_first_matching_agent_in_config_order(
    roost: EngineHarness,
) -> None:
    response = await roost.client.post("/api/route/issue.opened", json={"n": 1})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["agent"] == "zeta"
    stored = await roost.client.get(f"/api/agents/zeta/messages/{body['id']}")
    assert stored.json()["event_type"] == "issue.opened"
    assert stored.json()["body"] == {"n": 1}


async def test_route_uses_prefix_rule_when_agent_lists_no_event_types(
    roost: EngineHarness,
) -> None:
    response = await roost.client.post("/api/route/issue.closed", json={})
    assert response.status_code == 202, response.text
    assert response.json()["agent"] == "issue-triage"


async def test_route_all_gives_every_matching_agent_its_own_copy(roost: EngineHarness) -> None:
    response = await roost.client.post("/api/route/issue.opened", params={"all": "true"}, json=[1])
    assert response.status_code == 202, response.text
    copies = response.json()
    assert [c["agent"] for c in copies] == ["zeta", "issue-triage", "alpha"]
    assert len({c["id"] for c in copies}) == 3


async def test_route_answers_404_naming_the_type_when_no_agent_handles_it(
    roost: EngineHarness,
) -> None:
    response = await roost.client.post("/api/route/deploy.started", json={})
    assert response.status_code == 404
    assert "deploy.started" in response.json()["error"]
    for name in AGENTS:
        listing = await roost.client.get(f"/api/agents/{name}/messages")
        assert listing.json()["messages"] == []


async def test_route_answers_400_when_event_type_is_malformed(roost: EngineHarness) -> None:
    response = await roost.client.post("/api/route/bad type", json={})
    assert response.status_code == 400
    assert "invalid event type" in response.json()["error"]


async def test_routed_message_carries_event_type_header_when_pushed(
    roost: EngineHarness,
) -> None:
    response = await roost.client.post(
        "/api/route/pr.merged", params={"all": "false"}, json={"pr": 7}
    )
    message_id = response.json()["id"]
    recorder = roost.engine.agent_client
    assert isinstance(recorder, HeaderRecorder)
    await wait_until(lambda: bool(recorder.headers), timeout=5, what="delivery")
    assert recorder.headers[0] == {
        "content-type": "application/json",
        "roost-message-id": message_id,
        "roost-event-type": "pr.merged",
    }


async def test_plain_message_carries_no_event_type_header(roost: EngineHarness) -> None:
    await roost.client.post("/api/agents/quiet/messages", json={})
    recorder = roost.engine.agent_client
    assert isinstance(recorder, HeaderRecorder)
    await wait_until(lambda: bool(recorder.headers), timeout=5, what="delivery")
    assert list(recorder.headers[0]) == ["content-type", "roost-message-id"]


async def test_route_repeat_with_idempotency_key_stores_nothing_new(roost: EngineHarness) -> None:
    headers = {"Idempotency-Key": "event-1"}
    first = await roost.client.post("/api/route/pr.x", json={}, headers=headers)
    again = await roost.client.post("/api/route/pr.x", json={}, headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]


async def test_agents_show_their_event_types_and_delivery_mode(roost: EngineHarness) -> None:
    agents = (await roost.client.get("/api/agents")).json()["agents"]
    shown = {a["name"]: (a["event_types"], a["delivery"]) for a in agents}
    assert shown == {
        "zeta": (["issue.opened", "pr.*"], "push"),
        "issue-triage": (["issue.*"], "push"),
        "alpha": (["issue.*"], "push"),
        "quiet": ([], "push"),
    }
