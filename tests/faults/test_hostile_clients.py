"""Hostile clients against the real daemon process (``roost up``), not an app in a test.

- Slowloris: hundreds of connections that dribble header lines and never end
  their request head. The daemon cuts each one ``server.header_timeout`` after it
  connected; below ``server.max_connections`` it keeps answering meanwhile,
  beyond it a request is refused at once (503) rather than queued; once the
  dribblers are cut it answers again, without a restart.
- Deeply nested JSON: bodies nested 100 000 levels deep, on every route that
  takes JSON, answer 4xx (never 5xx, never a crash); 128 levels is accepted, 129
  refused; nothing is stored from a refusal; the process stays up and small.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until

from .conftest import FaultReport, PrivateDockerd
from .rig import RoostDaemon, messages, mimic, running_roost, tracebacks

pytestmark = pytest.mark.faults

HEADER_TIMEOUT = 1.0
MAX_CONNECTIONS = 64
DEPTH = 100_000


def _port(daemon: RoostDaemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


async def _dribble(port: int, stop: asyncio.Event) -> tuple[str, float] | None:
    """A slowloris client: a header line every 0.1 s, never the end of the head.
    How the server ended it ("cut", or "refused": 503 beyond the cap) and after how
    many seconds, or None if it never did."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: roost\r\n")
        await writer.drain()
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=0.1)
            except TimeoutError:
                try:
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                except ConnectionError:
                    return "cut", time.monotonic() - began
                continue
            except ConnectionError:
                return "cut", time.monotonic() - began
            if data.startswith(b"HTTP/1.1 503 "):
                return "refused", time.monotonic() - began
            if not data:
                return "cut", time.monotonic() - began
            raise AssertionError(f"a request with no complete head got an answer: {data!r}")
        return None
    finally:
        writer.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
def daemon(tmp_path: Path, private_dockerd: PrivateDockerd) -> RoostDaemon:
    return RoostDaemon(
        tmp_path,
        private_dockerd,
        agents={"echo": mimic()},
        server={"header_timeout": HEADER_TIMEOUT, "max_connections": MAX_CONNECTIONS},
    )


async def test_slowloris_clients_are_cut_off_and_the_daemon_answers_again_when_heads_dribble(
    daemon: RoostDaemon, fault_report: FaultReport
) -> None:
    async with running_roost(daemon) as client:
        port = _port(daemon)
        stop = asyncio.Event()
        # Below the cap: the daemon keeps answering while they dribble.
        few = [asyncio.create_task(_dribble(port, stop)) for _ in range(MAX_CONNECTIONS // 2)]
        latencies = []
        try:
            while not all(task.done() for task in few):
                began = time.monotonic()
                response = await client.get("/healthz")
                latencies.append(time.monotonic() - began)
                assert response.status_code == 200, response.text
        finally:
            stop.set()
        ended = [task.result() for task in few]
        assert all(e is not None and e[0] == "cut" for e in ended), ended
        cut_after = [e[1] for e in ended if e is not None]

        # Far beyond the cap: a request that completes its head meanwhile is refused
        # at once (503: the cap counts connections when a head is complete, so the
        # dribblers themselves are only cut), and once they are cut it passes.
        stop = asyncio.Event()
        many = [asyncio.create_task(_dribble(port, stop)) for _ in range(6 * MAX_CONNECTIONS)]
        refusals: list[float] = []
        try:

            async def refused() -> bool:
                began = time.monotonic()
                status = (await client.get("/healthz")).status_code
                if status == 503:
                    refusals.append(time.monotonic() - began)
                return status == 503

            await wait_until(refused, timeout=30, what="/healthz refused beyond the cap")
            await wait_until(
                lambda: all(task.done() for task in many),
                timeout=30 * HEADER_TIMEOUT,
                what="every slow client cut off",
            )
        finally:
            stop.set()
        outcomes = [task.result() for task in many]
        assert all(o is not None and o[0] == "cut" for o in outcomes), outcomes

        async def answers() -> bool:
            try:
                return (await client.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(answers, timeout=30, what="/healthz after the attack")
    assert daemon.process is not None
    assert daemon.process.returncode == 0, "the daemon did not shut down cleanly"
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)

    fault_report.record(
        f"slow clients below the cap, cut after (s, header_timeout {HEADER_TIMEOUT:g})",
        f"median {statistics.median(cut_after):.2f}, max {max(cut_after):.2f}",
    )
    fault_report.record(
        "/healthz during the attack (s)",
        f"median {statistics.median(latencies):.3f}, max {max(latencies):.3f}",
    )
    fault_report.record(
        f"{len(many)} slow clients at once (cap {MAX_CONNECTIONS}): all cut after (s, median)",
        f"{statistics.median(o[1] for o in outcomes if o is not None):.2f}",
    )
    fault_report.record("/healthz beyond the cap: 503 after (s)", f"{refusals[0]:.3f}")


async def test_deeply_nested_json_is_refused_on_every_route_and_the_daemon_stays_up(
    daemon: RoostDaemon, fault_report: FaultReport
) -> None:
    deep = "[" * DEPTH + "]" * DEPTH
    bodies = {
        "/api/agents/echo/messages": deep,
        "/api/agents": '{"name": "deep", "capabilities": ' + deep + "}",
        "/api/jobs": '{"image": "roost-busybox:latest", "command": ' + deep + "}",
        "/api/agents/echo/leases": '{"ttl": ' + deep + "}",
    }
    headers = {"content-type": "application/json"}
    async with running_roost(daemon) as client:
        assert daemon.process is not None
        rss_before = _rss_kib(daemon.process.pid)
        answers: dict[str, int] = {}
        for path, body in bodies.items():
            for _ in range(5):
                response = await client.post(path, content=body, headers=headers)
                assert 400 <= response.status_code < 500, (path, response.status_code)
                answers[path] = response.status_code
        limit = await client.post(
            "/api/agents/echo/messages", content="[" * 128 + "]" * 128, headers=headers
        )
        beyond = await client.post(
            "/api/agents/echo/messages", content="[" * 129 + "]" * 129, headers=headers
        )
        assert limit.status_code == 202, limit.text
        assert beyond.status_code == 400, beyond.text
        stored = await messages(client, "echo")
        assert list(stored) == [limit.json()["id"]]
        assert (await client.get("/api/agents/deep")).status_code == 404
        assert (await client.get("/api/jobs")).json()["jobs"] == []
        assert (await client.get("/healthz")).status_code == 200
        rss_after = _rss_kib(daemon.process.pid)
    assert tracebacks(daemon.lines()) == [], daemon.tail(80)
    fault_report.record(f"answers to {DEPTH}-deep bodies", answers)
    fault_report.record(
        "daemon RSS before / after (MiB)", f"{rss_before / 1024:.0f} / {rss_after / 1024:.0f}"
    )
