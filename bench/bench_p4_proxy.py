"""P4: a warm proxied request, Roost's ``/agents/NAME/...`` vs direct and vs nginx.

Setup: ``roost up`` runs as a subprocess (exactly as deployed) with one mimic
agent, started once and kept awake (``idle_timeout = 0``). nginx (Debian's
``nginx-light``, one worker, upstream keep-alive) is started by this script on
a free port with ``proxy_pass`` to the same container URL. Every request is
``GET /health`` (a small JSON answer).

Load comes from ``wrk`` (Debian package ``wrk``), the same client for all three
targets, in its own process:
- latency: one connection, one thread, sequential requests for a fixed time;
  wrk's p50 (with ``--latency``) direct vs through Roost vs through nginx. The
  three targets are measured in interleaved rounds and the median per target
  taken, so drift hits them alike. Added latency = proxied p50 − direct p50.
- throughput: ``CONNECTIONS`` concurrent keep-alive connections for a fixed
  time; requests/s through Roost vs through nginx (and direct, for reference).
- CPU per request: the proxy's own CPU time (user + system, from
  ``/proc/PID/stat``: Roost's process, nginx's worker) over each throughput
  run, divided by the requests wrk counted. On these shared 2-core machines the
  throughput ratio follows this: every process of the pipeline (wrk, the proxy,
  docker-proxy, the agent) competes for the same cores.

Targets (issue 13): Roost's p50 added latency ≤ 0.15 ms; Roost's throughput
≥ 1.0× nginx's.

Run: ``.venv/bin/python bench/bench_p4_proxy.py [--quick]``
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import common

TARGET_ADDED_P50 = 0.00015
TARGET_THROUGHPUT_RATIO = 1.0
CONNECTIONS = 50
WRK_THREADS = 2
NGINX = "/usr/sbin/nginx"

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def need(tool: str) -> str:
    found = shutil.which(tool) or (tool if os.access(tool, os.X_OK) else None)
    if found is None:
        raise SystemExit(
            f"bench P4 needs {tool!r}: run scripts/setup (Debian packages wrk, nginx-light)"
        )
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (nginx's master: its workers)."""
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as listed:
        return [int(child) for child in listed.read().split()]


def wrk(
    url: str, *, connections: int, threads: int, seconds: float, pids: list[int] | None = None
) -> dict[str, float]:
    """Run wrk; return p50 latency (seconds), requests/s, the error count and, with
    ``pids``, their CPU seconds per request."""
    before = cpu_seconds(pids) if pids else 0.0
    out = subprocess.run(
        [
            need("wrk"),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if p50 is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    used = cpu_seconds(pids) - before if pids else 0.0
    requests = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    errors = 0
    for found in re.finditer(r"(?:Non-2xx or 3xx responses|Socket errors:.*?):?\s+(\d+)", out):
        errors += int(found.group(1))
    return {
        "p50": float(p50.group(1)) * _UNITS[p50.group(2)],
        "rps": float(rps.group(1)),
        "errors": errors,
        "cpu": used / int(requests.group(1)) if pids and requests else 0.0,
    }


def nginx_config(tmp: Path, port: int, upstream: str) -> Path:
    host_port = upstream.removeprefix("http://")
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream agent {{
        server {host_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /agents/echo/ {{
            proxy_pass http://agent/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_buffering off;
        }}
    }}
}}
""",
        encoding="utf-8",
    )
    return conf


async def wait_http(url: str, *, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:g}s")
            await asyncio.sleep(0.05)


def stop(process: subprocess.Popen[bytes], *, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def start_agent(roost_url: str, roost: subprocess.Popen[bytes]) -> str:
    """Wait for Roost, start the agent through its API; return the container URL."""
    await wait_http(roost_url + "/healthz", timeout=60, process=roost)
    async with (
        aiohttp.ClientSession() as http,
        http.post(roost_url + "/api/agents/echo/start") as response,
    ):
        agent: dict[str, Any] = await response.json()
        if response.status != 200:
            raise RuntimeError(f"cannot start the agent: {agent}")
    return str(agent["url"])


def roost_config(tmp: Path, port: int, instance: str) -> Path:
    path = tmp / "roost.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "state"
log_level = "warning"

[docker]
instance = "{instance}"

[defaults]
idle_timeout = 0
liveness_interval = 3600
memory = "128m"

[agents.echo]
image = "{common.MIMIC_IMAGE}"
env = {{ MODE = "echo" }}
""",
        encoding="utf-8",
    )
    return path


