"""``roost up`` (the daemon in the foreground) and ``roost doctor`` (checks of this machine).

Role: the two verbs that run on this machine rather than asking a daemon:
``up`` serves (:func:`roost.serving.serve`), ``doctor`` checks the config,
Docker, the agents' images, the state directory and whether a daemon answers.

Invariants:
- The server stack (the engine, uvicorn, aiodocker) is imported inside these
  commands only: every other verb starts without it.
- ``doctor`` exits 2 when the configuration is invalid, 1 when a required
  check failed, 0 otherwise; a daemon that does not answer is only a warning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from roost import errors
from roost.cli import client, output

if TYPE_CHECKING:
    from roost.config import Settings

__all__ = ["Check", "doctor", "run_doctor", "up"]

DOCTOR_PROBE_TIMEOUT = 2.0


def _run_daemon(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop when it is installed (it comes with uvicorn[standard];
    measured: a lower per-request cost on the proxy and message paths), else asyncio."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@click.command()
def up() -> NoReturn:
    """Run the Roost daemon in the foreground (Ctrl-C or SIGTERM stops it)."""
    from roost import serving  # the server stack is only needed here

    settings = client.current().settings()
    sys.exit(_run_daemon(serving.serve(settings)))


# --------------------------------------------------------------------------- doctor


@dataclasses.dataclass
class Check:
    name: str
    #: "ok", "fail" (required check failed), "warn" (informational) or "skip".
    status: str
    detail: str
    fix: str = ""
    required: bool = True


#: The kernel's limit on neighbour (ARP) entries, one table for all network namespaces.
NEIGHBOUR_LIMIT = Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
#: Below room for this many agents at once, doctor warns.
NEIGHBOUR_WARN_AGENTS = 1000


def check_neighbour_table(limit: int | None) -> Check:
    """How many agents can run at once before the host's neighbour table overflows:
    every container the host talks to (probes, deliveries, the proxy, docker-proxy)
    holds an entry on the host and one in its own namespace, and the table is shared
    by all namespaces. Past the limit new containers start but never answer (the
    kernel logs "neighbor table overflow"), so their agents time out starting."""
    name = "neighbour table"
    if limit is None:
        return Check(name, "skip", "not checked: no /proc/sys/net (not Linux)", required=False)
    room = limit // 2
    detail = f"room for about {room} agents at once (net.ipv4.neigh.default.gc_thresh3 = {limit})"
    if room >= NEIGHBOUR_WARN_AGENTS:
        return Check(name, "ok", detail, required=False)
    return Check(
        name,
        "warn",
        detail + "; past it new agents never answer their health check",
        "for more, raise net.ipv4.neigh.default.gc_thresh1/2/3 "
        "(e.g. sysctl -w net.ipv4.neigh.default.gc_thresh3=8192, and gc_thresh2/1 below it)",
        required=False,
    )


def _neighbour_limit() -> int | None:
    try:
        return int(NEIGHBOUR_LIMIT.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _check_state_dir(path: Path) -> Check:
    fix = f"make {path} writable by this user, or set server.state_dir"
    if path.exists():
        if not path.is_dir():
            return Check("state dir", "fail", f"{path} exists and is not a directory", fix)
        if os.access(path, os.W_OK | os.X_OK):
            return Check("state dir", "ok", f"{path} is writable")
        return Check("state dir", "fail", f"{path} is not writable", fix)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return Check("state dir", "ok", f"{path} will be created")
    return Check("state dir", "fail", f"{path} cannot be created ({parent} is not writable)", fix)


async def _docker_checks(settings: Settings | None) -> list[Check]:
    from roost.adapters.docker_runtime import DockerRuntime

    host = settings.docker.host if settings is not None else ""
    runtime = DockerRuntime(host or None)
    checks: list[Check] = []
    try:
        try:
            version = await runtime.ping()
        except errors.RoostError as exc:
            checks.append(Check("docker", "fail", str(exc), "start dockerd: run scripts/setup"))
            checks.append(Check("images", "skip", "not checked: Docker is unreachable"))
            return checks
        checks.append(Check("docker", "ok", f"Docker answers, API version {version}"))
        if settings is None:
            checks.append(Check("images", "skip", "not checked: the configuration is invalid"))
            return checks
        if settings.docker.backend == "swarm":
            checks.append(await _swarm_check(settings))
            checks.append(
                Check("images", "skip", "not checked: each swarm node pulls what its tasks need")
            )
            return checks
        agents = settings.resolved_agents()
        if not agents:
            checks.append(Check("images", "ok", "no agents configured"))
        for name, spec in agents.items():
            try:
                present = await runtime.image_exists(spec.image)
            except errors.RoostError as exc:
                checks.append(Check(f"image {spec.image}", "fail", f"agent {name}: {exc}"))
                continue
            if present:
                checks.append(Check(f"image {spec.image}", "ok", f"present (agent {name})"))
            else:
                checks.append(
                    Check(
                        f"image {spec.image}",
                        "fail",
                        f"absent (agent {name}); no registry may be reachable to pull it",
                        f"build images: scripts/build-images (or docker pull {spec.image})",
                    )
                )
    finally:
        await runtime.close()
    return checks


async def _swarm_check(settings: Settings) -> Check:
    from roost.adapters.swarm_backend import SwarmBackend

    backend = SwarmBackend(settings.docker.host or None)
    try:
        await backend.ping()  # (also checks that the engine is a swarm manager)
    except errors.RoostError as exc:
        return Check(
            "swarm",
            "fail",
            str(exc),
            "point docker.host at a swarm manager, or set docker.backend = 'engine'",
        )
    finally:
        await backend.close()
    return Check("swarm", "ok", "docker.host is a swarm manager (docker.backend = 'swarm')")


def _check_daemon(url: str | None) -> Check:
    if url is None:
        return Check(
            "daemon", "skip", "not checked: no URL (the configuration is invalid)", required=False
        )
    try:
        with client.ApiClient(url, None) as api:
            body = api.healthz(DOCTOR_PROBE_TIMEOUT)
    except client.CliError as exc:
        return Check("daemon", "warn", exc.format_message(), required=False)
    if body is not None and body.get("ok"):
        return Check(
            "daemon",
            "ok",
            f"Roost answers at {url} ({body.get('agents')} agents, "
            f"Docker API {body.get('docker_api')})",
            required=False,
        )
    if body is not None:
        problems = body.get("problems") or {}
        reasons = "; ".join(f"{k}: {v}" for k, v in problems.items()) or "degraded"
        return Check("daemon", "warn", f"Roost at {url} is degraded: {reasons}", required=False)
    return Check(
        "daemon", "warn", f"no Roost answers at {url}", "start it with `roost up`", required=False
    )


def _check_drift(url: str, token: str | None, settings: Settings) -> Check | None:
    """The daemon's configured agents against the file's: what ``roost reload`` would do."""
    try:
        with client.ApiClient(url, token) as api:
            running = api.json("GET", "/api/config", read_timeout=DOCTOR_PROBE_TIMEOUT)
    except client.CliError:
        return None  # an older or unreachable daemon: nothing to compare
    theirs = running.get("agents") if isinstance(running, dict) else None
    if not isinstance(theirs, dict):
        return None
    ours = {name: spec.shown() for name, spec in settings.resolved_agents().items()}
    added = sorted(set(ours) - set(theirs))
    removed = sorted(set(theirs) - set(ours))
    changed = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
    if not (added or removed or changed):
        return Check("drift", "ok", "the daemon runs what the file says", required=False)
    parts = [
        f"{what}: {', '.join(names)}"
        for what, names in (("added", added), ("removed", removed), ("changed", changed))
        if names
    ]
    return Check(
        "drift",
        "warn",
        "the file differs from the running daemon (" + "; ".join(parts) + ")",
        "apply it with `roost reload` (or SIGHUP)",
        required=False,
    )


def run_doctor(connection: client.Connection) -> tuple[list[Check], int]:
    """All checks, and the exit code they add up to."""
    import asyncio

    from roost import config

    checks: list[Check] = []
    settings: Settings | None = None
    try:
        settings = config.load_settings(connection.config_path)
        source = settings.source_file or "built-in defaults (no roost.toml found)"
        checks.append(Check("config", "ok", f"{source}: {len(settings.agents)} agents"))
    except errors.ConfigError as exc:
        click.echo(f"roost: configuration error: {exc}", err=True)
        checks.append(Check("config", "fail", str(exc), "fix the key named above"))
    with output.waiting("checking Docker"):
        checks.extend(asyncio.run(_docker_checks(settings)))
    if settings is not None:
        checks.append(_check_state_dir(settings.state_path()))
        if settings.docker.backend != "swarm":  # (each swarm node has its own table)
            checks.append(check_neighbour_table(_neighbour_limit()))
    else:
        checks.append(Check("state dir", "skip", "not checked: the configuration is invalid"))
    url = connection.url_option.rstrip("/") if connection.url_option else None
    if url is None and settings is not None:
        url = client.default_api_url(settings)
    checks.append(_check_daemon(url))
    if url is not None and settings is not None and checks[-1].status != "warn":
        try:
            token = connection.token()
        except click.ClickException:
            token = None
        drift = _check_drift(url, token, settings)
        if drift is not None:
            checks.append(drift)
    if checks[0].status == "fail":
        return checks, client.EXIT_CONFIG
    failed = any(c.status == "fail" and c.required for c in checks)
    return checks, client.EXIT_FAILURE if failed else 0


@click.command()
@click.option(
    "--restart", is_flag=True, help="Also restart running agents whose container changed."
)
@output.json_option
def reload(restart: bool, as_json: bool) -> None:
    """Re-read the daemon's config file and apply it (as SIGHUP does)."""
    with client.current().client() as api:
        report = api.json("POST", "/api/reload", params={"restart": "true"} if restart else {})
    if as_json:
        output.print_json(report)
        return
    changes = [
        f"{what} {', '.join(report.get(what) or [])}"
        for what in ("added", "removed", "changed")
        if report.get(what)
    ]
    click.echo(
        "reloaded "
        + str(report.get("source_file"))
        + ": "
        + ("; ".join(changes) or "no agent changed")
    )
    if report.get("needs_restart"):
        click.echo(
            "not applied until `roost up` restarts: " + ", ".join(report["needs_restart"]),
            err=True,
        )


@click.command()
@output.json_option
def doctor(as_json: bool) -> None:
    """Check this machine: config, Docker, images, state dir, the daemon."""
    checks, code = run_doctor(client.current())
    if as_json:
        output.print_json({"ok": code == 0, "checks": [dataclasses.asdict(c) for c in checks]})
    else:
        for check in checks:
            label = {"ok": "ok", "fail": "FAIL", "warn": "warn", "skip": "skip"}[check.status]
            detail = check.detail.replace("\n", "\n" + " " * 8)
            click.echo(f"{label:<6}  {check.name}: {detail}")
            if check.fix and check.status in ("fail", "warn"):
                click.echo(f"        fix: {check.fix}")
    if code:
        sys.exit(code)
