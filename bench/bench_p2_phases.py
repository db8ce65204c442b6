"""P2 phases: where a message to a paused agent spends its time, phase by phase.

Companion of ``bench_p2_paused_message.py`` (same agent, same rounds, same raw
baseline), which says *how much* Roost adds; this one says *where*. Roost runs as
a child process this script starts with ``--serve``: the daemon ``roost up`` runs
(``roost.serving.serve``, on uvloop), but built here through the library API with
instrumented parts, as ``bench_p3_restart.py`` does, so nothing in ``src/`` is
timed by code of its own:

- the runtime (``DockerRuntime`` subclass): ``unpause`` called / returned;
- the agent client (``HttpAgentClient`` subclass): the delivery POST sent /
  answered, and any readiness probe;
- the inbox and the store (their methods wrapped on the instances the engine
  built): message committed, wake (``starting``) and ``running`` persisted,
  outcome committed;
- ``Agents.wake`` (wrapped on the instance): the wake the lane waits for returned;
- the edge app (wrapped where ``serving`` builds it): request received by the
  ASGI app, answer's head and body handed to the server.

Each mark is ``time.perf_counter_ns()`` (``CLOCK_MONOTONIC``: the same clock in
this process and the child) with ``time.process_time_ns()`` (the child's CPU,
every thread: the SQLite writer's commits too). The client's send and the
answer's end are marked here. A round is named by its ``X-Bench-Round`` header
(Roost ignores it); only such requests are marked.

Rounds alternate raw / Roost, as in P2; the raw round's own ``unpause`` and POST
are timed apart, so Roost's unpause can be set against raw's in the same run.
Around each Roost round the bench reads the child's CPU (every thread's
``/proc/PID/task/*/schedstat``, nanoseconds), which includes uvicorn's parse and
write outside the app. After each Roost round a request the app wrapper answers at
once (``/bench/noop``) gives the floor of any HTTP hop into that server.

``--all-events`` runs Roost subscribed to every Docker event of its containers, as
before it asked for the kinds the supervisor acts on (an A/B of that change).

Then ``--profile-rounds`` more Roost rounds run under cProfile (main thread's CPU
time as the timer, enabled by the app wrapper for the request only); the top
functions by cumulative and by own time are printed.

Run: ``.venv/bin/python bench/bench_p2_phases.py [--rounds N] [--profile-rounds M]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import bench_p2_paused_message as p2
import common

from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.http_agent_client import HttpAgentClient
from roost.core.states import AgentState
from roost.ports.agent_http import ProbeResult
from roost.ports.runtime import RuntimeEvent

ROUND_HEADER = "X-Bench-Round"
#: Answered by the app wrapper itself: the cost of any HTTP hop into this process.
NOOP_PATH = "/bench/noop"
PROFILE_HEADER = "X-Bench-Profile"

# -- the child: Roost with instrumented parts ------------------------------------------


class Recorder:
    """Marks of the round in flight (rounds run one at a time); the first mark of a
    name in a round is kept."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.profiler: cProfile.Profile | None = None
        self.profiled = 0

    def mark(self, name: str) -> None:
        current = self.current
        if current is not None and name not in current:
            current[name] = (time.perf_counter_ns(), time.process_time_ns())


REC = Recorder()


class PhaseRuntime(DockerRuntime):
    async def unpause(self, container_id: str) -> None:
        REC.mark("unpause.start")
        await super().unpause(container_id)
        REC.mark("unpause.done")