def main(quick: bool) -> None:
    need("wrk")
    need(NGINX)
    rounds = 2 if quick else 5
    latency_seconds = 2.0 if quick else 5.0
    load_seconds = 3.0 if quick else 10.0
    common.ensure_images()
    instance = common.run_id("bp4")
    with (
        tempfile.TemporaryDirectory(prefix="roost-bench-p4-") as tmp_name,
        open(Path(tmp_name) / "roost.log", "wb") as roost_log,
    ):
        tmp = Path(tmp_name)
        roost_port = common.free_port()
        roost_url = f"http://127.0.0.1:{roost_port}"
        # `roost up`, exactly as deployed (its own process, its own event loop).
        roost = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from roost.cli import main; main()",
                "--config",
                str(roost_config(tmp, roost_port, instance)),
                "up",
            ],
            stdout=roost_log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        nginx: subprocess.Popen[bytes] | None = None
        try:
            direct_url = asyncio.run(start_agent(roost_url, roost))
            nginx_port = common.free_port()
            (tmp / "body").mkdir()
            nginx = subprocess.Popen(
                [NGINX, "-c", str(nginx_config(tmp, nginx_port, direct_url)), "-p", str(tmp)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            targets = {
                "direct": direct_url + "/health",
                "roost": roost_url + "/agents/echo/health",
                "nginx": f"http://127.0.0.1:{nginx_port}/agents/echo/health",
            }
            asyncio.run(wait_http(targets["nginx"], timeout=10, process=nginx))
            # Warm-up: connection pools, caches, the container's threads.
            for url in targets.values():
                wrk(url, connections=CONNECTIONS, threads=WRK_THREADS, seconds=1)
            pids = {"direct": [], "roost": [roost.pid], "nginx": children(nginx.pid)}
            results = measure(targets, pids, rounds, latency_seconds, load_seconds)
        finally:
            if nginx is not None:
                stop(nginx)
            stop(roost, timeout=60)
            removed = asyncio.run(common.cleanup(common.INSTANCE_LABEL, instance))
            print(f"cleanup: removed {removed} container(s) labelled roost.instance={instance}")
    report(results, rounds, latency_seconds, load_seconds, quick)


def measure(
    targets: dict[str, str],
    pids: dict[str, list[int]],
    rounds: int,
    latency_seconds: float,
    load_seconds: float,
) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "rps": [], "errors": [], "cpu": []} for name in targets
    }
    for _ in range(rounds):
        for name, url in targets.items():
            one = wrk(url, connections=1, threads=1, seconds=latency_seconds)
            results[name]["p50"].append(one["p50"])
            results[name]["errors"].append(one["errors"])
    for _ in range(rounds):
        for name, url in targets.items():
            many = wrk(
                url,
                connections=CONNECTIONS,
                threads=WRK_THREADS,
                seconds=load_seconds,
                pids=pids[name],
            )
            results[name]["rps"].append(many["rps"])
            results[name]["cpu"].append(many["cpu"])
            results[name]["errors"].append(many["errors"])
    return results


def report(
    results: dict[str, dict[str, list[float]]],
    rounds: int,
    latency_seconds: float,
    load_seconds: float,
    quick: bool,
) -> None:
    p50 = {name: statistics.median(r["p50"]) for name, r in results.items()}
    rps = {name: statistics.median(r["rps"]) for name, r in results.items()}
    errors = {name: int(sum(r["errors"])) for name, r in results.items()}
    cpu = {name: statistics.median(r["cpu"]) for name, r in results.items()}
    added_roost = p50["roost"] - p50["direct"]
    added_nginx = p50["nginx"] - p50["direct"]
    ratio = rps["roost"] / rps["nginx"]
    rows = [
        {
            "target": name,
            "p50 latency (ms)": f"{p50[name] * 1000:.3f}",
            "added p50 (ms)": ""
            if name == "direct"
            else f"{(p50[name] - p50['direct']) * 1000:.3f}",
            f"requests/s ({CONNECTIONS} conns)": f"{rps[name]:.0f}",
            "proxy CPU per request (µs)": "" if name == "direct" else f"{cpu[name] * 1e6:.1f}",
            "errors": errors[name],
        }
        for name in ("direct", "roost", "nginx")
    ]
    common.record(
        f"P4 warm proxied GET /health ({common.machine()}; {rounds} interleaved rounds, "
        f"latency {latency_seconds:g}s × 1 conn, load {load_seconds:g}s × {CONNECTIONS} conns; "
        f"medians{'; QUICK' if quick else ''})",
        rows,
    )
    verdict_latency = "met" if added_roost <= TARGET_ADDED_P50 else "MISSED"
    verdict_rps = "met" if ratio >= TARGET_THROUGHPUT_RATIO else "MISSED"
    print(
        f"added p50 latency: Roost {added_roost * 1000:.3f} ms, nginx {added_nginx * 1000:.3f} ms "
        f"(target Roost ≤ {TARGET_ADDED_P50 * 1000:g} ms: {verdict_latency})"
    )
    print(
        f"throughput: Roost / nginx = {ratio:.2f} "
        f"(target ≥ {TARGET_THROUGHPUT_RATIO:g}: {verdict_rps}); "
        f"Roost / direct = {rps['roost'] / rps['direct']:.2f}"
    )
    pairs = [r / n for r, n in zip(results["roost"]["rps"], results["nginx"]["rps"], strict=True)]
    roost_cpu = results["roost"]["cpu"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"proxy CPU per request: Roost {cpu['roost'] * 1e6:.1f} µs "
        f"({min(roost_cpu) * 1e6:.1f}-{max(roost_cpu) * 1e6:.1f}), nginx "
        f"{cpu['nginx'] * 1e6:.1f} µs; Roost / nginx per round {min(pairs):.2f}-{max(pairs):.2f}; "
        f"load average now {load}"
    )
    print(
        "json: "
        + json.dumps(
            {
                "p50_s": p50,
                "rps": rps,
                "added_p50_s": {"roost": added_roost, "nginx": added_nginx},
                "rps_ratio_roost_nginx": ratio,
                "cpu_per_request_s": cpu,
                "errors": errors,
            }
        )
    )


if __name__ == "__main__":
    arguments = common.parse_args(__doc__.splitlines()[0] if __doc__ else "P4")
    main(arguments.quick)
