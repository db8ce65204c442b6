"""WebSocket mode on a FakeRuntime engine served on real sockets (``serving.serve``),
the agent played by an aiohttp WebSocket client holding its container's token:
ready only once connected, frames as specified, replies and errors stored, messages
queued before the first connection delivered once it connects, redelivery after a
reconnect with attempt + 1, a start that never connects failing the way a failed
start does, and a protocol-breaking frame closing the connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from roost.core.states import AgentState
from roost.testing import EngineHarness
from tests.conftest import make_settings, wait_until

IMAGE = "roost-mimic:latest"
S = AgentState
WS_AGENT: dict[str, Any] = {"image": IMAGE, "delivery": "websocket", "connect_timeout": 5}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _settings(tmp_path: Path, **agent: Any) -> Any:
    return make_settings(
        tmp_path,
        "ws-test",
        agents={"talker": {**WS_AGENT, **agent}},
        defaults={"idle_timeout": 0, "restart_backoff": 0.05, "max_restarts": 0},
    )


async def _token_of_new_container(roost: EngineHarness) -> str:
    agents = roost.engine.agents
    await wait_until(
        lambda: agents.get("talker").container_id is not None, what="the container created"
    )
    return roost.agent_token("talker")


async def _connect(
    roost: EngineHarness, session: aiohttp.ClientSession, token: str
) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(
        f"{roost.agent_url}/api/agents/talker/ws",
        headers={"Authorization": f"Bearer {token}"},
    )


async def _frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    received = await asyncio.wait_for(ws.receive(), 10)
    assert received.type is aiohttp.WSMsgType.TEXT, received
    frame: dict[str, Any] = json.loads(received.data)
    return frame


async def _start_connected(
    roost: EngineHarness, session: aiohttp.ClientSession
) -> aiohttp.ClientWebSocketResponse:
    waking = asyncio.ensure_future(roost.engine.agents.wake("talker", reason="test", timeout=10))
    token = await _token_of_new_container(roost)
    await asyncio.sleep(0.05)
    assert not waking.done(), "ready before the agent connected"
    ws = await _connect(roost, session, token)
    record = await asyncio.wait_for(waking, 10)
    assert record.state is S.RUNNING
    return ws


async def _send(roost: EngineHarness, body: Any, **params: str) -> httpx.Response:
    return await roost.client.post("/api/agents/talker/messages", json=body, params=params)


async def test_agent_is_ready_when_connected_and_replies_over_frames(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        sending = asyncio.ensure_future(_send(roost, {"q": 1}, wait="true"))
        frame = await _frame(ws)
        assert frame["type"] == "message"
        assert frame["body"] == {"q": 1}
        assert frame["attempt"] == 1
        assert frame["event_type"] is None
        await ws.send_json({"type": "heartbeat"})
        await ws.send_json({"type": "reply", "id": frame["id"], "reply": {"a": 2}})
        answered = await asyncio.wait_for(sending, 10)
        assert answered.status_code == 200, answered.text
        assert answered.json()["reply"] == {"a": 2}
        assert answered.json()["id"] == frame["id"]
        await ws.close()


async def test_error_frame_fails_the_message(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        sending = asyncio.ensure_future(_send(roost, {"q": 1}, wait="true"))
        frame = await _frame(ws)
        await ws.send_json({"type": "error", "id": frame["id"], "error": "no idea"})
        answered = await asyncio.wait_for(sending, 10)
        assert answered.json()["status"] == "failed"
        assert answered.json()["error"] == "no idea"
        await ws.close()


async def test_routed_frame_carries_event_type(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    settings = _settings(tmp_path, event_types=["chat.*"])
    async with EngineHarness.served(settings) as roost:
        ws = await _start_connected(roost, session)
        routed = await roost.client.post("/api/route/chat.said", json={"text": "hi"})
        assert routed.status_code == 202, routed.text
        frame = await _frame(ws)
        assert frame["event_type"] == "chat.said"
        assert frame["id"] == routed.json()["id"]
        await ws.close()


async def test_messages_queued_before_first_connection_are_delivered_once_it_connects(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ids = [(await _send(roost, {"n": n})).json()["id"] for n in range(3)]
        token = await _token_of_new_container(roost)  # the first message woke it
        ws = await _connect(roost, session, token)
        for expected in ids:
            frame = await _frame(ws)
            assert frame["id"] == expected  # in order, one at a time
            await ws.send_json({"type": "reply", "id": frame["id"], "reply": frame["body"]})

        async def delivered() -> bool:
            listing = (await roost.client.get("/api/agents/talker/messages")).json()
            return [m["status"] for m in listing["messages"]] == ["delivered"] * 3

        await wait_until(delivered, timeout=10, what="all three delivered")
        await ws.close()


async def test_unanswered_message_is_redelivered_after_reconnect(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        sent = (await _send(roost, {"n": 1})).json()["id"]
        first = await _frame(ws)
        assert (first["id"], first["attempt"]) == (sent, 1)
        await ws.close()  # gone before replying
        again = await _connect(roost, session, roost.agent_token("talker"))
        second = await _frame(again)
        assert (second["id"], second["attempt"]) == (sent, 2)
        await again.send_json({"type": "reply", "id": sent, "reply": "ok"})

        async def delivered() -> bool:
            shown = (await roost.client.get(f"/api/agents/talker/messages/{sent}")).json()
            return bool(shown["status"] == "delivered" and shown["attempts"] == 2)

        await wait_until(delivered, timeout=10, what="delivered on the second attempt")
        await again.close()


async def test_start_fails_when_agent_never_connects_within_connect_timeout(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, connect_timeout=0.2)
    async with EngineHarness.served(settings) as roost:
        agents = roost.engine.agents
        started = await roost.client.post("/api/agents/talker/start", params={"timeout": "10"})
        assert started.status_code in (502, 504), started.text
        await wait_until(lambda: agents.get("talker").state is S.FAILED, what="failed")
        record = agents.get("talker")
        assert "did not connect" in record.last_error
        assert "connect_timeout" in record.last_error


async def test_frame_breaking_the_protocol_closes_the_connection(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        await ws.send_json({"type": "shout"})
        closed = await asyncio.wait_for(ws.receive(), 10)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008


async def test_frame_carries_the_posted_bytes_and_the_reply_is_kept_when_answered(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    raw = '{ "q" :  [1,2], "t": "\u00e9 ✓" }'
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        sending = asyncio.ensure_future(
            roost.client.post(
                "/api/agents/talker/messages",
                params={"wait": "true"},
                content=raw.encode(),
                headers={"Content-Type": "application/json"},
            )
        )
        received = await asyncio.wait_for(ws.receive(), 10)
        assert raw in received.data  # spliced in as sent, not re-encoded
        frame = json.loads(received.data)
        assert frame["body"] == {"q": [1, 2], "t": "é ✓"}
        reply = '{"type": "reply", "id": ' + json.dumps(frame["id"]) + ', "reply": ["é", 1]}'
        await ws.send_str(reply)
        answered = await asyncio.wait_for(sending, 10)
        assert answered.json()["reply"] == ["é", 1]
        await ws.close()


async def test_frame_with_nan_closes_the_connection_as_not_json(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with EngineHarness.served(_settings(tmp_path)) as roost:
        ws = await _start_connected(roost, session)
        await ws.send_str('{"type": "reply", "id": "x", "reply": NaN}')
        closed = await asyncio.wait_for(ws.receive(), 10)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1007


async def test_websocket_is_refused_when_agent_is_not_in_websocket_mode(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    settings = _settings(tmp_path, delivery="pull")
    async with EngineHarness.served(settings) as roost:
        await roost.engine.agents.wake("talker", reason="test", timeout=5)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await _connect(roost, session, roost.agent_token("talker"))
