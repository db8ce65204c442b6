"""busybox ``httpd`` with CGI scripts as the agent, in a real container: every
answer is close-delimited (the CGI's output, then the connection closes), through
the proxy, message delivery and probes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.conftest import NAME, Rig, docker_rig

pytestmark = pytest.mark.docker

MIB = 1024 * 1024
#: CGI scripts by name (served as /cgi-bin/NAME); they reach the container as env.
CGI = {
    "health": "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'",
    "messages": (
        '#!/bin/sh\nbody=$(head -c "$CONTENT_LENGTH")\n'
        "printf 'Content-Type: application/json\\r\\n\\r\\n'\n"
        'printf \'{"echo": %s, "server": "busybox"}\' "$body"'
    ),
    # First line at once, the second only after /cgi-bin/release: streamed output.
    "stream": (
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho first\n"
        "while [ ! -e /tmp/released ]; do usleep 20000; done\necho second"
    ),
    "release": "#!/bin/sh\ntouch /tmp/released\nprintf 'Content-Type: text/plain\\r\\n\\r\\nreleased'",
    "big": f"#!/bin/sh\nprintf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\nhead -c {MIB} /dev/zero",
    "upload": (
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n"
        'head -c "$CONTENT_LENGTH" | wc -c'
    ),
}
WRITE_SCRIPTS = " && ".join(
    f"printf '%s\\n' \"$CGI_{name.upper()}\" > /www/cgi-bin/{name}" for name in CGI
)
SPEC: dict[str, Any] = {
    "port": 8000,
    "health_path": "/cgi-bin/health",
    "message_path": "/cgi-bin/messages",
    "env": {f"CGI_{name.upper()}": script for name, script in CGI.items()},
    "command": [
        "sh",
        "-c",
        f"mkdir -p /www/cgi-bin && {WRITE_SCRIPTS} && chmod 755 /www/cgi-bin/* "
        "&& exec httpd -f -p 8000 -h /www",
    ],
}


@pytest.fixture
async def rig(tmp_path: Path, instance: str, docker_images: dict[str, str]) -> AsyncIterator[Rig]:
    async with docker_rig(tmp_path, instance, image=docker_images["busybox"], **SPEC) as running:
        yield running


async def test_probe_is_ok_when_cgi_health_answer_ends_at_close(rig: Rig) -> None:
    record = await rig.running()  # readiness: the CGI's close-delimited 200
    assert record.state.value == "running"
    result = await rig.probe()
    assert result.ok
    assert result.status == 200


async def test_delivery_gets_json_reply_when_cgi_answer_ends_at_close(rig: Rig) -> None:
    result = await rig.deliver({"hello": "cgi"})
    assert result["status"] == "delivered"
    assert result["reply"] == {"echo": {"hello": "cgi"}, "server": "busybox"}


async def test_proxy_relays_whole_body_when_cgi_output_ends_at_close(rig: Rig) -> None:
    status, headers, body = await rig.proxy("GET", "/cgi-bin/big")
    assert status == 200
    assert headers["Content-Type"] == "application/octet-stream"
    assert body == b"\0" * MIB
    status, _, body = await rig.proxy("POST", "/cgi-bin/upload", data=b"u" * 300_000)
    assert status == 200
    assert body.strip() == b"300000"


async def test_proxy_streams_cgi_output_before_it_ends_when_cgi_writes_slowly(rig: Rig) -> None:
    async with rig.http.get(f"{rig.url}/agents/{NAME}/cgi-bin/stream") as response:
        assert response.status == 200
        assert await asyncio.wait_for(response.content.readline(), timeout=30) == b"first\n"
        status, _, body = await rig.proxy("GET", "/cgi-bin/release")
        assert (status, body) == (200, b"released")
        assert await asyncio.wait_for(response.content.read(), timeout=30) == b"second\n"
