"""Message and event routes on a FakeRuntime engine: accept, wait, idempotency, bad input
(nothing stored in any refusal), and the SSE stream through a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost import serving
from roost.api.messages import MessageDoor
from roost.core.backoff import Backoff
from roost.core.states import AgentState
from roost.edge.app import Edge
from roost.engine import Engine
from roost.testing import EngineHarness
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, wait_until
from tests.support import ScriptedAgent
from tests.unit.cli_support import running_daemon

IMAGE = "roost-mimic:latest"
TOKEN = "t0ken"
MAX_BODY = 1000
QUEUE_LIMIT = 3


class Harness:
    def __init__(self, harness: EngineHarness, agent: ScriptedAgent) -> None:
        self.engine = harness.engine
        self.agent = agent
        self.client = harness.client
        self.app = harness.app

    async def stored(self, name: str = "echo") -> list[dict[str, Any]]:
        response = await self.client.get(f"/api/agents/{name}/messages", params={"limit": 1000})
        assert response.status_code == 200, response.text
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages


def _settings(tmp_path: Path) -> Any:
    return make_settings(
        tmp_path,
        "messages-api",
        agents={"echo": {"image": IMAGE}},
        defaults={"queue_limit": QUEUE_LIMIT, "wait_timeout": 5},
        server={"max_body_size": MAX_BODY},
    )


async def _harness(tmp_path: Path, token: str | None) -> AsyncIterator[Harness]:
    runtime = FakeRuntime(images=[IMAGE])
    agent = ScriptedAgent(runtime)
    running = EngineHarness.running(
        _settings(tmp_path), runtime=runtime, agent_client=agent, token=token
    )
    async with running as harness:
        harness.engine.dispatcher.retry = Backoff((0.01,), repeat=True)
        yield Harness(harness, agent)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, None):
        yield harness


async def test_post_answers_202_with_id_and_message_is_delivered_when_agent_asleep(
    api: Harness,
) -> None:
    response = await api.client.post("/api/agents/echo/messages", json={"hello": 1})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["agent"] == "echo"
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/api/agents/echo/messages/{body['id']}"

    async def delivered() -> bool:
        shown = await api.client.get(f"/api/agents/echo/messages/{body['id']}")
        return bool(shown.json()["status"] == "delivered")

    await wait_until(delivered, timeout=10, what="delivered")
    shown = (await api.client.get(f"/api/agents/echo/messages/{body['id']}")).json()
    assert shown["reply"] == {"echo": {"hello": 1}, "message_id": body["id"]}
    assert shown["attempts"] == 1
    assert shown["error"] is None
    assert shown["body"] == {"hello": 1}


async def test_post_with_wait_answers_200_with_reply_when_agent_replies(api: Harness) -> None:
    response = await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, json=["any", "json", 3]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "delivered"
    assert body["reply"] == {"echo": ["any", "json", 3], "message_id": body["id"]}


async def test_post_with_wait_answers_202_with_id_when_reply_takes_too_long(
    api: Harness,
) -> None:
    api.agent.down = True
    response = await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true", "timeout": "0.1"}, json="x"
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("queued", "delivering")
    api.agent.down = False
    await wait_until(
        lambda: api.engine.inbox.pending_count("echo") == 0, timeout=10, what="delivered"
    )


async def test_post_with_wait_reports_failure_when_agent_rejects_the_message(
    api: Harness,
) -> None:
    response = await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, json={"status": 400}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert body["error"].startswith("HTTP 400")


async def test_same_idempotency_key_returns_the_same_message_when_posted_again(
    api: Harness,
) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = await api.client.post("/api/agents/echo/messages", json={"n": 1}, headers=headers)
    again = await api.client.post("/api/agents/echo/messages", json={"n": 2}, headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    stored = await api.stored()
    assert [m["body"] for m in stored] == [{"n": 1}]


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b'{"a": 1,', "line 1 column 9"),
        (b'{\n  "a": tru\n}', "line 2 column 8"),
        (b"", "line 1 column 1"),
        (b"NaN", "NaN is not valid JSON"),
    ],
)
async def test_malformed_json_answers_400_naming_the_position_when_posted(
    api: Harness, raw: bytes, where: str
) -> None:
    await api.client.post("/api/agents/echo/messages", json={"kept": True})
    before = await api.stored()
    response = await api.client.post(
        "/api/agents/echo/messages", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert "not valid JSON" in body["error"]
    assert where in body["error"]
    assert body["agent"] == "echo"
    assert [m["id"] for m in await api.stored()] == [m["id"] for m in before]


async def test_agent_receives_the_posted_bytes_when_sent_or_routed(api: Harness) -> None:
    # Spacing, key order, a repeated key, raw and escaped non-ASCII: what the client
    # sent is what is stored and what the agent gets, byte for byte.
    raw = '{ "z" : [1 ,2],\n "a": "\\u00e9t\u00e9 ✓", "a": null }'.encode()
    headers = {"Content-Type": "application/json"}
    sent = await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, content=raw, headers=headers
    )
    assert sent.status_code == 200, sent.text
    assert sent.json()["reply"]["echo"] == {"z": [1, 2], "a": None}
    routed = await api.client.post("/api/route/echo.note", content=raw, headers=headers)
    assert routed.status_code == 202, routed.text
    await wait_until(lambda: len(api.agent.bodies) == 2, timeout=10, what="routed delivery")
    assert api.agent.bodies == [raw, raw]
    stored = await api.engine.inbox.get("echo", sent.json()["id"])
    assert stored is not None
    assert stored.body == raw
    shown = (await api.client.get(f"/api/agents/echo/messages/{stored.id}")).json()
    assert shown["body"] == {"z": [1, 2], "a": None}


@pytest.mark.parametrize(
    ("answer", "kept", "shown"),
    [
        ('{"a" :  [1, 2]}', b'{"a" :  [1, 2]}', {"a": [1, 2]}),  # JSON: its own bytes
        ("plain words", b'"plain words"', "plain words"),  # text: a JSON string
        ("[NaN]", b'"[NaN]"', "[NaN]"),  # not JSON (no NaN in JSON): text
        ("", b"null", None),  # nothing: null
    ],
)
async def test_reply_is_kept_as_json_text_when_the_agent_answers(
    api: Harness, answer: str, kept: bytes, shown: Any
) -> None:
    response = await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, json={"answer": answer}
    )
    assert response.status_code == 200, response.text
    assert response.json()["reply"] == shown
    stored = await api.engine.inbox.get("echo", response.json()["id"])
    assert stored is not None
    assert stored.reply == kept
    listed = await api.stored()
    assert listed[-1]["reply"] == shown


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (b"[" * 128 + b"]" * 128, True),
        (b"[" * 129 + b"]" * 129, False),
        # more brackets than the limit, but in strings or side by side: not deep
        (json.dumps(["[{" * 100, [[]] * 100]).encode(), True),
        (json.dumps({"a": json.loads("[" * 128 + "]" * 128)}).encode(), False),
    ],
)
async def test_nesting_deeper_than_the_limit_answers_400_when_posted(
    api: Harness, raw: bytes, accepted: bool
) -> None:
    response = await api.client.post(
        "/api/agents/echo/messages", content=raw, headers={"Content-Type": "application/json"}
    )
    if accepted:
        assert response.status_code == 202, response.text
    else:
        assert response.status_code == 400, response.text
        assert "nested more than 128 levels deep" in response.json()["error"]
        assert await api.stored() == []


def _comparable(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    """Status, JSON body and the headers that matter, with message ids blanked."""
    text = response.text
    body = response.json()
    if isinstance(body, dict) and isinstance(body.get("id"), str):
        text = text.replace(body["id"], "ID")
    headers = {
        key: response.headers[key].replace(body.get("id", "ID"), "ID")
        for key in ("content-type", "location", "retry-after")
        if key in response.headers
    }
    return response.status_code, json.loads(text), headers


async def test_message_door_answers_as_the_documented_route_when_posted(api: Harness) -> None:
    # The same requests through the edge (plain POSTs take the door, the rest go to
    # FastAPI) and through FastAPI alone: the same answers.
    assert api.app is not None
    without_door = Edge(api.app.api, api.app.proxy, token=None, max_body=MAX_BODY)
    transport = httpx.ASGITransport(app=without_door)
    deep = b"[" * 129 + b"]" * 129
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("/api/agents/echo/messages", {"json": {"a": 1}}, False),
        ("/api/agents/echo/messages?wait=true", {"json": {"a": 2}}, False),
        ("/api/agents/echo/messages?wait=false", {"json": [1, 2]}, False),
        ("/api/agents/echo/messages?wait=true&timeout=5", {"json": "x"}, False),
        ("/api/agents/echo/messages?wait=true", {"json": {"status": 422}}, False),
        ("/api/agents/nobody/messages", {"json": {"a": 1}}, False),
        ("/api/agents/echo/messages", {"content": b'{"a": '}, False),
        ("/api/agents/echo/messages", {"content": deep}, False),
        ("/api/agents/echo/messages", {"content": b"\xff"}, False),
        ("/api/agents/echo/messages", {"content": b"x" * (MAX_BODY + 1)}, False),
        (
            "/api/agents/echo/messages",
            {"json": 1, "headers": {"Idempotency-Key": "k" * 256}},
            False,
        ),
        ("/api/agents/echo/messages?wait=yes", {"json": {"a": 3}}, False),  # FastAPI's bool
        ("/api/agents/echo/messages?timeout=-1", {"json": {"a": 4}}, False),  # 422
        ("/api/agents/echo/messages?other=1", {"json": {"a": 5}}, False),  # ignored
        ("/api/agents/echo/messages", {"json": {"a": 6}}, True),  # into a full queue
    ]
    door = api.app.api_door
    assert isinstance(door, MessageDoor)
    fallback = door._api
    passed_on: list[str] = []

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        passed_on.append(scope["path"] + "?" + scope["query_string"].decode())
        await fallback(scope, receive, send)

    door._api = counted
    async with httpx.AsyncClient(transport=transport, base_url="http://roost") as plain:
        for path, request, full in cases:
            api.agent.down = full
            if full:
                for i in range(QUEUE_LIMIT):
                    await api.client.post("/api/agents/echo/messages", json={"fill": i})
            answers = [
                _comparable(await client.post(path, **request)) for client in (api.client, plain)
            ]
            assert answers[0] == answers[1], (path, request)
            api.agent.down = False
            await wait_until(
                lambda: api.engine.inbox.pending_count("echo") == 0, timeout=10, what="drained"
            )
    statuses = [status for status, _, _ in answers]
    assert statuses == [429, 429]
    # the door served the plain ones itself; FastAPI saw only the other three
    assert sorted(p for p in passed_on if "/messages" in p) == [
        "/api/agents/echo/messages?other=1",
        "/api/agents/echo/messages?timeout=-1",
        "/api/agents/echo/messages?wait=yes",
    ]


async def _paused(api: Harness) -> str:
    agents = api.engine.agents
    await agents.wake("echo", reason="test", timeout=5)
    await agents.act("echo", "pause")
    record = agents.get("echo")
    assert record.state is AgentState.PAUSED
    assert record.container_id is not None
    return record.container_id


async def test_a_message_for_a_paused_agent_wakes_it_while_being_stored(
    api: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _paused(api)
    inbox = api.engine.dispatcher.inbox
    enqueue = inbox.enqueue
    stored = asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await stored.wait()  # the message is still being stored meanwhile
        return await enqueue(*args, **kwargs)

    monkeypatch.setattr(inbox, "enqueue", held)
    posting = asyncio.ensure_future(
        api.client.post("/api/agents/echo/messages", params={"wait": "true"}, json={"n": 1})
    )
    await wait_until(lambda: api.engine.agents.get("echo").awake, timeout=10, what="awake")
    assert not posting.done()
    assert await api.stored() == []
    stored.set()
    answer = await posting
    assert answer.status_code == 200, answer.text
    assert answer.json()["reply"]["echo"] == {"n": 1}


async def test_a_message_the_full_queue_refuses_does_not_wake_the_agent(api: Harness) -> None:
    await _paused(api)
    for i in range(QUEUE_LIMIT):  # stored behind the lane's back: it stays asleep
        await api.engine.inbox.enqueue("echo", json.dumps(i).encode(), limit=QUEUE_LIMIT)
    refused = await api.client.post("/api/agents/echo/messages", json={"one": "too many"})
    assert refused.status_code == 429, refused.text
    assert not len(api.engine.dispatcher._early_wakes)  # no wake was begun
    assert api.engine.agents.get("echo").state is AgentState.PAUSED


async def test_body_over_limit_answers_413_when_declared_or_streamed(api: Harness) -> None:
    await api.client.post("/api/agents/echo/messages", json={"kept": True})
    before = await api.stored()
    big = json.dumps({"pad": "x" * MAX_BODY}).encode()
    declared = await api.client.post("/api/agents/echo/messages", content=big)
    assert declared.status_code == 413, declared.text
    assert str(MAX_BODY) in declared.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    streamed = await api.client.post("/api/agents/echo/messages", content=chunks())
    assert streamed.status_code == 413, streamed.text
    assert [m["id"] for m in await api.stored()] == [m["id"] for m in before]


async def test_unknown_agent_answers_404_when_message_posted_or_read(api: Harness) -> None:
    posted = await api.client.post("/api/agents/nobody/messages", json={"x": 1})
    assert posted.status_code == 404
    assert posted.json()["agent"] == "nobody"
    assert "'nobody'" in posted.json()["error"]
    assert await api.engine.inbox.list_messages("nobody") == []
    missing = await api.client.get("/api/agents/echo/messages/0123abcd")
    assert missing.status_code == 404
    assert "0123abcd" in missing.json()["error"]


async def test_full_queue_answers_429_with_retry_after_when_limit_reached(
    api: Harness,
) -> None:
    api.agent.down = True
    for i in range(QUEUE_LIMIT):
        accepted = await api.client.post("/api/agents/echo/messages", json={"i": i})
        assert accepted.status_code == 202
    before = await api.stored()
    refused = await api.client.post("/api/agents/echo/messages", json={"i": "one too many"})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue_limit" in refused.json()["error"]
    assert [m["id"] for m in await api.stored()] == [m["id"] for m in before]
    listing = (await api.client.get("/api/agents/echo/messages")).json()
    assert listing["pending"] == QUEUE_LIMIT
    # once delivered, the queue takes messages again
    api.agent.down = False
    await wait_until(
        lambda: api.engine.inbox.pending_count("echo") == 0, timeout=10, what="drained"
    )
    again = await api.client.post("/api/agents/echo/messages", json={"i": "later"})
    assert again.status_code == 202


async def test_list_filters_by_status_when_asked(api: Harness) -> None:
    await api.client.post("/api/agents/echo/messages", params={"wait": "true"}, json={"ok": 1})
    await api.client.post(
        "/api/agents/echo/messages", params={"wait": "true"}, json={"status": 404}
    )
    failed = (await api.client.get("/api/agents/echo/messages", params={"status": "failed"})).json()
    assert [m["body"] for m in failed["messages"]] == [{"status": 404}]
    bad = await api.client.get("/api/agents/echo/messages", params={"status": "weird"})
    assert bad.status_code == 422


async def test_message_routes_need_the_token_when_one_is_set(tmp_path: Path) -> None:
    async for api in _harness(tmp_path, TOKEN):
        refused = await api.client.post("/api/agents/echo/messages", json={"x": 1})
        assert refused.status_code == 401
        assert await api.engine.inbox.list_messages("echo") == []
        events = await api.client.get("/api/events", params={"recent": "5"})
        assert events.status_code == 401
        allowed = await api.client.post(
            "/api/agents/echo/messages",
            json={"x": 1},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert allowed.status_code == 202


async def test_recent_events_are_listed_as_json_when_recent_given(api: Harness) -> None:
    await api.client.post("/api/agents/echo/messages", params={"wait": "true"}, json={"x": 1})
    response = await api.client.get("/api/events", params={"recent": "100"})
    assert response.status_code == 200
    kinds = [e["kind"] for e in response.json()["events"]]
    assert "agent.state" in kinds
    assert "message.status" in kinds


# --------------------------------------------------------------------------- SSE


async def _read_frames(count: int, lines: AsyncIterator[str]) -> list[dict[str, str]]:
    frames: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    async for line in lines:
        if not line:
            if frame:
                frames.append(frame)
                frame = {}
                if len(frames) == count:
                    return frames
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        frame[key] = value
    return frames


async def test_event_stream_sends_frames_resumes_and_ends_when_server_stops(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime(images=[IMAGE])
    agent = ScriptedAgent(runtime)
    settings = _settings(tmp_path)
    engine = Engine(settings, runtime=runtime, agent_client=agent)
    sock = await serving.bind_listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(
        serving.serve(
            settings, engine=engine, listen_socket=sock, shutdown=stop, handle_signals=False
        )
    )
    try:
        await _exercise_stream(f"http://127.0.0.1:{port}", stop)
    finally:
        stop.set()
        async with asyncio.timeout(15):
            code = await server
    assert code == serving.EXIT_OK


async def _exercise_stream(base: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        await wait_until(_answers(client), timeout=10, what="server up")
        async with client.stream("GET", "/api/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith(":")  # opened at once
            sent = await client.post("/api/agents/echo/messages", json={"sse": 1})
            message_id = sent.json()["id"]
            seen: list[dict[str, str]] = []
            while not any(
                f["event"] == "message.status" and json.loads(f["data"])["status"] == "delivered"
                for f in seen
            ):
                seen += await _read_frames(1, lines)
        first_id = int(seen[0]["id"])
        data = json.loads(seen[0]["data"])
        assert data["id"] == first_id
        assert data["kind"] == seen[0]["event"]
        statuses = [json.loads(f["data"]) for f in seen if f["event"] == "message.status"]
        assert [s["status"] for s in statuses] == ["queued", "delivered"]
        assert {s["message_id"] for s in statuses} == {message_id}

        # resume: everything after the first frame again, from the buffer
        async with client.stream(
            "GET", "/api/events", headers={"Last-Event-ID": str(first_id)}
        ) as resumed:
            again = await _read_frames(len(seen) - 1, resumed.aiter_lines())
        assert [f["id"] for f in again] == [f["id"] for f in seen[1:]]

        # an open stream must not keep the server from stopping
        async with client.stream("GET", "/api/events") as open_stream:
            open_lines = open_stream.aiter_lines()
            await anext(open_lines)
            stop.set()
            rest = [line async for line in open_lines]
            assert all(not line or line.startswith(":") for line in rest)


def _answers(client: httpx.AsyncClient) -> Any:
    async def check() -> bool:
        try:
            return (await client.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    return check


# --------------------------------------------------------------------------- CLI


async def test_send_prints_the_reply_and_events_list_it_when_daemon_runs(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path) as daemon:
        text = await daemon.cli("send", "echo", "hello there")
        assert text.exit_code == 0, text.output
        assert json.loads(text.stdout)["echo"] == {"text": "hello there"}

        as_json = await daemon.cli("send", "echo", '{"a": [1, 2]}', "--json")
        assert as_json.exit_code == 0, as_json.output
        answer = json.loads(as_json.stdout)
        assert answer["status"] == "delivered"
        assert answer["reply"]["echo"] == {"a": [1, 2]}

        queued = await daemon.cli("send", "echo", "later", "--no-wait", "--idempotency-key", "k-1")
        assert queued.exit_code == 0, queued.output
        message_id = queued.stdout.strip()
        again = await daemon.cli("send", "echo", "later", "--no-wait", "--idempotency-key", "k-1")
        assert again.stdout.strip() == message_id
        assert len(await daemon.engine.inbox.list_messages("echo")) == 3

        unknown = await daemon.cli("send", "nobody", "hi")
        assert unknown.exit_code == 1
        assert "'nobody'" in unknown.stderr

        events = await daemon.cli("events", "--json", "-n", "100")
        assert events.exit_code == 0, events.output
        listed = [json.loads(line) for line in events.stdout.splitlines()]
        assert any(e["kind"] == "message.status" and e["message_id"] == message_id for e in listed)
        plain = await daemon.cli("events")
        assert plain.exit_code == 0
        assert "agent.state" in plain.stdout
        assert "message.status" in plain.stdout
