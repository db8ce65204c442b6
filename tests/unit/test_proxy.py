"""The reverse proxy ``/agents/{name}/{path}``, served by a real uvicorn in-process.

The engine runs on ``FakeRuntime``; the "agent" behind it is a small aiohttp
server on this host: ``MappedRuntime`` reports that server's port as every
container's published port, so the proxy's HTTP hop is real while the
lifecycle is fake (and can be slowed down or made to fail at will).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from roost import errors
from roost.adapters.http_agent_client import HttpAgentClient
from roost.core import events as ev
from roost.core.states import AgentState
from roost.edge import create_app
from roost.engine import Engine
from roost.reactor.supervising import AgentActor
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings, site_port, wait_until
from tests.support import served

IMAGE = "roost-mimic:latest"
TOKEN = "proxy-s3cret"
S = AgentState
#: Larger than the upstream client's read high-water mark (pauses and resumes reading).
BIG_BODY = bytes(range(256)) * (5 * 4096)


# --------------------------------------------------------------------------- the agent


class AgentServer:
    """The HTTP app standing in for the agent inside the container."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.release_stream = asyncio.Event()
        self.stream_ended = asyncio.Event()
        self.first_upload_chunk = asyncio.Event()
        self.websocket_closed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        app.router.add_get("/stream", self._stream)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/hop", self._hop)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/big", self._big)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site_port(site)

    @property
    def connections(self) -> int:
        """Distinct client connections the echo requests came over."""
        return len({str(r["peer"]) for r in self.requests})

    async def stop(self) -> None:
        self.release_stream.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode(errors="replace"),
        }
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.requests.append({**seen, "peer": peer})
        return web.json_response(seen)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """first, then (``?tick``) a tick every 20 ms, then second once released."""
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            await response.write(b"first\n")
            while "tick" in request.query and not self.release_stream.is_set():
                await asyncio.sleep(0.02)  # a writing agent notices a closed connection
                await response.write(b"tick\n")
            await self.release_stream.wait()
            await response.write(b"second\n")
            await response.write_eof()
        finally:
            self.stream_ended.set()
        return response

    async def _big(self, request: web.Request) -> web.Response:
        return web.Response(body=BIG_BODY, content_type="application/octet-stream")

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"hello " * 100),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def _hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "keep-alive, X-Agent-Hop",
                "X-Agent-Hop": "1",
                "Keep-Alive": "timeout=5",
                "X-Kept": "yes",
            },
        )

    async def _upload(self, request: web.Request) -> web.Response:
        total = 0
        chunks = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            chunks += 1
            self.first_upload_chunk.set()
        return web.json_response(
            {"bytes": total, "chunked": request.headers.get("Transfer-Encoding")}
        )

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    if message.data == "bye":
                        await ws.close(code=4001, message=b"agent says bye")
                        break
                    await ws.send_str("echo:" + message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(message.data[::-1])
        finally:
            self.websocket_closed.set()
        return ws


class MappedRuntime(FakeRuntime):
    """FakeRuntime whose containers publish the test agent's real port.

    ``start_gate``: starts wait for it; ``start_error``: starts raise it.
    """

    def __init__(self, agent_port: int) -> None:
        super().__init__(images=[IMAGE])
        self.endpoints[IMAGE] = agent_port
        self.start_gate: asyncio.Event | None = None
        self.start_error: errors.RoostError | None = None

    async def start(self, container_id: str) -> None:
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.start_error is not None:
            raise self.start_error
        await super().start(container_id)


# --------------------------------------------------------------------------- serving


@dataclasses.dataclass
class Harness:
    engine: Engine
    runtime: MappedRuntime
    agent: AgentServer
    url: str
    session: aiohttp.ClientSession

    @property
    def actor(self) -> AgentActor:
        return self.engine.supervisor.actor("echo")

    def state(self) -> S:
        return self.engine.supervisor.get("echo").state

    async def start_agent(self) -> None:
        await self.engine.supervisor.ensure_running("echo", timeout=10)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.engine.events.recent(1000)]


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    token: str | None = None,
    defaults: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> AsyncIterator[Harness]:
    agent = AgentServer()
    await agent.start()
    settings = make_settings(
        tmp_path,
        "proxy-test",
        agents={"echo": {"image": IMAGE}},
        defaults={"liveness_interval": 3600, **(defaults or {})},
        server=server or {},
    )
    runtime = MappedRuntime(agent.port)
    engine = Engine(settings, runtime=runtime, agent_client=HttpAgentClient())
    try:
        async with engine:
            app = create_app(engine, token=token)
            async with served(app) as url, aiohttp.ClientSession() as session:
                yield Harness(engine, runtime, agent, url, session)
    finally:
        await agent.stop()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as running:
        yield running


