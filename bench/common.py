"""Shared helpers for the benchmarks in ``bench/``.

Every benchmark compares Roost against a raw baseline measured in the same run
(ratios hold across machines; absolute times drift). Invariants:

- every container a benchmark creates carries a label with a value unique to
  that run (``roost.instance=<run id>`` for Roost's, ``roost.bench=<run id>`` for
  the raw baseline's) and ``cleanup`` removes them all, also on error;
- the raw baseline creates containers with the same body Roost's Docker adapter
  sends (image, limits, published port, security options), so the only
  difference measured is Roost's own work;
- durations are float seconds internally; tables print milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from roost.adapters.docker_runtime import DockerRuntime
from roost.adapters.http_agent_client import HttpAgentClient
from roost.config import (
    ResolvedAgent,
    Settings,
    parse_agent_settings,
    parse_settings,
    resolve_agent,
)
from roost.ports.agent_http import ProbeResult
from roost.ports.runtime import ContainerSpec, ContainerState, RuntimeEvent

ROOT = Path(__file__).resolve().parent.parent
MIMIC_IMAGE = "roost-mimic:latest"
MIMIC_PORT = 8000
#: The readiness poll period of the raw baseline (Roost polls at the same rate).
RAW_POLL_INTERVAL = 0.005
RAW_PROBE_TIMEOUT = 1.0
BENCH_LABEL = "roost.bench"
INSTANCE_LABEL = "roost.instance"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    return parser.parse_args()


def ensure_images() -> None:
    """Build (or find cached) the local test images; no registry is involved."""
    subprocess.run([str(ROOT / "scripts" / "build-images")], check=True, capture_output=True)


def pinned_images() -> dict[str, str]:
    """Build (or find cached) the local images; ``:latest`` tag → the tag pinned to
    this checkout's inputs (``images/build.py``), which no other checkout's build
    replaces while the benchmark runs."""
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-images")], check=True, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"^([\w.-]+:latest): .* as (\S+)$", built, re.MULTILINE))


def run_id(prefix: str) -> str:
    """A label value unique to this run (a DNS label, usable as a Roost instance)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def make_settings(
    state_dir: Path,
    instance: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    docker: Mapping[str, Any] | None = None,
) -> Settings:
    document: dict[str, Any] = {
        "server": {"state_dir": str(state_dir)},
        "docker": {"instance": instance, **(docker or {})},
        "defaults": {"memory": "64m", "startup_timeout": 60, "stop_timeout": 1, **(defaults or {})},
    }
    return parse_settings(document, file=str(state_dir / "roost.toml"), base_dir=state_dir)


def agent_spec(
    settings: Settings, name: str, *, image: str = MIMIC_IMAGE, **overrides: Any
) -> ResolvedAgent:
    """An agent spec as ``POST /api/agents`` would build it (defaults merged)."""
    table = parse_agent_settings({"image": image, "port": MIMIC_PORT, **overrides}, name=name)
    return resolve_agent(name, settings.defaults, table)


