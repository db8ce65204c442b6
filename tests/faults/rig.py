"""Driving a real Roost as its users do, for the fault scenarios (helpers, not tests).

- :class:`RoostDaemon`: ``roost --config roost.toml up`` as a subprocess, pointed at
  a private dockerd (``[docker] host``), its stdout and stderr captured in a file
  the test reads back (lines, tracebacks); started, SIGKILLed, SIGTERMed.
- :class:`Sender`: posts numbered messages to one agent over the HTTP API, each with
  its own ``Idempotency-Key``, sent again with the same key until acknowledged (a
  2xx with an id), as ``roost send`` does. ``acked`` lists the ids in acceptance
  order: what Roost promised to deliver.
- :func:`check_delivery`: the agent's ``GET /seen`` (every ``Roost-Message-Id`` it
  received, in arrival order) against what was acknowledged: every one delivered,
  in order, duplicates only where the at-least-once window allows them.
- :class:`FaultReport`: the figures a scenario measured, printed at the end of
  the session (tests/faults/conftest.py's terminal summary).

Invariants:
- Nothing here sleeps to wait for a condition: waits poll with a deadline
  (``tests.conftest.wait_until``); the only timed pauses are a scenario's own
  (traffic pacing, how long a fault lasts).
- A daemon started here is ended here (SIGTERM, then SIGKILL) even when a test
  fails midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import MIMIC_IMAGE, ROOT, free_port, wait_until

from .conftest import PrivateDockerd

#: Seconds a daemon gets to answer /healthz after its start.
UP_TIMEOUT = 60.0
#: Seconds a SIGTERMed daemon gets to exit before it is killed.
STOP_TIMEOUT = 30.0
#: Seconds one HTTP request to the daemon may take (the machine is shared).
REQUEST_TIMEOUT = 30.0


def toml_document(document: Mapping[str, Any]) -> str:
    """TOML for a two-level document ({section: {key: scalar | list | table}});
    ``agents`` holds one table per agent. Strings are JSON-quoted (valid TOML)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(i) for i in item) + "]"
        if isinstance(item, Mapping):
            return "{" + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + "}"
        raise TypeError(f"no TOML for {item!r}")

    lines: list[str] = []
    for section, keys in document.items():
        tables = keys.items() if section == "agents" else [(None, keys)]
        for name, table in tables:
            lines.append(f"[{section}.{name}]" if name else f"[{section}]")
            lines.extend(f"{key} = {value(item)}" for key, item in table.items())
            lines.append("")
    return "\n".join(lines)


def mimic(**fields: Any) -> dict[str, Any]:
    """An ``[agents.NAME]`` table for the mimic test agent."""
    return {"image": MIMIC_IMAGE, **fields}


