"""P7: Roost's resident memory and idle CPU with many registered and running agents.

The engine runs in a child process (this file with ``--child``, on uvloop like
``roost up``) so its memory is its own: it registers ``--total`` agents
(``engine.agents.register``), starts ``--running`` of them in steps, reports
after each, then idles until SIGTERM. Idle means no API traffic; the liveness
probe of every running agent (``liveness_interval`` 10 s, the default) still
runs, so it is part of the idle CPU. ``idle_timeout`` and ``idle_mark_after`` are
set far out so no agent changes state in the window.

The agent: ``busybox`` (default: busybox ``httpd`` serving /health, the smallest
agent, so a thousand fit on this machine) or ``mimic`` (the Python test agent,
~40 MB per container with its docker-proxy and shim). The agents join a network of
the run's own, made as Roost makes ``roost-agents`` (a Linux bridge holds at most
1023 containers, and other work uses the shared one).

The child waits for SIGUSR1 after each report, so every reading is of a known
phase. Set ``ROOST_BENCH_PROFILE=FILE`` to cProfile the child's idle window.

The parent reads the child's ``VmRSS`` / ``VmHWM`` (/proc/PID/status) and
``utime + stime`` (/proc/PID/stat) over idle windows (30 s; 10 s with
``--quick``). Baselines, from the same child: the RSS of the started engine with
no agents, and with all agents registered but none running (whose idle CPU over
the same window is the probe-free floor). The RSS after each step of running
agents gives the per-agent slope (what 1000 would cost where fewer fit).
Targets: RSS ≤ 150 MB, idle CPU ≤ 1 % (of one core).

Run: ``.venv/bin/python bench/bench_p7_footprint.py [--quick] [--total N]
[--running N] [--steps K] [--agent busybox|mimic]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from roost.engine import Engine

TARGET_RSS_MB = 150.0
TARGET_CPU_PERCENT = 1.0
SETTLE = 3.0
LIVENESS_INTERVAL = 10.0
#: Set to a file path to have the child cProfile its idle window into it.
PROFILE_ENV = "ROOST_BENCH_PROFILE"


# -- the child: one Roost ---------------------------------------------------------------


async def child(
    state_dir: Path,
    instance: str,
    total: int,
    running: int,
    steps: int,
    agent: str,
    image: str,
    network: str,
) -> None:
    settings = common.make_settings(
        state_dir,
        instance,
        defaults={
            "idle_timeout": 86400,
            "idle_mark_after": 86400,
            "liveness_interval": LIVENESS_INTERVAL,
            "startup_timeout": 600,
        },
        docker={"agent_network": network},
    )
    overrides: dict[str, Any] = {"image": image}
    if agent == "busybox":
        overrides["command"] = list(common.BUSYBOX_COMMAND)
    stop = asyncio.Event()
    proceed = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, proceed.set)

    async def report(word: str) -> None:
        # The parent measures, then signals SIGUSR1 to go on.
        proceed.clear()
        print(word, flush=True)
        await proceed.wait()

    async with Engine(settings) as engine:
        await report("ENGINE_UP")
        names = [f"a{i}" for i in range(total)]
        for name in names:
            await engine.agents.register(common.agent_spec(settings, name, **overrides))
        await report("REGISTERED")
        t0 = time.monotonic()
        started = 0
        for step in range(1, steps + 1):
            upto = running * step // steps
            await asyncio.gather(
                *(engine.supervisor.ensure_running(n, timeout=600) for n in names[started:upto])
            )
            started = upto
            if step < steps:
                await report(f"STEP {started}")
        profile_to = os.environ.get(PROFILE_ENV)
        profiler = cProfile.Profile() if profile_to else None
        print(f"STARTED {time.monotonic() - t0:.1f}", flush=True)
        if profiler is not None:
            profiler.enable()
        await stop.wait()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile_to))
        await engine.stop(leave_running=True)


# -- the parent: measure it -------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int, *, user_only: bool = False) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    ticks = int(fields[11]) + (0 if user_only else int(fields[12]))
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_on_host() -> int:
    return sum(1 for _ in Path("/proc").glob("[0-9]*/task/[0-9]*"))


async def expect(stream: asyncio.StreamReader, word: str, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise RuntimeError(f"the Roost child exited before {word}")
            if line.startswith(word):
                return line.strip()


async def idle_cpu(pid: int, window: float) -> tuple[float, float]:
    """(% of one core, user share) over ``window`` seconds."""
    before, user_before, t0 = cpu_seconds(pid), cpu_seconds(pid, user_only=True), time.monotonic()
    await asyncio.sleep(window)
    spent = cpu_seconds(pid) - before
    user = cpu_seconds(pid, user_only=True) - user_before
    return spent / (time.monotonic() - t0) * 100, user / max(spent, 1e-9)


async def parent(
    total: int, running: int, steps: int, window: float, agent: str, images: dict[str, str]
) -> None:
    image = images["roost-busybox:latest" if agent == "busybox" else "roost-mimic:latest"]
    common.neighbour_room(running)
    instance = common.run_id("bp7")
    load_before = os.getloadavg()
    step_rss: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="roost-bench-p7-") as tmp:
        async with (
            common.bench_network(instance) as network,
            common.cleaned_up((common.INSTANCE_LABEL, instance)),
        ):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                tmp,
                instance,
                str(total),
                str(running),
                str(steps),
                agent,
                image,
                network,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            try:
                await expect(proc.stdout, "ENGINE_UP", 60)
                await asyncio.sleep(SETTLE)
                empty_kib = rss_kib(proc.pid)
                proc.send_signal(signal.SIGUSR1)
                await expect(proc.stdout, "REGISTERED", 600)
                await asyncio.sleep(SETTLE)
                registered_kib = rss_kib(proc.pid)
                step_rss.append((0, registered_kib))
                # Idle CPU with no agent running: the probe-free floor.
                floor_percent, _ = await idle_cpu(proc.pid, window)
                proc.send_signal(signal.SIGUSR1)
                while True:
                    line = await expect(proc.stdout, "S", 1800)  # STEP n or STARTED s
                    if line.startswith("STARTED"):
                        started = line
                        break
                    await asyncio.sleep(SETTLE)
                    step_rss.append((int(line.split()[1]), rss_kib(proc.pid)))
                    print(f"{line}: RSS {step_rss[-1][1] / 1024:.1f} MB", flush=True)
                    proc.send_signal(signal.SIGUSR1)
                await asyncio.sleep(SETTLE)
                host_threads = threads_on_host()
                cpu_percent, user_share = await idle_cpu(proc.pid, window)
                idle_kib = rss_kib(proc.pid)
                step_rss.append((running, idle_kib))
                peak_kib = rss_kib(proc.pid, "VmHWM")
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        async with asyncio.timeout(120):
                            await proc.wait()
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()

    probes_per_second = running / LIVENESS_INTERVAL
    per_probe = (cpu_percent - floor_percent) / 100 / probes_per_second
    mb = 1024.0
    slope = (step_rss[-1][1] - step_rss[0][1]) / max(running, 1)
    rows = [
        {
            "measure": "RSS, engine started, no agents (baseline)",
            "value": f"{empty_kib / mb:.1f} MB",
        },
        {
            "measure": f"RSS, {total} registered, none running",
            "value": f"{registered_kib / mb:.1f} MB",
        },
        {
            "measure": "RSS per registered agent",
            "value": f"{(registered_kib - empty_kib) / max(total, 1):.1f} KiB",
        },
        *(
            {"measure": f"RSS, {n} running", "value": f"{kib / mb:.1f} MB"}
            for n, kib in step_rss[1:-1]
        ),
        {
            "measure": f"RSS, {total} registered, {running} running, idle",
            "value": f"{idle_kib / mb:.1f} MB",
        },
        {"measure": "RSS per running agent (slope over the steps)", "value": f"{slope:.1f} KiB"},
        {"measure": "peak RSS (VmHWM)", "value": f"{peak_kib / mb:.1f} MB"},
        {
            "measure": f"idle CPU, {total} registered, none running (% of one core)",
            "value": f"{floor_percent:.2f} %",
        },
        {
            "measure": f"idle CPU, {running} running (% of one core)",
            "value": f"{cpu_percent:.2f} % ({user_share:.0%} user)",
        },
        {
            "measure": "CPU per liveness probe (from the difference)",
            "value": f"{per_probe * 1000:.3f} ms",
        },
        {"measure": "time to start the running agents", "value": started.split()[1] + " s"},
        {"measure": "threads on the host with them running", "value": str(host_threads)},
        {
            "measure": "load average (1 min), before → after",
            "value": f"{load_before[0]:.2f} → {os.getloadavg()[0]:.2f}",
        },
    ]
    common.record(
        f"P7 footprint: {total} registered, {running} running {agent} agents, "
        f"{window:g} s idle windows",
        rows,
    )
    rss_mb = idle_kib / mb
    print(
        f"RSS {rss_mb:.1f} MB (target ≤ {TARGET_RSS_MB:g}: "
        f"{'met' if rss_mb <= TARGET_RSS_MB else 'MISSED'}); idle CPU {cpu_percent:.2f} % "
        f"(target ≤ {TARGET_CPU_PERCENT:g} %: "
        f"{'met' if cpu_percent <= TARGET_CPU_PERCENT else 'MISSED'})"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, state_dir, instance, total, running, steps, agent, image, network = sys.argv
        # The same event loop as `roost up` (uvloop, installed with uvicorn[standard]).
        import uvloop

        uvloop.run(
            child(
                Path(state_dir),
                instance,
                int(total),
                int(running),
                int(steps),
                agent,
                image,
                network,
            )
        )
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 / 100, 10 s windows")
    parser.add_argument("--total", type=int, default=5000)
    parser.add_argument("--running", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4, help="running agents started in steps")
    parser.add_argument("--window", type=float, default=30.0, help="idle window, seconds")
    parser.add_argument("--agent", choices=("busybox", "mimic"), default="busybox")
    args = parser.parse_args()
    total, running, window = (
        (500, 100, 10.0) if args.quick else (args.total, args.running, args.window)
    )
    asyncio.run(
        parent(total, running, max(1, args.steps), window, args.agent, common.pinned_images())
    )


if __name__ == "__main__":
    main()