class AllEventsRuntime(PhaseRuntime):
    """Experiment (``--all-events``): subscribe to every container event, as Roost did
    before it asked Docker for the kinds it acts on only (an ``unpause`` event then
    reaches Roost as each wake's unpause returns)."""

    def events(
        self, labels: Mapping[str, str], *, kinds: Collection[str] | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        return super().events(labels)


class PhaseAgentClient(HttpAgentClient):
    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        REC.mark("post.start")
        response = await super().request(method, url, **kwargs)
        REC.mark("post.done")
        return response

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        REC.mark("probe.start")
        result = await super().probe(url, timeout=timeout)
        REC.mark("probe.done")
        return result


def _wrap(obj: Any, method: str, name: Callable[..., str | None]) -> None:
    """Replace ``obj.method`` (on the instance) with one marking ``<name>.start``
    and ``<name>.done`` around it; ``name(*args)`` None: not marked."""
    inner = getattr(obj, method)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        label = name(*args)
        if label is not None:
            REC.mark(label + ".start")
        result = await inner(*args, **kwargs)
        if label is not None:
            REC.mark(label + ".done")
        return result

    setattr(obj, method, wrapped)


def _persist_label(record: Any, *_: Any) -> str | None:
    if record.state is AgentState.STARTING:
        return "persist.starting"
    if record.state is AgentState.RUNNING:
        return "persist.running"
    return None


class PhaseEdge:
    """The edge app, marking a message POST's arrival and answer (and profiling it
    when asked)."""

    def __init__(self, edge: Any) -> None:
        self._edge = edge
        self.api = edge.api  # serving closes its event streams on shutdown

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "http" and scope["path"] == NOOP_PATH:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        headers = dict(scope.get("headers") or ()) if scope["type"] == "http" else {}
        tag = headers.get(ROUND_HEADER.lower().encode())
        if tag is None:
            await self._edge(scope, receive, send)
            return
        profile = PROFILE_HEADER.lower().encode() in headers
        REC.current = {"round": int(tag), "profiled": profile}
        REC.mark("asgi.in")
        if profile:
            if REC.profiler is None:
                REC.profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
            REC.profiler.enable()

        async def marked_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                REC.mark("asgi.head")
            elif not message.get("more_body", False):
                if profile and REC.profiler is not None:
                    REC.profiler.disable()
                    REC.profiled += 1
                REC.mark("asgi.out")
            await send(message)

        try:
            await self._edge(scope, receive, marked_send)
        finally:
            if REC.current is not None:
                REC.rounds.append(REC.current)
            REC.current = None


async def serve_child(config: Path, out: Path, *, all_events: bool = False) -> int:
    from roost import serving
    from roost.config import load_settings
    from roost.engine import Engine

    settings = load_settings(config)
    kind = AllEventsRuntime if all_events else PhaseRuntime
    runtime = kind(settings.docker.host or None, connection_limit=settings.docker.connection_limit)
    engine = Engine(settings, runtime=runtime, agent_client=PhaseAgentClient())
    _wrap(engine.inbox, "enqueue", lambda *_: "enqueue")
    _wrap(engine.inbox, "mark_delivered", lambda *_: "delivered")
    _wrap(engine.store, "update_agent", _persist_label)
    _wrap(engine.agents, "wake", lambda *_: "wake")
    build = serving.create_app
    serving.create_app = lambda engine, *, token: PhaseEdge(build(engine, token=token))  # type: ignore[assignment,misc]
    try:
        return await serving.serve(settings, engine=engine)
    finally:
        profile = ""
        if REC.profiler is not None:
            profile = str(out) + ".prof"
            REC.profiler.dump_stats(profile)
        out.write_text(  # noqa: ASYNC240 (once, at exit)
            json.dumps({"rounds": REC.rounds, "profile": profile, "profiled": REC.profiled})
        )


def run_child(config: Path, out: Path, *, all_events: bool) -> None:
    import uvloop

    sys.exit(uvloop.run(serve_child(config, out, all_events=all_events)))


# -- the bench --------------------------------------------------------------------------


def _child_cpu_ns(pid: int) -> tuple[int, int]:
    """CPU time of ``pid`` so far (ns, from schedstat): its main thread's (the event
    loop's) and its other threads' (SQLite's writer and reader)."""
    main = others = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            used = int(f.read().split()[0])
        if task == str(pid):
            main = used
        else:
            others += used
    return main, others


async def noop_round(http: aiohttp.ClientSession, base: str) -> int:
    """One request the app wrapper answers at once: the floor of any HTTP hop."""
    t0 = time.perf_counter_ns()
    async with http.post(base + NOOP_PATH, json={"round": 0}) as response:
        await response.read()
    return time.perf_counter_ns() - t0


async def raw_round(
    http: aiohttp.ClientSession, docker: aiodocker.Docker, container: Any, url: str, i: int
) -> dict[str, int]:
    await container.pause()
    await p2.wait_paused(docker, container.id)
    t0 = time.perf_counter_ns()
    await container.unpause()
    t1 = time.perf_counter_ns()
    async with http.post(
        url + "/messages",
        data=json.dumps({"round": i}),
        headers={"Content-Type": "application/json", "Roost-Message-Id": f"raw-{i}"},
    ) as response:
        body = await response.json()
    t2 = time.perf_counter_ns()
    assert body["echo"] == {"round": i}
    return {"unpause": t1 - t0, "post": t2 - t1, "total": t2 - t0}


async def roost_round(
    http: aiohttp.ClientSession,
    docker: aiodocker.Docker,
    base: str,
    cid: str,
    pid: int,
    i: int,
    *,
    profile: bool = False,
) -> dict[str, int]:
    async with http.post(base + "/api/agents/echo/pause") as response:
        assert response.status == 200, await response.text()
    await p2.wait_paused(docker, cid)
    headers = {ROUND_HEADER: str(i)}
    if profile:
        headers[PROFILE_HEADER] = "1"
    cpu0 = _child_cpu_ns(pid)
    t0 = time.perf_counter_ns()
    async with http.post(
        base + "/api/agents/echo/messages",
        params={"wait": "true"},
        json={"round": i},
        headers=headers,
    ) as response:
        body = await response.json()
    t1 = time.perf_counter_ns()
    cpu1 = _child_cpu_ns(pid)
    assert response.status == 200, body
    assert body["status"] == "delivered", body
    assert body["reply"]["echo"] == {"round": i}
    return {
        "round": i,
        "client.send": t0,
        "client.done": t1,
        "cpu": sum(cpu1) - sum(cpu0),
        "cpu.main": cpu1[0] - cpu0[0],
        "cpu.others": cpu1[1] - cpu0[1],
    }


#: (label, from mark, to mark): the phases of a Roost round, in path order.
PHASES = (
    ("HTTP in: client send → app called", "client.send", "asgi.in"),
    ("app called → message commit begins", "asgi.in", "enqueue.start"),
    ("message commit (SQLite, group commit)", "enqueue.start", "enqueue.done"),
    ("app called → wake persist begins", "asgi.in", "persist.starting.start"),
    ("wake persisted (paused → starting)", "persist.starting.start", "persist.starting.done"),
    ("persisted → unpause called", "persist.starting.done", "unpause.start"),
    ("**unpause (Docker)**", "unpause.start", "unpause.done"),
    ("unpause returned → running persist begins", "unpause.done", "persist.running.start"),
    ("running persisted", "persist.running.start", "persist.running.done"),
    ("running persisted → wake returned", "persist.running.done", "wake.done"),
    ("wake returned → delivery POST sent", "wake.done", "post.start"),
    ("**delivery POST → reply (agent)**", "post.start", "post.done"),
    ("reply → outcome commit begins", "post.done", "delivered.start"),
    ("outcome commit (SQLite)", "delivered.start", "delivered.done"),
    ("committed → answer's head sent", "delivered.done", "asgi.head"),
    ("answer's head → body sent", "asgi.head", "asgi.out"),
    ("HTTP out: body sent → client has it", "asgi.out", "client.done"),
)


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(
    rounds: list[dict[str, Any]],
    raws: list[dict[str, int]],
    noops: list[float],
    load: tuple[float, float],
) -> None:
    rows = []
    for label, start, end in PHASES:
        spans = [r[end][0] - r[start][0] for r in rounds if start in r and end in r]
        cpu = [
            r[end][1] - r[start][1]
            for r in rounds
            if start in r and end in r and None not in (r[start][1], r[end][1])
        ]
        if not spans:
            rows.append({"phase": label, "p50 ms": "—", "p90 ms": "—", "Roost CPU p50 ms": "—"})
            continue
        rows.append(
            {
                "phase": label + ("" if len(spans) == len(rounds) else f" ({len(spans)} rounds)"),
                "p50 ms": _ms(common.median(spans)),
                "p90 ms": _ms(_quantile(spans, 0.9)),
                "Roost CPU p50 ms": _ms(common.median(cpu)) if cpu else "",
            }
        )
    totals = [r["client.done"][0] - r["client.send"][0] for r in rounds]
    in_app_cpu = [r["asgi.out"][1] - r["asgi.in"][1] for r in rounds]
    rows.append(
        {
            "phase": "**Roost round, client's view**",
            "p50 ms": _ms(common.median(totals)),
            "p90 ms": _ms(_quantile(totals, 0.9)),
            "Roost CPU p50 ms": f"{_ms(common.median(in_app_cpu))} in the app; "
            f"{_ms(common.median([r['cpu'] for r in rounds]))} whole process (event loop "
            f"{_ms(common.median([r['cpu.main'] for r in rounds]))}, other threads "
            f"{_ms(common.median([r['cpu.others'] for r in rounds]))})",
        }
    )
    rows.append(
        {
            "phase": "floor: one HTTP hop into the same server (app answers at once)",
            "p50 ms": _ms(common.median(noops)),
            "p90 ms": _ms(_quantile(noops, 0.9)),
            "Roost CPU p50 ms": "",
        }
    )
    for key, label in (
        ("unpause", "raw: **unpause (Docker)**"),
        ("post", "raw: **POST → reply**"),
        ("total", "**raw round**"),
    ):
        values = [float(r[key]) for r in raws]
        rows.append(
            {
                "phase": label,
                "p50 ms": _ms(common.median(values)),
                "p90 ms": _ms(_quantile(values, 0.9)),
                "Roost CPU p50 ms": "",
            }
        )
    common.record(
        f"P2 phases: message to a paused agent → reply ({len(rounds)} Roost rounds, "
        f"raw interleaved; load {load[0]:.1f} → {load[1]:.1f}; {common.machine()})",
        rows,
    )
    # The overhead, split: Docker's and the agent's part against raw's, the rest Roost's.
    paired = list(zip(rounds, raws, strict=True))
    own = [
        (r["client.done"][0] - r["client.send"][0])
        - (r["unpause.done"][0] - r["unpause.start"][0])
        - (r["post.done"][0] - r["post.start"][0])
        for r in rounds
    ]
    lines = {
        "overhead: p50 of per-round (Roost − raw)": common.median(
            [(r["client.done"][0] - r["client.send"][0]) - w["total"] for r, w in paired]
        ),
        "Roost's unpause − raw's unpause, p50 of per-round differences": common.median(
            [(r["unpause.done"][0] - r["unpause.start"][0]) - w["unpause"] for r, w in paired]
        ),
        "Roost's delivery POST − raw's POST, p50 of per-round differences": common.median(
            [(r["post.done"][0] - r["post.start"][0]) - w["post"] for r, w in paired]
        ),
        "Roost round minus its unpause and POST (p50)": common.median(own),
        "  app called → unpause called (message stored, wake persisted; p50)": common.median(
            [r["unpause.start"][0] - r["asgi.in"][0] for r in rounds]
        ),
        "  unpause returned → delivery POST sent (running persisted; p50)": common.median(
            [r["post.start"][0] - r["unpause.done"][0] for r in rounds]
        ),
        "  reply → answer sent (outcome committed; p50)": common.median(
            [r["asgi.out"][0] - r["post.done"][0] for r in rounds]
        ),
        "  HTTP in + out (client ↔ app, p50)": common.median(
            [
                (r["asgi.in"][0] - r["client.send"][0]) + (r["client.done"][0] - r["asgi.out"][0])
                for r in rounds
            ]
        ),
    }
    for label, value in lines.items():
        print(f"- {label}: {_ms(value)} ms")
    enqueue_hidden = sum(1 for r in rounds if r["enqueue.done"][0] <= r["wake.done"][0])
    print(
        f"- message commit done before the wake returned in {enqueue_hidden}/{len(rounds)} rounds"
    )
    probes = sum(1 for r in rounds if "probe.start" in r)
    print(f"- readiness probes during the wake: {probes}/{len(rounds)} rounds")


def _where(file: str) -> str:
    """A profile entry's file, shortened to the package (or module) it is in."""
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    if "/src/roost/" in file:
        return "roost/" + file.split("/src/roost/", 1)[1]
    if "/lib/python3" in file:
        return "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[1]
    return file.rsplit("/", 1)[-1]


def _package(where: str) -> str:
    if where.startswith("roost/"):
        return "roost." + where.split("/")[1].removesuffix(".py")
    if where.startswith("stdlib/"):
        return "stdlib " + where.split("/")[1].removesuffix(".py")
    if where.startswith("~") or where.startswith("<"):
        return "builtins (C)"
    return where.split("/")[0].removesuffix(".py")


def print_profile(path: str, profiled: int, cpu_ns: list[int]) -> None:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())
    print(
        f"\ncProfile (main thread's CPU time as the timer), {profiled} rounds: "
        f"{total / profiled * 1e3:.2f} ms of profiled CPU per round, the profiler's own "
        f"cost included; the whole process (every thread) used p50 "
        f"{_ms(common.median(cpu_ns))} ms per profiled round\n"
    )
    entries = [
        (f"{_where(file)}:{line}({func})", nc, tt, ct)
        for (file, line, func), (_, nc, tt, ct, _) in stats.items()
    ]
    by_package: dict[str, float] = {}
    for (file, _, _), (_, _, tt, _, _) in stats.items():
        key = _package(_where(file))
        by_package[key] = by_package.get(key, 0.0) + tt
    rows = [
        {
            "own CPU by package": name,
            "ms per round": f"{tt / profiled * 1e3:.3f}",
            "share": f"{tt / total:.0%}",
        }
        for name, tt in sorted(by_package.items(), key=lambda item: -item[1])[:15]
    ]
    common.record("P2 profile: own CPU time by package", rows)
    watched = [
        (name, ct)
        for name, _, _, ct in entries
        if name.endswith(("(_read_events)", "(_watch)", "(_dispatch)"))
    ]
    for name, ct in watched:
        print(f"- Docker events: {name}: {ct / profiled * 1e3:.3f} ms cumulative per round")
    for title, index, count in (("cumulative", 3, 30), ("own", 2, 25)):
        rows = [
            {
                "function": name,
                "entries per round (calls + resumes)": f"{nc / profiled:.1f}",
                "own ms per round": f"{tt / profiled * 1e3:.3f}",
                "cumulative ms per round": f"{ct / profiled * 1e3:.3f}",
            }
            for name, nc, tt, ct in sorted(entries, key=lambda e: -e[index])[:count]
        ]
        common.record(f"P2 profile: top {count} by {title} CPU time", rows)


