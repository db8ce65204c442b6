"""P7: Roost's resident memory and idle CPU with many registered and running agents.

The engine runs in a child process (this file with ``--child``) so its memory is
its own: it registers ``TOTAL`` agents (``engine.agents.register``), starts
``RUNNING`` of them, reports, then idles until SIGTERM. Idle means no API
traffic; the liveness probe of every running agent (``liveness_interval`` 10 s,
the default) still runs, so it is part of the idle CPU. ``idle_timeout`` and
``idle_mark_after`` are set far out so no agent changes state in the window.

The child waits for SIGUSR1 after each report, so every reading is of a
known phase. Set ``ROOST_BENCH_PROFILE=FILE`` to cProfile the child's idle window.

The parent reads the child's ``VmRSS`` / ``VmHWM`` (/proc/PID/status) and
``utime + stime`` (/proc/PID/stat) over an idle window (30 s; 10 s with
``--quick``). Baselines, from the same child: the RSS of the started engine with
no agents, and with all agents registered but none running (whose idle CPU over
the same window is the probe-free floor).
Targets: RSS ≤ 120 MB, idle CPU ≤ 1 % (of one core).

Run: ``.venv/bin/python bench/bench_p7_footprint.py [--quick]``
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

import common

from roost.engine import Engine

TARGET_RSS_MB = 120.0
TARGET_CPU_PERCENT = 1.0
SETTLE = 3.0
LIVENESS_INTERVAL = 10.0
#: Set to a file path to have the child cProfile its idle window into it.
PROFILE_ENV = "ROOST_BENCH_PROFILE"


# -- the child: one Roost ---------------------------------------------------------------


async def child(state_dir: Path, instance: str, total: int, running: int) -> None:
    settings = common.make_settings(
        state_dir,
        instance,
        defaults={
            "idle_timeout": 86400,
            "idle_mark_after": 86400,
            "liveness_interval": LIVENESS_INTERVAL,
            "startup_timeout": 300,
        },
    )
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
            await engine.agents.register(common.agent_spec(settings, name))
        await report("REGISTERED")
        t0 = time.monotonic()
        await asyncio.gather(
            *(engine.supervisor.ensure_running(n, timeout=300) for n in names[:running])
        )
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


async def expect(stream: asyncio.StreamReader, word: str, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise RuntimeError(f"the Roost child exited before {word}")
            if line.startswith(word):
                return line.strip()


async def parent(quick: bool) -> None:
    total, running, window = (100, 20, 10.0) if quick else (1000, 200, 30.0)
    common.ensure_images()
    instance = common.run_id("bp7")
    with tempfile.TemporaryDirectory(prefix="roost-bench-p7-") as tmp:
        async with common.cleaned_up((common.INSTANCE_LABEL, instance)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                tmp,
                instance,
                str(total),
                str(running),
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            try:
                await expect(proc.stdout, "ENGINE_UP", 60)
                await asyncio.sleep(SETTLE)
                empty_kib = rss_kib(proc.pid)
                proc.send_signal(signal.SIGUSR1)
                await expect(proc.stdout, "REGISTERED", 300)
                await asyncio.sleep(SETTLE)
                registered_kib = rss_kib(proc.pid)
                # Idle CPU with no agent running: the probe-free floor.
                floor_before, floor_t0 = cpu_seconds(proc.pid), time.monotonic()
                await asyncio.sleep(window)
                floor_cpu = cpu_seconds(proc.pid) - floor_before
                floor_percent = floor_cpu / (time.monotonic() - floor_t0) * 100
                proc.send_signal(signal.SIGUSR1)
                started = await expect(proc.stdout, "STARTED", 900)
                await asyncio.sleep(SETTLE)
                cpu_before, t_before = cpu_seconds(proc.pid), time.monotonic()
                user_before = cpu_seconds(proc.pid, user_only=True)
                await asyncio.sleep(window)
                cpu_after, t_after = cpu_seconds(proc.pid), time.monotonic()
                user_share = (cpu_seconds(proc.pid, user_only=True) - user_before) / max(
                    cpu_after - cpu_before, 1e-9
                )
                idle_kib = rss_kib(proc.pid)
                peak_kib = rss_kib(proc.pid, "VmHWM")
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        async with asyncio.timeout(60):
                            await proc.wait()
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()

    cpu_percent = (cpu_after - cpu_before) / (t_after - t_before) * 100
    probes_per_second = running / LIVENESS_INTERVAL
    per_probe = (cpu_percent - floor_percent) / 100 / probes_per_second
    mb = 1024.0
    common.record(
        f"P7 footprint: {total} registered, {running} running, {window:g} s idle window",
        [
            {
                "measure": "RSS, engine started, no agents (baseline)",
                "value": f"{empty_kib / mb:.1f} MB",
            },
            {
                "measure": f"RSS, {total} registered, none running",
                "value": f"{registered_kib / mb:.1f} MB",
            },
            {
                "measure": f"RSS, {total} registered, {running} running, idle",
                "value": f"{idle_kib / mb:.1f} MB",
            },
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
                "value": f"{per_probe * 1000:.2f} ms",
            },
            {"measure": "time to start the running agents", "value": started.split()[1] + " s"},
        ],
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
        _, _, state_dir, instance, total, running = sys.argv
        # The same event loop as `roost up` (uvloop, installed with uvicorn[standard]).
        import uvloop

        uvloop.run(child(Path(state_dir), instance, int(total), int(running)))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    asyncio.run(parent(parser.parse_args().quick))


if __name__ == "__main__":
    main()
