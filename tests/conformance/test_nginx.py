"""nginx as the agent, in a real container (roost-nginx, built from Debian's nginx):
keep-alive with ``Keep-Alive: timeout=2`` and ``keepalive_requests 3``, chunked
answers (SSI), 204, HEAD and 304; through the proxy, message delivery and probes.

nginx tells which connection answered (``X-Connection``) and how many requests it
has carried (``X-Connection-Requests``), so reuse is seen from the server's side.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.adapters.http_agent_client import HttpAgentClient
from tests.conformance.conftest import ManualClock, Rig, docker_rig

pytestmark = pytest.mark.docker

SPEC = {"port": 8000}


@contextlib.asynccontextmanager
async def nginx(
    tmp_path: Path, instance: str, images: dict[str, str], **spec: Any
) -> AsyncIterator[Rig]:
    async with docker_rig(tmp_path, instance, image=images["nginx"], **{**SPEC, **spec}) as rig:
        await rig.running()  # readiness: GET /health, Content-Length, keep-alive
        yield rig


async def test_probe_is_ok_across_connection_close_when_nginx_keeps_it_alive(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with nginx(tmp_path, instance, docker_images) as rig:
        for _ in range(4):  # readiness + 2 on one connection (nginx closes it), then a new one
            result = await rig.probe()
            assert result.ok
            assert result.status == 200
        # Counted at the published port the probes went to: Roost's own requests may
        # also hold one to the container's own address (roost.reactor.addressing).
        url = rig.engine.agents.get("agent").url
        assert url is not None
        assert rig.client.idle_connections_to(url) == 1


async def test_delivery_gets_reply_when_nginx_answers_with_length_or_chunked(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with nginx(tmp_path, instance, docker_images) as rig:
        result = await rig.deliver({"n": 1})
        assert result["reply"] == {"agent": "nginx"}  # Content-Length
    async with nginx(tmp_path, instance, docker_images, message_path="/ssi/reply.json") as rig:
        result = await rig.deliver({"n": 2})
        assert result["reply"] == {"agent": "nginx", "chunked": True}  # chunked (SSI)


async def test_proxy_relays_every_framing_when_nginx_answers(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with nginx(tmp_path, instance, docker_images) as rig:
        status, headers, body = await rig.proxy("GET", "/ssi/page.txt")
        assert (status, body) == (200, b"chunked by nginx\n")
        assert "Content-Length" not in headers  # nginx sent it chunked; so does Roost
        status, headers, body = await rig.proxy("HEAD", "/static.txt")
        assert (status, body) == (200, b"")
        length = int(headers["Content-Length"])
        assert length > 0
        status, _, body = await rig.proxy(
            "GET", "/static.txt", headers={"If-None-Match": headers["ETag"]}
        )
        assert (status, body) == (304, b"")
        status, _, body = await rig.proxy("GET", "/empty")
        assert (status, body) == (204, b"")
        status, _, body = await rig.proxy("GET", "/static.txt")
        assert status == 200
        assert len(body) == length


async def test_proxy_streams_chunked_upload_to_nginx_when_client_streams(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    payload = bytes(range(256)) * 3000  # 750 KiB: under server.max_body_size

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    async with nginx(tmp_path, instance, docker_images) as rig:
        status, _, _ = await rig.proxy("PUT", "/dav/up/load.bin", data=chunks())
        assert status == 201
        status, _, body = await rig.proxy("GET", "/dav/up/load.bin")
        assert status == 200
        assert body == payload


async def test_proxy_opens_new_connection_when_nginx_says_close_after_3_requests(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    async with nginx(tmp_path, instance, docker_images) as rig:
        seen = []
        for _ in range(7):
            status, headers, _ = await rig.proxy("GET", "/health")
            assert status == 200
            seen.append((headers["X-Connection"], int(headers["X-Connection-Requests"])))
        for (connection, count), (after, after_count) in itertools.pairwise(seen):
            if count == 3:  # nginx said "Connection: close" with this answer
                assert (after, after_count) != (connection, count + 1)
                assert after_count == 1
            else:
                assert (after, after_count) == (connection, count + 1)


async def test_proxy_drops_connection_when_nginx_keep_alive_timeout_passed(
    tmp_path: Path, instance: str, docker_images: dict[str, str]
) -> None:
    clock = ManualClock()
    client = HttpAgentClient(clock=clock)

    async def get(rig: Rig) -> tuple[str, int]:
        status, headers, _ = await rig.proxy("GET", "/static.txt")
        assert status == 200
        return headers["X-Connection"], int(headers["X-Connection-Requests"])

    async with nginx(tmp_path, instance, docker_images, client=client) as rig:
        for _ in range(3):  # use up the connection readiness opened (3 requests each)
            if (await get(rig))[1] == 3:
                break
        connection, count = await get(rig)
        assert count == 1
        clock.now += 0.5  # within "Keep-Alive: timeout=2", less the client's 1 s margin
        assert await get(rig) == (connection, 2)
        clock.now += 1.5  # past it; nginx itself would keep the connection for 60 s
        later, count = await get(rig)
        assert later != connection
        assert count == 1