async def main(args: argparse.Namespace) -> None:
    rounds = args.rounds
    images = common.pinned_images()
    mimic = images.get(common.MIMIC_IMAGE, common.MIMIC_IMAGE)
    instance = common.run_id("p2ph")
    raw_run = common.run_id("p2phraw")
    raws: list[dict[str, int]] = []
    client: dict[int, dict[str, int]] = {}
    profiled_cpu: list[int] = []
    noops: list[float] = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        port = common.free_port()
        base = f"http://127.0.0.1:{port}"
        config = p2.write_config(directory, instance, port, mimic)
        out = directory / "phases.json"
        log = directory / "roost.log"
        async with common.cleaned_up(
            (common.INSTANCE_LABEL, instance), (common.BENCH_LABEL, raw_run)
        ):
            with log.open("ab") as output:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--serve",
                    str(config),
                    "--out",
                    str(out),
                    *(["--all-events"] if args.all_events else []),
                    stdout=output,
                    stderr=output,
                    env={**os.environ, "ROOST_TOKEN": ""},
                )
            try:
                async with aiodocker.Docker() as docker, aiohttp.ClientSession() as http:
                    container, raw_url, _ = await p2.raw_agent(
                        docker, http, raw_run, "p2phraw", mimic
                    )
                    await common.wait_roost(http, base, process, log)
                    async with http.post(base + "/api/agents/echo/start") as response:
                        cid = (await response.json())["container_id"]
                    pid = process.pid
                    await raw_round(http, docker, container, raw_url, -1)  # warm-ups
                    await roost_round(http, docker, base, cid, pid, -1)
                    for i in range(rounds):
                        raws.append(await raw_round(http, docker, container, raw_url, i))
                        client[i] = await roost_round(http, docker, base, cid, pid, i)
                        noops.append(await noop_round(http, base))
                    for i in range(rounds, rounds + args.profile_rounds):
                        measured = await roost_round(http, docker, base, cid, pid, i, profile=True)
                        profiled_cpu.append(measured["cpu"])
            finally:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
                if process.returncode not in (0, -15):
                    print(log.read_text()[-3000:], file=sys.stderr)
            data = json.loads(out.read_text())
            merged = []
            for marks in data["rounds"]:
                i = marks["round"]
                if i in client:
                    seen = client[i]
                    marks["client.send"] = (seen["client.send"], None)
                    marks["client.done"] = (seen["client.done"], None)
                    for key in ("cpu", "cpu.main", "cpu.others"):
                        marks[key] = seen[key]
                    merged.append(marks)
            report(merged, raws, noops, (load0, os.getloadavg()[0]))
            if data["profile"]:
                print_profile(data["profile"], data["profiled"], profiled_cpu)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds (default 100)")
    parser.add_argument(
        "--profile-rounds", type=int, default=50, help="rounds under cProfile (default 50; 0: none)"
    )
    parser.add_argument("--quick", action="store_true", help="10 rounds, 5 profiled")
    parser.add_argument(
        "--all-events",
        action="store_true",
        help="experiment: Roost subscribes to every Docker event of its containers",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.profile_rounds = 10, 5
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve is not None:
        run_child(arguments.serve, arguments.out, all_events=arguments.all_events)
    else:
        asyncio.run(main(arguments))
