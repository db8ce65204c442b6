"""P3's restart path without Docker: Roost's own share of exit → restart issued.

The same engine as ``bench_p3_restart.py`` (real SQLite state file, real
supervisor), on the in-process ``FakeRuntime``: a container is crashed
(``FakeRuntime.crash`` emits its ``die``) and the time until the new container's
``create`` is called is taken, 300 times. Docker's event delivery and its load
are out of the picture, so what is left is Roost's own work and its waits (the
event-loop turns and the state file's writer thread), with the loop thread's CPU
time beside the wall time of each step (``bench_p3_restart.trace`` marks them):
where the loop's CPU keeps pace with the wall clock, Roost is computing; where it
does not, it waits (for the commit, or for a core on a busy machine).

``--profile FILE`` keeps a cProfile of the loop's thread over the crash → create
windows (``python -m pstats FILE``).

Run: ``.venv/bin/python bench/bench_p3_path.py [--quick] [--profile FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import tempfile
import time
from pathlib import Path

import bench_p3_restart as p3
import common

from roost.core.records import AgentRecord
from roost.core.states import AgentState
from roost.engine import Engine
from roost.ports.runtime import ContainerSpec
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime

AGENT = "crashy"


class MarkedRuntime(FakeRuntime):
    """The fake runtime, marking the crash (and starting the profile) and the create."""

    def __init__(self, steps: p3.Steps) -> None:
        super().__init__(images=[common.MIMIC_IMAGE])
        self.steps = steps
        self.created = asyncio.Event()

    def crash(self, container_id: str, exit_code: int = 1, *, oom: bool = False) -> None:
        self.steps.parsed[container_id] = (time.time(), time.thread_time())
        self.steps.begin_profile()
        super().crash(container_id, exit_code, oom=oom)

    async def create(self, spec: ContainerSpec) -> str:
        self.steps.end_profile()
        self.steps.mark("create called")
        self.created.set()
        return await super().create(spec)


async def main(quick: bool, profile_to: str | None) -> None:
    rounds = 30 if quick else 300
    profile = cProfile.Profile() if profile_to else None
    steps = p3.Steps(profile)
    runtime = MarkedRuntime(steps)
    rows: list[dict[str, tuple[float, float]]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="roost-bench-p3path-") as tmp:
        settings = common.make_settings(
            Path(tmp),
            common.run_id("bp3p"),
            defaults={
                "idle_timeout": 3600,
                "restart_backoff": 0,
                "max_restarts": 100_000,
                "liveness_interval": 10,
            },
        )
        async with Engine(
            settings, runtime=runtime, agent_client=FakeAgentClient(runtime)
        ) as engine:
            untrace = p3.trace(engine, steps)
            sup = engine.supervisor
            await engine.agents.register(common.agent_spec(settings, AGENT))
            record = await sup.ensure_running(AGENT, timeout=10)
            for i in range(rounds + 1):  # round 0 is the warm-up
                cid = record.container_id
                assert cid is not None
                runtime.created.clear()
                runtime.crash(cid)
                await runtime.created.wait()

                def replaced(r: AgentRecord, old: str = cid) -> bool:
                    return r.state is AgentState.RUNNING and r.container_id not in (None, old)

                assert await sup.actor(AGENT).wait_for(replaced, timeout=10), f"round {i}"
                record = sup.get(AGENT)
                if i:
                    crashed, crashed_cpu = steps.parsed[cid]
                    row = {}
                    for step in p3.STEPS:
                        at, cpu = steps.first(step, after=crashed) or (float("nan"),) * 2
                        row[step] = (at - crashed, cpu - crashed_cpu)
                    rows.append(row)
                # Apart, as crashes are (the diagnostics and the removal settle).
                await asyncio.sleep(0.005)
            untrace()
            await engine.stop(leave_running=False)

    table = []
    for step in p3.STEPS:
        walls = [r[step][0] for r in rows]
        cpus = [r[step][1] for r in rows]
        table.append(
            {
                "step (from the crash)": step,
                "median us": f"{common.median(walls) * 1e6:.0f}",
                "p90 us": f"{common.p90(walls) * 1e6:.0f}",
                "loop CPU, median us": ""
                if "writer thread" in step
                else f"{common.median(cpus) * 1e6:.0f}",
            }
        )
    common.record(f"P3 path on FakeRuntime ({rounds} crashes, backoff 0)", table)
    if profile is not None and profile_to:
        profile.dump_stats(profile_to)
        print(f"profile of the crash → create windows: {profile_to}")
    print(f"load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the path into FILE")
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.profile))