def raw_create_config(run: str, name: str, *, memory: int = 64 * 1024**2) -> dict[str, Any]:
    """The create body Roost's Docker adapter sends for a mimic agent with the
    default limits, labelled for the raw baseline instead of for Roost."""
    port_key = f"{MIMIC_PORT}/tcp"
    return {
        "Image": MIMIC_IMAGE,
        "Labels": {BENCH_LABEL: run, "roost.bench.name": name},
        "Env": [f"ROOST_AGENT={name}", f"ROOST_AGENT_ID={name}", "ROOST_URL=http://x"],
        "ExposedPorts": {port_key: {}},
        "HostConfig": {
            "PortBindings": {port_key: [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            "Memory": memory,
            "MemorySwap": memory,
            "PidsLimit": 512,
            "SecurityOpt": ["no-new-privileges"],
            "ExtraHosts": ["host.docker.internal:host-gateway"],
        },
    }


#: HostConfig keys a baseline must share with Roost's container to measure only Roost.
SAME_HOST_CONFIG_KEYS = (
    "NetworkMode",
    "Memory",
    "MemorySwap",
    "PidsLimit",
    "SecurityOpt",
    "CapDrop",
    "CapAdd",
    "CgroupnsMode",
    "ExtraHosts",
    "NanoCpus",
    "ReadonlyRootfs",
)


def same_create_config(
    run: str,
    name: str,
    spec: ResolvedAgent,
    *,
    network: str | None,
    hardened: bool = True,
    image: str | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The create body Roost's Docker adapter sends for ``spec`` on ``network``
    (``settings.agents_network``: Roost's own ``roost-agents``), labelled for the
    raw baseline instead of for Roost.

    ``hardened=False`` leaves out what the agent's hardening adds (capabilities
    dropped, private cgroup namespace, no-new-privileges, pids and memory limits)
    and ``network=None`` joins Docker's default bridge: with both, Docker's plain
    container, whose difference to the same container is the features' own cost.
    ``verify_same`` checks the body against a container Roost created."""
    port_key = f"{spec.port}/tcp"
    host_config: dict[str, Any] = {
        "PortBindings": {port_key: [{"HostIp": "127.0.0.1", "HostPort": ""}]},
        "ExtraHosts": ["host.docker.internal:host-gateway"],
    }
    if network is not None:
        host_config["NetworkMode"] = network
    if hardened:
        if spec.memory:
            host_config["Memory"] = spec.memory
            host_config["MemorySwap"] = spec.memory
        if spec.pids_limit:
            host_config["PidsLimit"] = spec.pids_limit
        if spec.no_new_privileges:
            host_config["SecurityOpt"] = ["no-new-privileges"]
        if spec.cap_drop:
            host_config["CapDrop"] = list(spec.cap_drop)
        if spec.cap_add:
            host_config["CapAdd"] = list(spec.cap_add)
        host_config["CgroupnsMode"] = "private" if spec.private_cgroupns else "host"
    else:
        host_config["CgroupnsMode"] = "host"
    if spec.cpus is not None:
        host_config["NanoCpus"] = round(spec.cpus * 1e9)
    body: dict[str, Any] = {
        "Image": image or spec.image,
        "Labels": {BENCH_LABEL: run, "roost.bench.name": name},
        "Env": [
            *(f"{k}={v}" for k, v in spec.env.items()),
            f"ROOST_AGENT={name}",
            f"ROOST_AGENT_ID={name}",
            "ROOST_URL=http://x",
            f"ROOST_AGENT_TOKEN={secrets.token_urlsafe(32)}",
        ],
        "ExposedPorts": {port_key: {}},
        "HostConfig": host_config,
    }
    cmd = command if command is not None else spec.command
    if cmd:
        body["Cmd"] = list(cmd)
    return body


async def verify_same(docker: aiodocker.Docker, raw_id: str, roost_id: str) -> None:
    """Raise unless the two containers' HostConfigs agree on every key that shapes
    what Docker does at start (``SAME_HOST_CONFIG_KEYS``)."""
    raw = (await docker.containers.container(raw_id).show())["HostConfig"]
    ours = (await docker.containers.container(roost_id).show())["HostConfig"]
    differ = {
        key: (raw.get(key), ours.get(key))
        for key in SAME_HOST_CONFIG_KEYS
        if raw.get(key) != ours.get(key)
    }
    if differ:
        raise SystemExit(f"the baseline's container differs from Roost's: {differ}")


#: busybox httpd serving /www/health: the smallest agent (~1 MB of its own).
BUSYBOX_COMMAND = (
    "sh",
    "-c",
    "mkdir -p /www && echo ok > /www/health && exec httpd -f -p 8000 -h /www",
)
NETWORK_LABEL = "roost.bench.network"

_NEIGHBOUR = Path("/proc/sys/net/ipv4/neigh/default")


def neighbour_room(containers: int) -> None:
    """Make the host's neighbour (ARP) table hold ``containers`` reachable containers:
    each takes an entry on the host and one in its own namespace, in one table for
    all namespaces, and Debian's default (gc_thresh3 = 1024) stops at ~510 (new
    containers then never answer: "neighbor table overflow"). As root the limits
    are raised (and printed); otherwise the run stops naming the sysctl. ``roost
    doctor`` reports the same ceiling for a deployment."""
    need = 2 * containers + 1024
    current = int((_NEIGHBOUR / "gc_thresh3").read_text())
    if current >= need:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"{containers} containers need net.ipv4.neigh.default.gc_thresh3 >= {need} "
            f"(it is {current}): raise it as root, with gc_thresh2 and gc_thresh1 below it"
        )
    for key, value in (("gc_thresh3", need), ("gc_thresh2", need // 2), ("gc_thresh1", need // 8)):
        (_NEIGHBOUR / key).write_text(str(value))
    print(f"host: net.ipv4.neigh.default.gc_thresh3 {current} -> {need} (gc_thresh2/1 below it)")


@contextlib.asynccontextmanager
async def bench_network(run: str) -> Any:
    """A network of the run's own, made as Roost makes its agents' network (a bridge,
    inter-container traffic off): for runs of hundreds of containers, which would
    crowd the shared ``roost-agents`` (a Linux bridge holds at most 1023 ports)
    that other work on this engine uses. Its name is yielded; removed on the way out."""
    name = f"roost-bench-{run}"
    runtime = DockerRuntime()
    labels = {NETWORK_LABEL: run}
    try:
        await runtime.ensure_network(name, labels=labels, isolated=True)
        yield name
    finally:
        await asyncio.shield(runtime.remove_network(name, labels=labels))
        await runtime.close()


class RawStart:
    """One raw cold start: container id, base URL and ``time.time()`` marks."""

    __slots__ = ("cid", "create_called", "create_returned", "ready", "start_returned", "url")

    def __init__(self) -> None:
        self.cid = ""
        self.url = ""
        self.create_called = self.create_returned = self.start_returned = self.ready = 0.0


async def raw_cold_start(
    docker: aiodocker.Docker,
    http: aiohttp.ClientSession,
    config: Mapping[str, Any],
    name: str,
    *,
    timeout: float = 60.0,
) -> RawStart:
    """Raw baseline: create + start + inspect for the port + HTTP GET /health every
    5 ms until 200."""
    marks = RawStart()
    marks.create_called = time.time()
    container = await docker.containers.create(dict(config), name=name)
    marks.create_returned = time.time()
    marks.cid = str(container.id)
    await container.start()
    marks.start_returned = time.time()
    data = await container.show()
    binding = data["NetworkSettings"]["Ports"][f"{MIMIC_PORT}/tcp"][0]
    marks.url = f"http://127.0.0.1:{binding['HostPort']}"
    await poll_health(http, marks.url + "/health", timeout=timeout)
    marks.ready = time.time()
    return marks


async def poll_health(http: aiohttp.ClientSession, url: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(
                url, timeout=aiohttp.ClientTimeout(total=RAW_PROBE_TIMEOUT)
            ) as response:
                await response.read()
                if response.status == 200:
                    return
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")
        await asyncio.sleep(RAW_POLL_INTERVAL)


async def cleanup(label: str, value: str) -> int:
    """Force-remove every container labelled ``label=value``; return how many."""
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(all=True, filters={"label": [f"{label}={value}"]})
        results = await asyncio.gather(
            *(c.delete(force=True, v=True) for c in found), return_exceptions=True
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    for failure in failed:
        print(f"cleanup: {failure}", file=sys.stderr)
    return len(found) - len(failed)


@contextlib.asynccontextmanager
async def cleaned_up(*labels: tuple[str, str]) -> Any:
    """Remove every container carrying any of ``labels`` on the way out (errors too)."""
    try:
        yield
    finally:
        for label, value in labels:
            removed = await asyncio.shield(cleanup(label, value))
            print(f"cleanup: removed {removed} container(s) labelled {label}={value}")


class Call:
    """One runtime call Roost made: method, first argument, wall-clock call/return."""

    __slots__ = ("arg", "called", "method", "returned")

    def __init__(self, method: str, arg: str, called: float) -> None:
        self.method = method
        self.arg = arg
        self.called = called
        self.returned = 0.0


class InstrumentedRuntime(DockerRuntime):
    """The real Docker adapter, recording ``time.time()`` when Roost calls (and
    gets back from) the calls a start or restart is made of."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.dies: dict[str, float] = {}
        #: set whenever a call is recorded (waiters clear it before they look).
        self.changed = asyncio.Event()

    def _begin(self, method: str, arg: str) -> Call:
        call = Call(method, arg, time.time())
        self.calls.append(call)
        self.changed.set()
        return call

    def _end(self, call: Call) -> None:
        call.returned = time.time()
        self.changed.set()

    async def ensure_image(self, image: str, *, pull_timeout: float = 300.0) -> None:
        call = self._begin("ensure_image", image)
        try:
            await super().ensure_image(image, pull_timeout=pull_timeout)
        finally:
            self._end(call)

    async def create(self, spec: ContainerSpec) -> str:
        call = self._begin("create", spec.labels.get("roost.agent", ""))
        try:
            cid = await super().create(spec)
        finally:
            self._end(call)
        call.arg = cid
        return cid

    async def start(self, container_id: str) -> None:
        call = self._begin("start", container_id)
        try:
            await super().start(container_id)
        finally:
            self._end(call)

    async def remove(self, container_id: str, *, force: bool = True) -> None:
        call = self._begin("remove", container_id)
        try:
            await super().remove(container_id, force=force)
        finally:
            self._end(call)

    async def inspect(self, container_id: str) -> ContainerState:
        call = self._begin("inspect", container_id)
        try:
            return await super().inspect(container_id)
        finally:
            self._end(call)

    async def logs_tail(self, container_id: str, *, lines: int = 50) -> str:
        call = self._begin("logs_tail", container_id)
        try:
            return await super().logs_tail(container_id, lines=lines)
        finally:
            self._end(call)

    def events(
        self, labels: Mapping[str, str], *, kinds: Collection[str] | None = None
    ) -> AsyncIterator[RuntimeEvent]:
        """The real event stream, recording when Roost's watcher got each ``die``
        (``dies``: container id → ``time.time()``), parsed and about to be handled."""
        stream = super().events(labels, kinds=kinds)

        async def recorded() -> AsyncIterator[RuntimeEvent]:
            async for event in stream:
                if event.kind == "die":
                    self.dies[event.container_id] = time.time()
                yield event

        return recorded()

    def first(self, method: str, *, after: float, arg: str | None = None) -> Call | None:
        for call in self.calls:
            if call.method == method and call.called >= after and (arg is None or call.arg == arg):
                return call
        return None


class InstrumentedAgentClient(HttpAgentClient):
    """The real agent client, recording ``time.time()`` when a probe answered 200."""

    def __init__(self) -> None:
        super().__init__()
        #: (url, time the probe returned ok)
        self.ok_probes: list[tuple[str, float]] = []

    async def probe(self, url: str, *, timeout: float) -> ProbeResult:
        result = await super().probe(url, timeout=timeout)
        if result.ok:
            self.ok_probes.append((url, time.time()))
        return result

    def first_ok(self, *, after: float) -> float | None:
        return next((at for _, at in self.ok_probes if at >= after), None)


# -- a `roost up` daemon, exactly as deployed (own process, own event loop) ------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_roost_config(
    directory: Path, instance: str, port: int, body: str, *, server: str = ""
) -> Path:
    """``directory/roost.toml`` listening on ``port`` with ``body`` (defaults, agents).

    The agent listener takes a free port (``agent_listen = ":0"``) unless ``server``
    sets it: on a shared machine another Roost may hold the default 7076."""
    if "agent_listen" not in server:
        server = f'agent_listen = ":0"\n{server}'
    config = directory / "roost.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
state_dir = "{directory / "state"}"
log_level = "warning"
{server}

[docker]
instance = "{instance}"

{body}
""",
        encoding="utf-8",
    )
    return config


async def start_roost(config: Path, log: Path) -> asyncio.subprocess.Process:
    roost = Path(sys.executable).parent / "roost"
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            str(roost),
            "--config",
            str(config),
            "up",
            stdout=output,
            stderr=output,
            env={**os.environ, "ROOST_TOKEN": ""},
        )


async def wait_roost(
    http: aiohttp.ClientSession,
    base: str,
    process: asyncio.subprocess.Process,
    log: Path,
    *,
    timeout: float = 30.0,
) -> None:
    """Poll ``base/healthz`` until it answers 200; a daemon that exits first is an
    error carrying its log tail (instead of a health timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.returncode is not None:
            tail = log.read_text(errors="replace")[-3000:]  # noqa: ASYNC240 (a failing run)
            raise RuntimeError(f"roost up exited with {process.returncode}:\n{tail}")
        try:
            await poll_health(http, base + "/healthz", timeout=RAW_PROBE_TIMEOUT)
            return
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    rank = max(1, -(-9 * len(ordered) // 10))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def record(name: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Print (and return) ``rows`` as a markdown table headed by ``name``."""
    if not rows:
        text = f"### {name}\n\n(no rows)\n"
    else:
        columns = list(rows[0])
        lines = [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
        ]
        for row in rows:
            lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
        text = f"### {name}\n\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    return text
