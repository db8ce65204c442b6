"""P3: container exit → restart issued, measured from Docker's own ``die`` event time.

One agent with ``restart_backoff = 0`` is crashed repeatedly (``POST /messages``
``{"cmd": "exit", "code": 1}``). The bench keeps its own raw subscription to
Docker's event stream (plain HTTP on the socket, filtered to this run's label),
so the baseline is Docker's ``timeNano`` of the ``die`` event. The engine runs on
an ``InstrumentedRuntime`` (the real Docker adapter recording ``time.time()`` at
each call), which tells when Roost:

- issued the restart: the ``create`` of the new container (the transition decides
  from the ``die`` event alone);
- read the dead container's diagnostics (``inspect`` + log tail) and then issued
  its ``remove``: off the restart's critical path, reported for information.

It also records when Roost's own watcher got the ``die`` event (parsed, about to
be handled), which splits the interval into Docker's and the event stream's part
and Roost's own (watcher → create issued).

Target: die → restart issued (the ``create``) ≤ 2 ms with zero backoff.

Run: ``.venv/bin/python bench/bench_p3_restart.py [--quick]``
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import common

from roost.core.records import AgentRecord
from roost.core.states import AgentState
from roost.engine import Engine

TARGET = 0.002
AGENT = "crashy"


class DieEvent:
    __slots__ = ("cid", "received", "time")

    def __init__(self, cid: str, time_: float, received: float) -> None:
        self.cid = cid
        self.time = time_
        self.received = received


def _docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise SystemExit(f"P3 reads Docker events over a unix socket; DOCKER_HOST is {host!r}")
    return host.removeprefix("unix://")


@contextlib.asynccontextmanager
async def die_events(instance: str) -> AsyncIterator[asyncio.Queue[DieEvent]]:
    """Raw ``GET /events`` (die events of this run's containers) into a queue."""
    queue: asyncio.Queue[DieEvent] = asyncio.Queue()
    filters = json.dumps(
        {"type": ["container"], "event": ["die"], "label": [f"roost.instance={instance}"]}
    )
    connected = asyncio.Event()

    async def read() -> None:
        connector = aiohttp.UnixConnector(path=_docker_socket())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                "http://docker/events",
                params={"filters": filters},
                timeout=aiohttp.ClientTimeout(total=None),
            ) as response,
        ):
            response.raise_for_status()
            connected.set()
            async for line in response.content:
                received = time.time()
                if not line.strip():
                    continue
                event = json.loads(line)
                queue.put_nowait(DieEvent(event["id"], event["timeNano"] / 1e9, received))

    reader = asyncio.create_task(read())
    waiting = asyncio.create_task(connected.wait())
    await asyncio.wait([reader, waiting], return_when=asyncio.FIRST_COMPLETED)
    if reader.done():
        waiting.cancel()
        reader.result()  # raises the connection error
    try:
        yield queue
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def next_die(queue: asyncio.Queue[DieEvent], cid: str, timeout: float) -> DieEvent:
    async with asyncio.timeout(timeout):
        while True:
            event = await queue.get()
            if event.cid == cid:
                return event


def _replaced(record: AgentRecord, *, old: str) -> bool:
    return record.state is AgentState.RUNNING and record.container_id not in (None, old)


async def main(quick: bool) -> None:
    rounds = 3 if quick else 20
    common.ensure_images()
    instance = common.run_id("bp3")
    rows: list[dict[str, float]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="roost-bench-p3-") as tmp:
        settings = common.make_settings(
            Path(tmp),
            instance,
            defaults={
                "idle_timeout": 3600,
                "restart_backoff": 0,
                "max_restarts": 1000,
                "liveness_interval": 10,
            },
        )
        runtime = common.InstrumentedRuntime()
        async with (
            common.cleaned_up((common.INSTANCE_LABEL, instance)),
            die_events(instance) as dies,
            aiohttp.ClientSession() as http,
            Engine(settings, runtime=runtime) as engine,
        ):
            sup = engine.supervisor
            await engine.agents.register(common.agent_spec(settings, AGENT))
            record = await sup.ensure_running(AGENT, timeout=60)
            for i in range(rounds + 1):  # round 0 is the warm-up
                cid, url = record.container_id, record.url
                assert cid is not None
                assert url is not None
                mark = time.time()
                async with http.post(url + "/messages", json={"cmd": "exit", "code": 1}) as reply:
                    await reply.read()
                die = await next_die(dies, cid, timeout=30)
                restarted = await sup.actor(AGENT).wait_for(
                    functools.partial(_replaced, old=cid), timeout=60
                )
                running_at = time.time()
                assert restarted, f"round {i}: no restart within 60 s ({sup.get(AGENT).state})"
                record = sup.get(AGENT)
                seen = runtime.first("inspect", after=mark, arg=cid)
                tail = runtime.first("logs_tail", after=mark, arg=cid)
                remove = runtime.first("remove", after=mark, arg=cid)
                create = runtime.first("create", after=mark)
                assert seen is not None
                assert remove is not None
                assert tail is not None
                assert create is not None
                if i:
                    rows.append(
                        {
                            "die → bench got event": die.received - die.time,
                            "die → Roost's watcher got it": runtime.dies[cid] - die.time,
                            "Roost: watcher → create issued": create.called - runtime.dies[cid],
                            "die → Roost inspects exit": seen.called - die.time,
                            "Roost's exit inspect took": seen.returned - seen.called,
                            "Roost's log tail took": tail.returned - tail.called,
                            "die → remove issued": remove.called - die.time,
                            "die → create issued": create.called - die.time,
                            "die → running again": running_at - die.time,
                        }
                    )
            await engine.stop(leave_running=True)

    table = []
    for key in rows[0]:
        values = [r[key] for r in rows]
        table.append(
            {
                "interval": key,
                "median ms": common.ms(common.median(values)),
                "p90 ms": common.ms(common.p90(values)),
                "min ms": common.ms(min(values)),
                "max ms": common.ms(max(values)),
            }
        )
    common.record(f"P3 container exit → restart issued ({rounds} crashes, backoff 0)", table)
    for key in ("die → create issued",):  # the restart; the remove is diagnostics-first
        value = common.median([r[key] for r in rows])
        met = "met" if value <= TARGET else f"MISSED by {common.ms(value - TARGET)} ms"
        print(f"{key}: median {common.ms(value)} ms; target ≤ {common.ms(TARGET)} ms: {met}")
    print(f"load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main(common.parse_args(__doc__ or "").quick))
