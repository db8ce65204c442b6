"""Edge cases of RFC 9112 framing from a scripted raw server, through the proxy,
message delivery and probes (engine on FakeRuntime, real agent HTTP client).

The server parses requests with h11 and writes each answer byte for byte
(tests/conformance/scripted.py), so every case is exactly what the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import h11
import pytest

from roost.adapters.http_agent_client import IDLE_TIMEOUT, MAX_HEAD_SIZE, HttpAgentClient
from tests.conformance.conftest import ManualClock, Rig, host_rig
from tests.conformance.scripted import Answer, ScriptedServer, answer, chunked
from tests.conftest import wait_until

CHUNKED = {"Transfer-Encoding": "chunked", "Trailer": "X-Sum"}
HELLO = chunked(b"hello", b" ", b"world", extensions=True, trailers={"X-Sum": "abc"})
JSON_REPLY = chunked(b'{"echo"', b': "chunked"}', extensions=True, trailers={"X-Sum": "1"})
INFORMATIONAL = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
)
#: 70 headers of 1000 bytes: a head over 64 KiB; 40 of them: over h11's default 16 KiB.
TOO_BIG = {f"X-Pad-{i}": "x" * 1000 for i in range(70)}
BIG_BUT_ALLOWED = {f"X-Pad-{i}": "x" * 1000 for i in range(40)}
CLOSE_DELIMITED = b"0123456789" * 20_000

ROUTES: dict[str, Any] = {
    # Readiness closes its connection: the pooled ones are only the tests' own.
    "/health": Answer(answer(200, b"ok", headers={"Connection": "close"}), then="close"),
    "/chunked": Answer(answer(200, HELLO, headers=CHUNKED, length=False)),
    "/chunked-json": Answer(
        answer(
            200,
            JSON_REPLY,
            headers={**CHUNKED, "Content-Type": "application/json"},
            length=False,
        )
    ),
    "/informational": Answer(INFORMATIONAL + answer(200, b'"final"')),
    "/garbage": Answer(b"HTTPX/9 banana split\r\n\r\n", then="close"),
    "/silent": Answer(then="hang"),
    "/head-too-big": Answer(answer(200, b'"ok"', headers=TOO_BIG)),
    "/head-big": Answer(answer(200, b'"ok"', headers=BIG_BUT_ALLOWED)),
    "/head-length": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    "/no-content": Answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
    "/not-modified": Answer(
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5000\r\nETag: "x"\r\n\r\n'
    ),
    "/connection-close": Answer(
        answer(200, b'"bye"', headers={"Connection": "close"}), then="close"
    ),
    "/close-delimited": Answer(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + CLOSE_DELIMITED, then="close"
    ),
    "/http10": Answer(b'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"old"', then="close"),
    "/cut": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..", then="close"),
    "/idle-close": Answer(answer(200, b'"then closed"'), then="close"),
    "/race": Answer(answer(200, b'"answered"'), drop_when_reused=True),
    "/keep-alive": Answer(answer(200, b"ok", headers={"Keep-Alive": "timeout=5, max=100"})),
    "/expect": Answer(answer(200, b"got it"), continue_first=True),
    "/refuse": Answer(answer(401, b"no", headers={"Connection": "close"}), read_body=False),
}


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer(ROUTES)
    await scripted.start()
    try:
        yield scripted
    finally:
        await scripted.stop()


@contextlib.asynccontextmanager
async def rig_for(
    tmp_path: Path, server: ScriptedServer, *, client: HttpAgentClient | None = None, **spec: Any
) -> AsyncIterator[Rig]:
    async with host_rig(tmp_path, server.port, client=client, **spec) as rig:
        await rig.running()
        yield rig


def connections_of(server: ScriptedServer, path: str) -> list[int]:
    return [seen.connection for seen in server.requests(path)]


# --------------------------------------------------------------------------- chunked


async def test_proxy_relays_chunked_body_when_chunks_carry_extensions_and_trailers(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, headers, body = await rig.proxy("GET", "/chunked")
        assert status == 200
        assert body == b"hello world"
        assert "Trailer" not in headers  # hop-by-hop, and the trailers are dropped


async def test_delivery_decodes_reply_when_chunks_carry_extensions_and_trailers(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/chunked-json") as rig:
        result = await rig.deliver({"n": 1})
        assert result["status"] == "delivered"
        assert result["reply"] == {"echo": "chunked"}


async def test_probe_is_ok_when_health_answers_chunked_with_trailers(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, health_path="/chunked") as rig:  # readiness passed
        result = await rig.probe()
        assert result.ok
        assert result.status == 200


# --------------------------------------------------------------------------- 1xx


async def test_proxy_relays_final_answer_when_1xx_answers_come_first(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, _, body = await rig.proxy("GET", "/informational")
        assert status == 200
        assert body == b'"final"'


async def test_delivery_and_probe_take_final_answer_when_1xx_answers_come_first(
    tmp_path: Path, server: ScriptedServer
) -> None:
    spec: dict[str, Any] = {"message_path": "/informational", "health_path": "/informational"}
    async with rig_for(tmp_path, server, **spec) as rig:
        result = await rig.deliver({"n": 1})
        assert result["status"] == "delivered"
        assert result["reply"] == "final"
        assert (await rig.probe()).ok


# --------------------------------------------------------------------------- broken answers


async def test_proxy_answers_502_naming_agent_when_status_line_is_garbage(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, headers, body = await rig.proxy("GET", "/garbage")
        assert status == 502
        assert headers["Content-Type"] == "application/json"
        error = json.loads(body)
        assert error["agent"] == "agent"
        assert error["state"] == "running"
        assert "invalid HTTP" in error["error"]


async def test_delivery_and_probe_fail_when_status_line_is_garbage(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/garbage") as rig:
        message = await rig.deliver_failing({"n": 1})
        assert message["status"] == "queued"  # retried later: no HTTP answer came
        assert "invalid HTTP" in message["error"]
        probe = await rig.probe("/garbage")
        assert not probe.ok
        assert probe.status is None
        assert "invalid HTTP" in probe.detail


async def test_proxy_answers_504_when_agent_accepts_and_never_answers(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        rig.app.proxy.answer_timeout = 0.3
        status, _, body = await rig.proxy("GET", "/silent")
        assert status == 504
        error = json.loads(body)
        assert error["agent"] == "agent"
        assert "within 0.3s" in error["error"]


async def test_delivery_and_probe_time_out_when_agent_accepts_and_never_answers(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/silent") as rig:
        rig.engine.dispatcher.delivery_timeout = 0.3
        message = await rig.deliver_failing({"n": 1})
        assert "within 0.3s" in message["error"]
        probe = await rig.probe("/silent", timeout=0.3)
        assert not probe.ok
        assert probe.detail == "no answer within 0.3s"


async def test_proxy_answers_502_when_response_head_exceeds_64_kib(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, _, body = await rig.proxy("GET", "/head-too-big")
        assert status == 502
        assert str(MAX_HEAD_SIZE) in body.decode() or "too long" in body.decode()
        status, headers, _ = await rig.proxy("GET", "/head-big")  # 40 KiB: allowed
        assert status == 200
        assert headers["X-Pad-39"] == "x" * 1000


async def test_delivery_and_probe_fail_when_response_head_exceeds_64_kib(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/head-too-big") as rig:
        message = await rig.deliver_failing({"n": 1})
        assert "no answer from the agent" in message["error"]
        assert not (await rig.probe("/head-too-big")).ok
        assert (await rig.probe("/head-big")).ok


async def test_proxy_cuts_client_response_when_agent_closes_mid_body(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        with pytest.raises(aiohttp.ClientPayloadError):
            await rig.proxy("GET", "/cut")


async def test_delivery_and_probe_fail_when_agent_closes_mid_body(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/cut") as rig:
        message = await rig.deliver_failing({"n": 1})
        assert "without sending complete message body" in message["error"]
        probe = await rig.probe("/cut")
        assert not probe.ok


# --------------------------------------------------------------------------- no body


async def test_proxy_reuses_connection_when_head_answer_has_content_length(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, headers, body = await rig.proxy("HEAD", "/head-length")
        assert status == 200
        assert headers["Content-Length"] == "1000"
        assert body == b""
        status, _, _ = await rig.proxy("HEAD", "/head-length")
        assert status == 200
        assert len(set(connections_of(server, "/head-length"))) == 1  # no body was awaited


@pytest.mark.parametrize(("path", "status"), [("/no-content", 204), ("/not-modified", 304)])
async def test_proxy_relays_no_body_and_reuses_connection_when_status_has_none(
    tmp_path: Path, server: ScriptedServer, path: str, status: int
) -> None:
    async with rig_for(tmp_path, server) as rig:
        for _ in range(2):
            got, _, body = await rig.proxy("GET", path)
            assert got == status
            assert body == b""
        assert len(set(connections_of(server, path))) == 1


async def test_delivery_succeeds_with_empty_reply_when_agent_answers_204(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/no-content") as rig:
        result = await rig.deliver({"n": 1})
        assert result["status"] == "delivered"
        assert result["reply"] is None


# --------------------------------------------------------------------------- close framing


@pytest.mark.parametrize("path", ["/close-delimited", "/http10"])
async def test_proxy_relays_whole_body_when_body_ends_at_connection_close(
    tmp_path: Path, server: ScriptedServer, path: str
) -> None:
    async with rig_for(tmp_path, server) as rig:
        status, _, body = await rig.proxy("GET", path)
        assert status == 200
        assert body == (CLOSE_DELIMITED if path == "/close-delimited" else b'"old"')


async def test_delivery_and_probe_succeed_when_body_ends_at_connection_close(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/http10", health_path="/http10") as rig:
        result = await rig.deliver({"n": 1})
        assert result["reply"] == "old"
        assert (await rig.probe()).ok


async def test_proxy_opens_new_connection_when_agent_answers_connection_close(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        for _ in range(3):
            status, headers, body = await rig.proxy("GET", "/connection-close")
            assert status == 200
            assert body == b'"bye"'
            assert "Connection" not in headers or headers["Connection"] != "close"
        assert len(set(connections_of(server, "/connection-close"))) == 3


async def test_proxy_and_delivery_use_new_connection_when_agent_closed_idle_one(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/idle-close") as rig:
        status, _, _ = await rig.proxy("GET", "/idle-close")
        assert status == 200
        # The agent closed it after answering (as at its idle timeout): the pool sees it.
        await wait_until(lambda: rig.client.idle_connections == 0, timeout=10, what="drop")
        status, _, _ = await rig.proxy("GET", "/idle-close")
        assert status == 200
        result = await rig.deliver({"n": 1})
        assert result["status"] == "delivered"
        assert result["attempts"] == 1
        assert len(set(connections_of(server, "/idle-close"))) == 3


async def test_proxy_replays_idempotent_request_only_when_pooled_connection_was_dropped(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        for _ in range(2):
            status, _, body = await rig.proxy("GET", "/race")
            assert status == 200
            assert body == b'"answered"'
        gets = server.requests("/race")
        # (connection 1 carried the readiness probe) the second GET met the keep-alive
        # race (dropped unanswered), then went again on a new connection
        assert [(s.connection, s.index) for s in gets] == [(2, 0), (2, 1), (3, 0)]
        status, _, body = await rig.proxy("POST", "/race", data=b"once")
        assert status == 502  # may have reached the agent: a POST is never sent twice
        assert "closed the connection before answering" in body.decode()
        posts = [s for s in server.requests("/race") if s.method == "POST"]
        assert [(s.connection, s.index) for s in posts] == [(3, 1)]


async def test_delivery_records_a_second_attempt_when_pooled_connection_was_dropped(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server, message_path="/race") as rig:
        assert (await rig.deliver({"n": 1}))["attempts"] == 1
        result = await rig.deliver({"n": 2})  # meets the race: not replayed silently...
        assert result["status"] == "delivered"
        assert result["attempts"] == 2  # ...the lane retries it, and says so
        assert len(server.requests("/race")) == 3


async def test_proxy_opens_new_connection_when_keep_alive_timeout_has_passed(
    tmp_path: Path, server: ScriptedServer
) -> None:
    clock = ManualClock()
    async with rig_for(tmp_path, server, client=HttpAgentClient(clock=clock)) as rig:
        await rig.proxy("GET", "/keep-alive")
        clock.now += 3.5  # within "Keep-Alive: timeout=5" (less the 1 s margin)
        await rig.proxy("GET", "/keep-alive")
        clock.now += 4.5  # past it, though the server still holds the connection
        await rig.proxy("GET", "/keep-alive")
        assert connections_of(server, "/keep-alive") == [2, 2, 3]  # 1: the readiness probe
        await rig.proxy("GET", "/chunked")  # no Keep-Alive header: IDLE_TIMEOUT applies
        clock.now += IDLE_TIMEOUT - 0.5
        await rig.proxy("GET", "/chunked")
        clock.now += IDLE_TIMEOUT + 0.5
        await rig.proxy("GET", "/chunked")
        assert connections_of(server, "/chunked") == [3, 3, 4]


# --------------------------------------------------------------------------- Expect


async def _raw_post(url: str, path: str, body: bytes) -> tuple[list[h11.Event], bytes]:
    """POST with ``Expect: 100-continue`` over a raw socket to Roost: the events seen
    before sending the body (read with h11), and the final answer's body."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=f"/agents/agent{path}",
        headers=[
            ("Host", "roost"),
            ("Content-Length", str(len(body))),
            ("Expect", "100-continue"),
        ],
    )
    writer.write(client.send(request) or b"")
    events: list[h11.Event] = []
    received = b""
    try:
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await asyncio.wait_for(reader.read(65536), timeout=10))
                continue
            if isinstance(event, h11.InformationalResponse):
                events.append(event)
                writer.write(client.send(h11.Data(data=body)) or b"")
                writer.write(client.send(h11.EndOfMessage()) or b"")
            elif isinstance(event, h11.Response):
                events.append(event)
            elif isinstance(event, h11.Data):
                received += event.data
            else:
                return events, received
    finally:
        writer.close()


async def test_proxy_sends_body_after_agents_100_continue_when_client_expects_it(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        events, body = await _raw_post(rig.url, "/expect", b"payload")
        assert [type(e).__name__ for e in events] == ["InformationalResponse", "Response"]
        assert body == b"got it"
        seen = server.requests("/expect")[-1]
        assert seen.headers["expect"] == "100-continue"
        assert seen.body == b"payload"


async def test_proxy_relays_refusal_without_reading_body_when_agent_answers_first(
    tmp_path: Path, server: ScriptedServer
) -> None:
    async with rig_for(tmp_path, server) as rig:
        events, body = await _raw_post(rig.url, "/refuse", b"never sent")
        # No 100 Continue from Roost: the client's body was never asked for.
        assert [type(e).__name__ for e in events] == ["Response"]
        assert isinstance(events[0], h11.Response)
        assert events[0].status_code == 401
        assert body == b"no"
        assert server.requests("/refuse")[-1].headers["expect"] == "100-continue"