class RoostDaemon:
    """One ``roost up`` on a config file of its own; restartable (kill, start again)."""

    def __init__(
        self,
        tmp_path: Path,
        dockerd: PrivateDockerd,
        *,
        agents: Mapping[str, Mapping[str, Any]],
        defaults: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        notify: Mapping[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.dockerd = dockerd
        self.config = tmp_path / "roost.toml"
        self.log = tmp_path / "roost.log"
        document: dict[str, Any] = {
            "server": {
                "listen": f"127.0.0.1:{port}",
                "state_dir": str(state_dir or tmp_path / "state"),
                "log_level": "info",
                **(server or {}),
            },
            # A private daemon: containers are removed by the fixture between tests,
            # so a stop need not wait out every agent's stop_timeout.
            "docker": {"host": dockerd.docker_host, "leave_running": True},
            "notify": dict(notify or {}),
            "defaults": {
                "memory": "64m",
                "startup_timeout": 30,
                "stop_timeout": 2,
                "idle_timeout": 0,
                **(defaults or {}),
            },
            "agents": dict(agents),
        }
        if not document["notify"]:
            del document["notify"]
        self.config.write_text(toml_document(document))
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    # -- process ------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn ``roost up`` (returns at once; see ``wait_up``)."""
        assert self.process is None or self.process.returncode is not None, "already running"
        roost = Path(sys.executable).parent / "roost"
        with self.log.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                str(roost),
                "--config",
                str(self.config),
                "up",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=str(ROOT),
                env={**os.environ, "ROOST_TOKEN": "", "NO_COLOR": "1"},
            )
        self.starts += 1

    async def wait_up(self, timeout: float = UP_TIMEOUT) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:

            async def up() -> bool:
                if self.process is None or self.process.returncode is not None:
                    raise AssertionError(f"roost up exited; its log:\n{self.tail()}")
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(up, timeout=timeout, interval=0.05, what=f"roost up at {self.url}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed beyond what was committed."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``STOP_TIMEOUT``."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    # -- its log ------------------------------------------------------------------

    def lines(self) -> list[str]:
        if not self.log.exists():
            return []
        return self.log.read_text(errors="replace").splitlines()

    def mark(self) -> int:
        """The log's length now: ``lines()[mark:]`` is what came after."""
        return len(self.lines())

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines()[-count:])


@contextlib.asynccontextmanager
async def running_roost(daemon: RoostDaemon) -> AsyncIterator[httpx.AsyncClient]:
    """Start the daemon, wait for it, yield an API client; stop it however the test ends."""
    await daemon.start()
    try:
        await daemon.wait_up()
        async with httpx.AsyncClient(base_url=daemon.url, timeout=REQUEST_TIMEOUT) as client:
            yield client
    finally:
        await daemon.stop()


# -- reading the daemon over its API -----------------------------------------------------


async def agents(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/api/agents")
    response.raise_for_status()
    return {a["name"]: a for a in response.json()["agents"]}


async def agent(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/api/agents/{name}")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def start_agents(client: httpx.AsyncClient, *names: str) -> dict[str, dict[str, Any]]:
    """Start each agent and wait until it answers its health check."""
    started = await asyncio.gather(*(client.post(f"/api/agents/{n}/start") for n in names))
    for name, response in zip(names, started, strict=True):
        assert response.status_code == 200, f"start {name}: {response.status_code} {response.text}"
    return {n: r.json() for n, r in zip(names, started, strict=True)}


async def wait_states(
    client: httpx.AsyncClient,
    wanted: Mapping[str, str],
    *,
    timeout: float,
    interval: float = 0.05,
) -> float:
    """Poll until every named agent is in its wanted state; return the seconds it took."""
    began = time.monotonic()
    last: dict[str, str] = {}

    async def there() -> bool:
        try:
            found = await agents(client)
        except httpx.HTTPError:
            return False
        last.update({n: found[n]["state"] for n in wanted})
        return all(found[n]["state"] == state for n, state in wanted.items())

    try:
        await wait_until(there, timeout=timeout, interval=interval, what=f"agents {dict(wanted)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}") from None
    return time.monotonic() - began


async def seen(url: str) -> dict[str, Any]:
    """The mimic's ``GET /seen``: every message id it received, in arrival order."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as client:
        response = await client.get(url + "/seen")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


async def messages(client: httpx.AsyncClient, name: str) -> dict[str, dict[str, Any]]:
    """Every stored message of the agent, by id, in acceptance order (paged)."""
    found: dict[str, dict[str, Any]] = {}
    after = 0
    while True:
        response = await client.get(
            f"/api/agents/{name}/messages", params={"after": after, "limit": 1000}
        )
        response.raise_for_status()
        page = response.json()["messages"]
        if not page:
            return found
        for message in page:
            found[message["id"]] = message
        after = page[-1]["seq"]


async def wait_delivered(
    client: httpx.AsyncClient, name: str, ids: list[str], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """Poll until every one of ``ids`` is ``delivered``; every stored message then."""
    pending: dict[str, str] = {}
    stored: dict[str, dict[str, Any]] = {}

    async def done() -> bool:
        stored.clear()
        stored.update(await messages(client, name))
        pending.clear()
        for i in ids:
            status = stored[i]["status"] if i in stored else "absent"
            if status != "delivered":
                pending[i] = status
        return not pending

    try:
        await wait_until(done, timeout=timeout, interval=0.2, what=f"{name}: messages delivered")
    except AssertionError as exc:
        sample = dict(list(pending.items())[:5])
        raise AssertionError(f"{exc}: {len(pending)} not delivered, e.g. {sample}") from None
    return stored


# -- traffic --------------------------------------------------------------------------


@dataclass
class Sender:
    """Numbered messages to one agent, each acknowledged before the next is sent."""

    client: httpx.AsyncClient
    agent: str
    #: the body of message number n.
    body: Callable[[int], Any] = field(default=lambda n: {"n": n})
    #: ids Roost acknowledged (a 2xx with an id), in acceptance order.
    acked: list[str] = field(default_factory=list)
    #: answers that were not 2xx: (status, Retry-After or None).
    refusals: list[tuple[int, str | None]] = field(default_factory=list)
    #: connection errors and timeouts (then the same key is sent again).
    errors: int = 0
    sent: int = 0

    async def send(self, *, retry_refused: bool = True, deadline: float = 120.0) -> str | None:
        """Send the next message until it is acknowledged; its id. With
        ``retry_refused=False`` a refusal (4xx/5xx) ends it: None."""
        number = self.sent
        self.sent += 1
        key = f"{self.agent}-{number}-{uuid.uuid4().hex}"
        give_up = time.monotonic() + deadline
        while True:
            try:
                response = await self.client.post(
                    f"/api/agents/{self.agent}/messages",
                    json=self.body(number),
                    headers={"Idempotency-Key": key},
                )
            except httpx.HTTPError:
                self.errors += 1
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.05)  # pacing a resend, not waiting for a condition
                continue
            if 200 <= response.status_code < 300:
                message_id: str = response.json()["id"]
                self.acked.append(message_id)
                return message_id
            self.refusals.append((response.status_code, response.headers.get("retry-after")))
            if not retry_refused or time.monotonic() > give_up:
                return None
            await asyncio.sleep(0.05)

    async def wait_acked(self, count: int, *, timeout: float = 30.0) -> None:
        """Poll until ``count`` messages in all have been acknowledged."""

        def enough() -> bool:
            return len(self.acked) >= count

        await wait_until(
            enough, timeout=timeout, what=f"{self.agent}: {count} messages acknowledged"
        )

    async def run(self, stop: asyncio.Event, *, interval: float) -> None:
        """Send until ``stop`` is set, one message per ``interval`` at most."""
        while not stop.is_set():
            await self.send()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


@contextlib.asynccontextmanager
async def traffic(
    client: httpx.AsyncClient, names: Iterable[str], *, interval: float
) -> AsyncIterator[dict[str, Sender]]:
    """A ``Sender`` per agent, each sending in its own task until the block ends
    (then each finishes the message it is on): ``{name: sender}``."""
    senders = {name: Sender(client, name) for name in names}
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(s.run(stop, interval=interval), name=f"send {n}")
        for n, s in senders.items()
    ]
    try:
        yield senders
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@dataclass(frozen=True)
class DeliveryCheck:
    """What one agent received compared with what Roost acknowledged for it."""

    acked: int
    distinct: int
    lost: int
    duplicates: int


def check_delivery(
    acked: list[str],
    seen_ids: list[str],
    *,
    allowed_duplicates: int,
    what: str,
    window: int = 1,
) -> DeliveryCheck:
    """Assert: every acknowledged id arrived, first arrivals in acceptance order, and
    any duplicate is a redelivery of one of the ``window`` newest messages that had
    arrived by then (the messages whose outcome was not committed when Roost went
    away, sent again first: one in flight, or with a push lane's pipelined commit
    two, see ``roost.reactor.delivering``; a Roost killed again while resending them
    sends them once more, so ``A B A A B`` keeps a window of two), at most
    ``allowed_duplicates`` of them."""
    first_seen = list(dict.fromkeys(seen_ids))
    acked_set = set(acked)
    lost = [i for i in acked if i not in set(first_seen)]
    assert not lost, f"{what}: {len(lost)} acknowledged messages never arrived: {lost[:5]}"
    order = [i for i in first_seen if i in acked_set]
    assert order == acked, f"{what}: messages arrived out of acceptance order"
    duplicates = [p for p in range(1, len(seen_ids)) if seen_ids[p] in set(seen_ids[:p])]
    assert len(duplicates) <= allowed_duplicates, (
        f"{what}: {len(duplicates)} redeliveries, at most {allowed_duplicates} allowed"
    )
    rank = {message_id: n for n, message_id in enumerate(first_seen)}
    newest = -1  # rank of the newest message arrived so far
    for message_id in seen_ids:
        if rank[message_id] > newest:
            newest = rank[message_id]
        else:
            assert rank[message_id] > newest - window, (
                f"{what}: {message_id} was redelivered after "
                f"{newest - rank[message_id]} newer messages (window {window}), not right away"
            )
    return DeliveryCheck(len(acked), len(first_seen), len(lost), len(duplicates))


def tracebacks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Traceback")]
