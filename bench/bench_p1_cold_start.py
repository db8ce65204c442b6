"""P1: cold start of a fresh agent until its URL answers, Roost vs raw aiodocker.

Roost: ``engine.supervisor.ensure_running`` of a newly registered agent (create →
start → HTTP readiness polled every 5 ms, with every state change persisted).
Raw: aiodocker create + start + inspect for the published port + GET /health every
5 ms until 200.

The raw baseline Roost is judged against creates **the same container** Roost
creates: on Roost's agents' network (``roost-agents``: a bridge of its own with
inter-container traffic off) with the agent's hardening (capabilities dropped but
a small set, a private cgroup namespace, no-new-privileges, pids and memory
limits) and the same env (a token included); ``verify_same`` compares the two
containers' HostConfigs each round. Three more raw variants show what those
features cost Docker (not Roost): on the default bridge without hardening
(Docker's plain container), on the agents' network without hardening, and on the
default bridge with it.

All variants take turns each round in a shuffled order (a fixed order was found
to favour whichever variant follows a given one: Docker's start time depends on
what was removed just before), after one unmeasured warm-up round, and every container is removed right after its measurement, so all
see the same engine load. Target: Roost's median overhead over the same container
≤ 3 ms.

Run: ``.venv/bin/python bench/bench_p1_cold_start.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

import aiodocker
import aiohttp
import common

from roost.engine import Engine

TARGET_OVERHEAD = 0.003

Phases = dict[str, float]

#: raw variants: label → (network: "agents" or None for the default bridge, hardened)
RAW_VARIANTS: dict[str, tuple[str | None, bool]] = {
    "raw, same container": ("agents", True),
    "raw, default bridge, not hardened": (None, False),
    "raw, agents' network, not hardened": ("agents", False),
    "raw, default bridge, hardened": (None, True),
}
SAME = "raw, same container"
ROOST = "Roost"


def _raw_phases(t0: float, raw: common.RawStart, inspected: float) -> Phases:
    return {
        "total": raw.ready - t0,
        "create": raw.create_returned - raw.create_called,
        "create → start call": 0.0,
        "start": raw.start_returned - raw.create_returned,
        "start → inspect → probing": inspected - raw.start_returned,
        "probing → ready": raw.ready - inspected,
        "first 200 → ready": 0.0,
        "Roost's own (total − Docker calls)": 0.0,
    }


async def _roost_round(
    engine: Engine,
    runtime: common.InstrumentedRuntime,
    client: common.InstrumentedAgentClient,
    settings: object,
    name: str,
) -> tuple[Phases, str]:
    await engine.agents.register(common.agent_spec(settings, name))  # type: ignore[arg-type]
    t0 = time.time()
    record = await engine.supervisor.ensure_running(name, timeout=60)
    ready = time.time()
    cid = record.container_id
    assert record.url is not None
    assert cid is not None
    image = runtime.first("ensure_image", after=t0)
    create = runtime.first("create", after=t0, arg=cid)
    start = runtime.first("start", after=t0, arg=cid)
    inspect = runtime.first("inspect", after=t0, arg=cid)
    assert create is not None
    assert start is not None
    assert inspect is not None
    answered = client.first_ok(after=inspect.returned)
    assert answered is not None
    docker_calls = (
        (create.returned - create.called)
        + (start.returned - start.called)
        + (inspect.returned - inspect.called)
        + (image.returned - image.called if image is not None else 0.0)
    )
    # Readiness: from the inspect's return, polls every 5 ms like the raw one.
    phases = {
        "total": ready - t0,
        "request → create call": create.called - t0,
        "create": create.returned - create.called,
        "create → start call": start.called - create.returned,
        "start": start.returned - start.called,
        "start → inspect → probing": inspect.returned - start.returned,
        "probing → ready": ready - inspect.returned,
        "first 200 → ready": ready - answered,
        "Roost's own (total − Docker calls)": 0.0,
    }
    # What is neither a Docker call nor readiness polling (which raw does alike):
    # the time outside Docker's calls, less the polling until the first 200.
    phases["Roost's own (total − Docker calls)"] = (
        phases["total"] - docker_calls - (answered - inspect.returned)
    )
    return phases, cid


async def _raw_round(
    docker: aiodocker.Docker,
    http: aiohttp.ClientSession,
    body: dict[str, object],
    name: str,
) -> tuple[Phases, str]:
    t0 = time.time()
    marks = common.RawStart()
    marks.create_called = time.time()
    container = await docker.containers.create(dict(body), name=name)
    marks.create_returned = time.time()
    marks.cid = str(container.id)
    await container.start()
    marks.start_returned = time.time()
    data = await container.show()
    inspected = time.time()
    binding = data["NetworkSettings"]["Ports"][f"{common.MIMIC_PORT}/tcp"][0]
    await common.poll_health(http, f"http://127.0.0.1:{binding['HostPort']}/health", timeout=60)
    marks.ready = time.time()
    return _raw_phases(t0, marks, inspected), marks.cid


async def main(rounds: int, seed: int) -> None:
    common.ensure_images()
    instance = common.run_id("bp1")
    raw_run = common.run_id("bp1raw")
    runs: dict[str, list[Phases]] = {label: [] for label in [ROOST, *RAW_VARIANTS]}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="roost-bench-p1-") as tmp:
        settings = common.make_settings(
            Path(tmp), instance, defaults={"idle_timeout": 3600, "restart_backoff": 0}
        )
        network = settings.agents_network
        runtime = common.InstrumentedRuntime()
        client = common.InstrumentedAgentClient()
        async with (
            common.cleaned_up((common.INSTANCE_LABEL, instance), (common.BENCH_LABEL, raw_run)),
            aiodocker.Docker() as docker,
            aiohttp.ClientSession() as http,
            Engine(settings, runtime=runtime, agent_client=client) as engine,
        ):
            spec = common.agent_spec(settings, "raw")
            labels = [ROOST, *RAW_VARIANTS]
            rng = random.Random(seed)
            for i in range(rounds + 1):  # round 0 is the warm-up
                order = rng.sample(labels, len(labels))
                for turn, label in enumerate(order):
                    if label == ROOST:
                        phases, _ = await _roost_round(engine, runtime, client, settings, f"a{i}")
                        await engine.agents.delete(f"a{i}")
                    else:
                        net, hardened = RAW_VARIANTS[label]
                        body = common.same_create_config(
                            raw_run,
                            f"raw-{i}",
                            spec,
                            network=network if net else None,
                            hardened=hardened,
                        )
                        phases, cid = await _raw_round(docker, http, body, f"{raw_run}-{turn}-{i}")
                        await docker.containers.container(cid).delete(force=True, v=True)
                    if i:
                        runs[label].append(phases)
            await _check_same(docker, engine, spec, network, raw_run)
            await engine.stop(leave_running=True)
    load_after = os.getloadavg()
    _report(runs, rounds, load_before, load_after)


async def _check_same(
    docker: aiodocker.Docker,
    engine: Engine,
    spec: object,
    network: str | None,
    raw_run: str,
) -> None:
    """Create one agent through Roost and one raw 'same container'; compare them."""
    from roost.config import ResolvedAgent

    assert isinstance(spec, ResolvedAgent)
    await engine.agents.register(spec.model_copy(update={"name": "check"}))
    record = await engine.supervisor.ensure_running("check", timeout=60)
    body = common.same_create_config(raw_run, "check", spec, network=network)
    container = await docker.containers.create(body, name=f"{raw_run}-check")
    try:
        assert record.container_id is not None
        await common.verify_same(docker, str(container.id), record.container_id)
        print("same-container check: the baseline's HostConfig matches Roost's container")
    finally:
        await container.delete(force=True, v=True)
        await engine.agents.delete("check")


def _report(
    runs: dict[str, list[Phases]],
    rounds: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    phases = list(runs[ROOST][0])
    rows = []
    for phase in phases:
        row = {"phase (medians, ms)": phase}
        for label, values in runs.items():
            row[label] = common.ms(common.median([r.get(phase, 0.0) for r in values]))
        rows.append(row)
    common.record(f"P1 cold start → ready URL ({rounds} rounds, turns shuffled)", rows)
    totals = {label: [r["total"] for r in values] for label, values in runs.items()}
    med = {label: common.median(values) for label, values in totals.items()}
    spreads = {
        label: (common.ms(min(values)), common.ms(common.p90(values)))
        for label, values in totals.items()
    }
    for label in runs:
        lo, hi = spreads[label]
        print(f"{label}: median {common.ms(med[label])} ms (min {lo}, p90 {hi})")
    plain = med["raw, default bridge, not hardened"]
    network_only = med["raw, agents' network, not hardened"]
    print(
        "features' own cost in Docker (raw, over the plain container): "
        f"agents' network {common.ms(network_only - plain)} ms, "
        f"hardening {common.ms(med['raw, default bridge, hardened'] - plain)} ms, "
        f"both {common.ms(med[SAME] - plain)} ms"
    )
    # Paired per round as well: each Roost start against the same round's raw one.
    paired = sorted(r["total"] - s["total"] for r, s in zip(runs[ROOST], runs[SAME], strict=True))
    overhead = med[ROOST] - med[SAME]
    met = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
    own = common.median([r["Roost's own (total − Docker calls)"] for r in runs[ROOST]])
    print(
        f"overhead over the same container (median Roost - median raw): {common.ms(overhead)} ms "
        f"(paired per round: median {common.ms(common.median(paired))} ms); "
        f"ratio {med[ROOST] / med[SAME]:.3f}; Roost's own work outside Docker calls and "
        f"polling: {common.ms(own)} ms; target ≤ {common.ms(TARGET_OVERHEAD)} ms: {met}"
    )
    print(
        f"over Docker's plain container: {common.ms(med[ROOST] - plain)} ms; "
        f"load average {load_before[0]:.2f} → {load_after[0]:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="the turns' order (default: random)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"turn order seed {seed}")
    asyncio.run(main(3 if args.quick else args.rounds, seed))