async def get_json(
    h: Harness, path: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], dict[str, Any]]:
    """Status, headers (case-insensitive) and JSON body of a GET."""
    async with h.session.get(h.url + path, **kwargs) as response:
        return response.status, response.headers.copy(), await response.json()


def headers_of(seen: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in seen["headers"]}


# --------------------------------------------------------------------------- routing


async def test_proxy_forwards_method_path_query_and_body_when_agent_running(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    async with proxy.session.patch(
        URL(proxy.url + "/agents/echo/echo/a%20b/c?x=1&y=%2F", encoded=True),
        data=b'{"hi": 1}',
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["method"] == "PATCH"
    assert seen["path"] == "/echo/a%20b/c?x=1&y=%2F"
    assert seen["body"] == '{"hi": 1}'
    assert headers_of(seen)["content-type"] == "application/json"
    assert response.headers["Roost-Cold-Start"] == "none"
    assert response.headers["Roost-Wake-Ms"] == "0"


async def test_proxy_leaves_other_paths_to_the_api_when_path_is_not_under_agents(
    proxy: Harness,
) -> None:
    status, _, body = await get_json(proxy, "/healthz")
    assert status == 200
    assert body["ok"] is True


async def test_proxy_answers_404_json_when_agent_unknown(proxy: Harness) -> None:
    status, headers, body = await get_json(proxy, "/agents/nobody/echo/x")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert body == {"error": "no agent named 'nobody'", "agent": "nobody"}
    assert proxy.state() is S.CREATED


async def test_proxy_wakes_and_holds_request_when_agent_created(proxy: Harness) -> None:
    proxy.runtime.start_gate = asyncio.Event()
    request = asyncio.create_task(get_json(proxy, "/agents/echo/echo/held"))
    await wait_until(lambda: proxy.state() is S.STARTING, timeout=10, what="agent starting")
    assert not request.done()
    proxy.runtime.start_gate.set()
    status, headers, body = await asyncio.wait_for(request, timeout=10)
    assert status == 200
    assert body["path"] == "/echo/held"
    assert headers["Roost-Cold-Start"] == "created"
    assert int(headers["Roost-Wake-Ms"]) >= 1
    assert proxy.state() is S.RUNNING


async def test_proxy_reports_paused_cold_start_when_agent_paused(proxy: Harness) -> None:
    await proxy.start_agent()
    await proxy.engine.supervisor.request("echo", ev.PauseRequested("test"))
    status, headers, _ = await get_json(proxy, "/agents/echo/echo/x")
    assert status == 200
    assert headers["Roost-Cold-Start"] == "paused"
    assert proxy.state() is S.RUNNING


async def test_proxy_reports_stopped_cold_start_when_agent_stopped(proxy: Harness) -> None:
    await proxy.start_agent()
    await proxy.engine.supervisor.request("echo", ev.StopRequested("test"))
    status, headers, _ = await get_json(proxy, "/agents/echo/echo/x")
    assert status == 200
    assert headers["Roost-Cold-Start"] == "stopped"


async def test_proxy_answers_503_with_retry_after_when_hold_timeout_passes(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, defaults={"hold_timeout": 0.2}) as h:
        h.runtime.start_gate = asyncio.Event()  # never opened: the start hangs
        status, headers, body = await get_json(h, "/agents/echo/echo/x")
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert body["agent"] == "echo"
        assert body["state"] == "starting"
        assert "hold_timeout" in body["error"]


async def test_proxy_answers_502_naming_agent_and_state_when_start_fails_while_held(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, defaults={"max_restarts": 0}) as h:
        h.runtime.start_error = errors.ContainerError("the engine refused")
        status, _, body = await get_json(h, "/agents/echo/echo/x")
        assert status == 502
        assert body["agent"] == "echo"
        assert body["state"] == "failed"
        assert "echo" in body["error"]


async def test_proxy_answers_502_without_waking_when_agent_failed(tmp_path: Path) -> None:
    async with harness(tmp_path, defaults={"max_restarts": 0}) as h:
        h.runtime.start_error = errors.ContainerError("the engine refused")
        with contextlib.suppress(errors.RoostError):
            await h.engine.supervisor.ensure_running("echo", timeout=5)
        assert h.state() is S.FAILED
        starts = sum(1 for call in h.runtime.calls if call[0] == "start")
        status, _, body = await get_json(h, "/agents/echo/echo/x")
        assert status == 502
        assert body == {
            "error": "agent 'echo' is failed; reset it first",
            "agent": "echo",
            "state": "failed",
        }
        assert sum(1 for call in h.runtime.calls if call[0] == "start") == starts


async def test_proxy_answers_502_json_when_upstream_refuses_connection(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.start_agent()
        await h.agent.stop()  # the app is gone, the container (as far as Roost knows) runs
        status, _, body = await get_json(h, "/agents/echo/echo/x")
        assert status == 502
        assert body["agent"] == "echo"
        assert body["state"] == "running"
        assert "did not answer" in body["error"]


async def test_proxy_announces_waking_once_when_hold_exceeds_notice_after(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, defaults={"waking_notice_after": 0.05}) as h:
        h.runtime.start_gate = asyncio.Event()
        request = asyncio.create_task(get_json(h, "/agents/echo/echo/x"))
        await wait_until(lambda: "agent.waking" in h.kinds(), timeout=10, what="agent.waking")
        h.runtime.start_gate.set()
        status, _, _ = await asyncio.wait_for(request, timeout=10)
        assert status == 200
        notices = [e for e in h.engine.events.recent(1000) if e.kind == "agent.waking"]
        assert len(notices) == 1
        assert notices[0].data["agent"] == "echo"
        assert notices[0].data["state"] == "created"
        assert notices[0].data["waited_ms"] >= 50


async def test_proxy_announces_nothing_when_wake_is_quicker_than_notice_after(
    proxy: Harness,
) -> None:
    status, headers, _ = await get_json(proxy, "/agents/echo/echo/x")
    assert status == 200
    assert headers["Roost-Cold-Start"] == "created"
    assert "agent.waking" not in proxy.kinds()


# --------------------------------------------------------------------------- headers


async def test_proxy_drops_hop_by_hop_request_headers_and_adds_forwarding_when_forwarding(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    status, _, seen = await get_json(
        proxy,
        "/agents/echo/echo/h",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Upgrade": "h2c",
            "X-Forwarded-For": "10.0.0.1",
            "X-Kept": "1",
        },
    )
    assert status == 200
    headers = headers_of(seen)
    for hop in ("x-client-hop", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in headers, hop
    assert headers.get("connection", "keep-alive").lower() == "keep-alive"  # aiohttp's own
    assert headers["x-kept"] == "1"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == proxy.url.removeprefix("http://")
    assert headers["x-forwarded-prefix"] == "/agents/echo"
    assert headers["host"] == f"127.0.0.1:{proxy.agent.port}"
    assert "user-agent" in headers  # the client's own (aiohttp's), passed through


async def test_proxy_drops_hop_by_hop_response_headers_when_relaying(proxy: Harness) -> None:
    await proxy.start_agent()
    async with proxy.session.get(proxy.url + "/agents/echo/hop") as response:
        assert response.status == 200
        assert await response.text() == "ok"
        assert response.headers["X-Kept"] == "yes"
        assert "X-Agent-Hop" not in response.headers
        assert "Keep-Alive" not in response.headers
        assert response.headers.getall("Server") == ["uvicorn"]
        assert len(response.headers.getall("Date")) == 1


async def test_proxy_relays_compressed_body_untouched_when_agent_answers_gzip(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    async with proxy.session.get(proxy.url + "/agents/echo/gzip", auto_decompress=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == b"hello " * 100


async def test_proxy_answers_413_when_declared_body_exceeds_max_body_size(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, server={"max_body_size": 1000}) as h:
        async with h.session.post(h.url + "/agents/echo/echo/x", data=b"x" * 1001) as response:
            assert response.status == 413
            body = await response.json()
        assert "max_body_size" in body["error"]
        assert h.state() is S.CREATED  # refused before waking anything


async def test_proxy_answers_413_when_streamed_body_grows_past_max_body_size(
    tmp_path: Path,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 400

    async with harness(tmp_path, server={"max_body_size": 1000}) as h:
        await h.start_agent()
        async with h.session.post(h.url + "/agents/echo/upload", data=chunks()) as response:
            assert response.status == 413
            assert "max_body_size" in (await response.json())["error"]


# --------------------------------------------------------------------------- auth


async def test_proxy_answers_401_when_token_missing_or_wrong(tmp_path: Path) -> None:
    async with harness(tmp_path, token=TOKEN) as h:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Roost-Token": "nope"}):
            status, response_headers, body = await get_json(
                h, "/agents/echo/echo/x", headers=headers
            )
            assert status == 401
            assert response_headers["WWW-Authenticate"] == "Bearer"
            assert "token" in body["error"]
        assert h.state() is S.CREATED


async def test_proxy_strips_authorization_when_it_carried_roosts_token(tmp_path: Path) -> None:
    async with harness(tmp_path, token=TOKEN) as h:
        status, _, seen = await get_json(
            h, "/agents/echo/echo/x", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
        assert "authorization" not in headers_of(seen)


async def test_proxy_forwards_authorization_when_roost_token_header_used(tmp_path: Path) -> None:
    async with harness(tmp_path, token=TOKEN) as h:
        status, _, seen = await get_json(
            h,
            "/agents/echo/echo/x",
            headers={"Roost-Token": TOKEN, "Authorization": "Bearer agents-own"},
        )
        assert status == 200
        headers = headers_of(seen)
        assert headers["authorization"] == "Bearer agents-own"
        assert "roost-token" not in headers


async def test_proxy_forwards_authorization_untouched_when_no_token_configured(
    proxy: Harness,
) -> None:
    status, _, seen = await get_json(
        proxy, "/agents/echo/echo/x", headers={"Authorization": "Bearer agents-own"}
    )
    assert status == 200
    assert headers_of(seen)["authorization"] == "Bearer agents-own"


# --------------------------------------------------------------------------- streaming


async def test_proxy_streams_request_body_before_it_ends_when_upload_is_chunked(
    proxy: Harness,
) -> None:
    await proxy.start_agent()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # Only a streaming proxy lets the agent see this before the upload ends.
        await asyncio.wait_for(proxy.agent.first_upload_chunk.wait(), timeout=10)
        yield b"b" * 1000

    async with proxy.session.post(proxy.url + "/agents/echo/upload", data=chunks()) as response:
        assert response.status == 200
        assert (await response.json())["bytes"] == 2000


async def test_proxy_streams_response_chunks_before_it_ends_when_agent_streams(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    async with proxy.session.get(proxy.url + "/agents/echo/stream") as response:
        assert response.status == 200
        assert response.headers["Roost-Cold-Start"] == "none"
        first = await asyncio.wait_for(response.content.readline(), timeout=10)
        assert first == b"first\n"
        assert proxy.actor.is_busy  # an open stream is activity
        proxy.agent.release_stream.set()
        assert await response.content.read() == b"second\n"
    await wait_until(lambda: not proxy.actor.is_busy, timeout=10, what="busy released")


async def test_proxy_ends_upstream_stream_when_client_disconnects(proxy: Harness) -> None:
    await proxy.start_agent()
    async with proxy.session.get(proxy.url + "/agents/echo/stream?tick") as response:
        assert await asyncio.wait_for(response.content.readline(), timeout=10) == b"first\n"
        response.close()  # drop the connection mid-stream
    await asyncio.wait_for(proxy.agent.stream_ended.wait(), timeout=10)
    await wait_until(lambda: not proxy.actor.is_busy, timeout=10, what="busy released")


async def test_proxy_marks_idle_agent_running_when_request_is_proxied(tmp_path: Path) -> None:
    async with harness(tmp_path, defaults={"idle_mark_after": 0.05}) as h:
        await h.start_agent()
        await wait_until(lambda: h.state() is S.IDLE, timeout=10, what="agent idle")
        status, headers, _ = await get_json(h, "/agents/echo/echo/x")
        assert status == 200
        assert headers["Roost-Cold-Start"] == "none"  # idle is awake: nothing to wake

        async def woken_by_activity() -> bool:
            history = await h.engine.store.history("echo", limit=100)
            steps = [(e.change.from_state, e.change.to_state, e.change.reason) for e in history]
            return (S.IDLE, S.RUNNING, "activity") in steps

        # touch() posts the activity to the agent's actor, which records it soon after.
        await wait_until(woken_by_activity, timeout=10, what="idle -> running on activity")


# --------------------------------------------------------------------------- websocket


async def test_proxy_relays_websocket_messages_both_ways_when_agent_running(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    ws_url = proxy.url.replace("http://", "ws://") + "/agents/echo/ws"
    async with proxy.session.ws_connect(ws_url) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "echo:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive(timeout=10)).data == b"\x03\x02\x01"
        assert proxy.actor.is_busy  # an open WebSocket is activity
    await asyncio.wait_for(proxy.agent.websocket_closed.wait(), timeout=10)
    await wait_until(lambda: not proxy.actor.is_busy, timeout=10, what="busy released")


async def test_proxy_wakes_agent_for_websocket_when_agent_created(proxy: Harness) -> None:
    ws_url = proxy.url.replace("http://", "ws://") + "/agents/echo/ws"
    async with proxy.session.ws_connect(ws_url) as ws:
        await ws.send_str("wake")
        assert (await ws.receive(timeout=10)).data == "echo:wake"
    assert proxy.state() is S.RUNNING


async def test_proxy_closes_client_websocket_with_agents_code_when_agent_closes(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    ws_url = proxy.url.replace("http://", "ws://") + "/agents/echo/ws"
    async with proxy.session.ws_connect(ws_url) as ws:
        await ws.send_str("bye")
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001 or message.data == 4001
    await wait_until(lambda: not proxy.actor.is_busy, timeout=10, what="busy released")


async def test_proxy_refuses_websocket_with_404_when_agent_unknown(proxy: Harness) -> None:
    ws_url = proxy.url.replace("http://", "ws://") + "/agents/nobody/ws"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await proxy.session.ws_connect(ws_url)
    assert refused.value.status == 404


async def test_proxy_refuses_websocket_with_401_when_token_missing(tmp_path: Path) -> None:
    async with harness(tmp_path, token=TOKEN) as h:
        ws_url = h.url.replace("http://", "ws://") + "/agents/echo/ws"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await h.session.ws_connect(ws_url)
        assert refused.value.status == 401
        async with h.session.ws_connect(ws_url, headers={"Roost-Token": TOKEN}) as ws:
            await ws.send_str("in")
            assert (await ws.receive(timeout=10)).data == "echo:in"


# --------------------------------------------------------------------------- HTTP edges


async def test_proxy_relays_large_body_intact_when_answer_exceeds_read_buffer(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    async with proxy.session.get(proxy.url + "/agents/echo/big") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(BIG_BODY)
        assert await response.read() == BIG_BODY


async def test_proxy_answers_head_without_body_when_method_is_head(proxy: Harness) -> None:
    await proxy.start_agent()
    for _ in range(2):  # the second reuses the connection: a HEAD answer has no body
        async with proxy.session.head(proxy.url + "/agents/echo/big") as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == len(BIG_BODY)
            assert await response.read() == b""


async def test_proxy_passes_expect_continue_to_agent_when_client_sends_it(
    proxy: Harness,
) -> None:
    await proxy.start_agent()
    async with proxy.session.post(
        proxy.url + "/agents/echo/echo/e", data=b"payload", expect100=True
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["body"] == "payload"  # sent once the agent (aiohttp) said 100 Continue
    assert headers_of(seen)["expect"] == "100-continue"


async def test_proxy_reuses_upstream_connection_when_requests_follow(proxy: Harness) -> None:
    await proxy.start_agent()
    for _ in range(5):
        status, _, _ = await get_json(proxy, "/agents/echo/echo/k")
        assert status == 200
    assert len(proxy.agent.requests) == 5
    assert proxy.agent.connections == 1
