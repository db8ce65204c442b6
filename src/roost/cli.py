"""The ``roost`` command line: a thin front end over the daemon's admin HTTP API.

Role: ``up`` runs the daemon in the foreground (:func:`roost.serving.serve`);
``doctor`` checks this machine locally; every other verb talks to a running
daemon over HTTP (httpx) and prints what it answered.

Invariants:
- Exit codes: 0 success, 1 failure (the daemon refused, Docker is missing, no
  daemon answers), 2 bad configuration or usage (the message names the key).
- Messages for people go to stderr as one ``roost: ...`` line that says what to
  do; ``--json`` prints the daemon's JSON unchanged on stdout.
- Where things come from: ``--config`` (else ``ROOST_CONFIG``, else
  ``./roost.toml``); the daemon URL from ``--url``, else ``server.listen``; the
  token from ``--token``, else ``ROOST_TOKEN``, else ``server.token_file``. The
  configuration is read only when a value is needed from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx

from roost import errors
from roost.config import Settings, load_settings

__all__ = ["main"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2
#: Seconds allowed to connect to the daemon, and to answer reads.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: Extra seconds the CLI waits beyond a start/wake ``--timeout`` it asked the daemon for.
WAIT_MARGIN = 10.0
DOCTOR_PROBE_TIMEOUT = 2.0


class CliError(click.ClickException):
    """A failure reported as one ``roost: ...`` line on stderr (exit 1)."""

    exit_code = EXIT_FAILURE

    def show(self, file: Any = None) -> None:
        click.echo(f"roost: {self.format_message()}", err=True)


class CliUsageError(CliError):
    """Bad configuration or arguments (exit 2)."""

    exit_code = EXIT_CONFIG


def _run_daemon(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop when it is installed (it comes with uvicorn[standard];
    measured: a lower per-request cost on the proxy and message paths), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _config_failure(exc: errors.ConfigError) -> CliError:
    return CliUsageError(f"configuration error: {exc}")


# --------------------------------------------------------------------------- context


def default_api_url(settings: Settings) -> str:
    """The URL a local client uses to reach ``server.listen``."""
    host = settings.server.listen_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{settings.server.listen_port}"


@dataclasses.dataclass
class CliContext:
    config_path: str | None
    url_option: str | None
    token_option: str | None
    _settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except errors.ConfigError as exc:
                raise _config_failure(exc) from exc
        return self._settings

    def url(self) -> str:
        url = self.url_option or default_api_url(self.settings())
        return url.rstrip("/")

    def token(self) -> str | None:
        if self.token_option:
            return self.token_option
        try:
            return self.settings().token()
        except errors.ConfigError as exc:
            raise _config_failure(exc) from exc

    def client(self) -> ApiClient:
        return ApiClient(self.url(), self.token())


class ApiClient:
    """Blocking HTTP calls to the daemon, with failures turned into :class:`CliError`."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(
                base_url=url,
                headers=headers,
                timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            )
        except httpx.InvalidURL as exc:
            raise CliUsageError(f"invalid --url {url!r}: {exc}") from exc

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | httpx.QueryParams | None = None,
        read_timeout: float | None = READ_TIMEOUT,
        body: Any = None,
    ) -> httpx.Response:
        timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT)
        try:
            response = self._http.request(method, path, params=params, json=body, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CliError(f"no Roost answers at {self.url}; start it with `roost up`") from exc
        except httpx.TimeoutException as exc:
            raise CliError(f"Roost at {self.url} did not answer {method} {path} in time") from exc
        except httpx.UnsupportedProtocol as exc:
            raise CliUsageError(f"invalid --url {self.url!r}: use http://host:port") from exc
        except httpx.HTTPError as exc:
            raise CliError(f"talking to Roost at {self.url} failed: {exc}") from exc
        if response.status_code >= 400:
            raise CliError(_error_message(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise CliError(
                f"Roost at {self.url} answered {method} {path} with something other than JSON"
            ) from exc


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        message = error
    else:
        message = f"HTTP {response.status_code}: {response.text.strip()[:200]}"
    if response.status_code == 401:
        message += " (pass --token, set ROOST_TOKEN, or set server.token_file in the config)"
    tail = body.get("log_tail") if isinstance(body, dict) else None
    if isinstance(tail, str) and tail.strip() and tail.strip() not in message:
        message += "\nlog tail:\n" + tail.rstrip()
    return message


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- group


@click.group(name="roost", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $ROOST_CONFIG, else ./roost.toml).",
)
@click.option("--url", default=None, help="The daemon's URL (default: from server.listen).")
@click.option(
    "--token",
    envvar="ROOST_TOKEN",
    default=None,
    help="API bearer token (default: $ROOST_TOKEN, else server.token_file).",
)
@click.version_option(package_name="roost", prog_name="roost")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, url: str | None, token: str | None) -> None:
    """Roost runs AI agents as Docker containers, on demand."""
    ctx.obj = CliContext(config_path, url, token)


def _context() -> CliContext:
    obj = click.get_current_context().find_object(CliContext)
    assert obj is not None
    return obj


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@cli.command()
def up() -> NoReturn:
    """Run the Roost daemon in the foreground (Ctrl-C or SIGTERM stops it)."""
    from roost import serving  # the server stack is only needed here

    settings = _context().settings()
    code = _run_daemon(serving.serve(settings))
    sys.exit(code)


# --------------------------------------------------------------------------- ps


def _container(agent: dict[str, Any]) -> str:
    cid = agent.get("container_id")
    return str(cid)[:12] if cid else "-"


def _last_exit(agent: dict[str, Any]) -> str:
    exit_info = agent.get("last_exit")
    if not isinstance(exit_info, dict):
        return "-"
    parts = []
    if exit_info.get("exit_code") is not None:
        parts.append(f"exit {exit_info['exit_code']}")
    if exit_info.get("oom_killed"):
        parts.append("OOM")
    text = ", ".join(parts)
    error = str(exit_info.get("error") or "").splitlines()
    if error:
        first = error[0] if len(error[0]) <= 60 else error[0][:57] + "..."
        text = f"{text}: {first}" if text else first
    return text or "-"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


@cli.command()
@json_option
def ps(as_json: bool) -> None:
    """List agents: NAME STATE CONTAINER RESTARTS URL LAST-EXIT."""
    with _context().client() as api:
        data = api.json("GET", "/api/agents")
    if as_json:
        _print_json(data)
        return
    agents = data.get("agents", []) if isinstance(data, dict) else []
    if not agents:
        click.echo("no agents (add [agents.NAME] tables to the config)")
        return
    rows = [
        [
            str(a.get("name")),
            str(a.get("state")),
            _container(a),
            str(a.get("restart_count", 0)),
            str(a.get("url") or "-"),
            _last_exit(a),
        ]
        for a in agents
    ]
    click.echo(format_table(["NAME", "STATE", "CONTAINER", "RESTARTS", "URL", "LAST-EXIT"], rows))


# --------------------------------------------------------------------------- actions


def _describe_result(agent: dict[str, Any], *, requested: bool) -> str:
    text = f"{agent.get('name')}: {agent.get('state')}"
    if agent.get("url"):
        text += f"  {agent['url']}"
    if requested:
        text += "  (requested; not waiting)"
    if agent.get("last_error") and agent.get("state") in ("failed", "crashed", "restarting"):
        text += f"\n  last error: {agent['last_error']}"
    return text


def _run_action(
    name: str, action: str, params: dict[str, str], read_timeout: float | None, as_json: bool
) -> None:
    with _context().client() as api:
        response = api.request(
            "POST", f"/api/agents/{name}/{action}", params=params, read_timeout=read_timeout
        )
    try:
        agent = response.json()
    except ValueError as exc:
        raise CliError(f"Roost answered {action} {name} with something other than JSON") from exc
    if as_json:
        _print_json(agent)
    else:
        click.echo(_describe_result(agent, requested=response.status_code == 202))


def _make_start_command(action: str, help_text: str) -> None:
    @cli.command(name=action, help=help_text)
    @click.argument("name")
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Seconds to wait for health (default: the agent's startup_timeout).",
    )
    @click.option("--no-wait", is_flag=True, help="Only request it; do not wait for health.")
    @json_option
    def command(name: str, timeout: float | None, no_wait: bool, as_json: bool) -> None:
        params: dict[str, str] = {}
        if no_wait:
            params["wait"] = "false"
        if timeout is not None:
            params["timeout"] = f"{timeout:g}"
        # Without --timeout the daemon applies the agent's startup_timeout, unknown here.
        read_timeout = READ_TIMEOUT if no_wait else (timeout + WAIT_MARGIN if timeout else None)
        _run_action(name, action, params, read_timeout, as_json)


def _make_request_command(action: str, help_text: str) -> None:
    @cli.command(name=action, help=help_text)
    @click.argument("name")
    @json_option
    def command(name: str, as_json: bool) -> None:
        _run_action(name, action, {}, READ_TIMEOUT, as_json)


_make_start_command("start", "Start agent NAME and wait until it answers its health check.")
_make_request_command("stop", "Stop agent NAME (its container is stopped with grace).")
_make_request_command("pause", "Pause agent NAME (its container is frozen, memory kept).")
_make_start_command("wake", "Wake agent NAME (unpause or start) and wait until it is healthy.")
_make_request_command("restart", "Restart agent NAME in a fresh container.")
_make_request_command("reset", "Clear NAME's restart count and failure (failed → stopped).")


@cli.command()
@click.argument("name")
@click.option(
    "--tail", type=click.IntRange(min=1), default=100, show_default=True, help="Number of lines."
)
@json_option
def logs(name: str, tail: int, as_json: bool) -> None:
    """Print the last lines of agent NAME's container output."""
    with _context().client() as api:
        response = api.request("GET", f"/api/agents/{name}/logs", params={"tail": str(tail)})
    if as_json:
        _print_json({"agent": name, "tail": tail, "logs": response.text})
    else:
        click.echo(response.text, nl=False)


# --------------------------------------------------------------------------- doctor


@dataclasses.dataclass
class Check:
    name: str
    #: "ok", "fail" (required check failed), "warn" (informational) or "skip".
    status: str
    detail: str
    fix: str = ""
    required: bool = True


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


def _check_daemon(url: str | None) -> Check:
    if url is None:
        return Check(
            "daemon", "skip", "not checked: no URL (the configuration is invalid)", required=False
        )
    try:
        response = httpx.get(f"{url}/healthz", timeout=DOCTOR_PROBE_TIMEOUT)
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("ok"):
        return Check(
            "daemon",
            "ok",
            f"Roost answers at {url} ({body.get('agents')} agents, "
            f"Docker API {body.get('docker_api')})",
            required=False,
        )
    return Check(
        "daemon", "warn", f"no Roost answers at {url}", "start it with `roost up`", required=False
    )


def run_doctor(ctx: CliContext) -> tuple[list[Check], int]:
    """All checks, and the exit code they add up to."""
    checks: list[Check] = []
    settings: Settings | None = None
    try:
        settings = load_settings(ctx.config_path)
        source = settings.source_file or "built-in defaults (no roost.toml found)"
        checks.append(Check("config", "ok", f"{source}: {len(settings.agents)} agents"))
    except errors.ConfigError as exc:
        click.echo(f"roost: configuration error: {exc}", err=True)
        checks.append(Check("config", "fail", str(exc), "fix the key named above"))
    checks.extend(asyncio.run(_docker_checks(settings)))
    if settings is not None:
        checks.append(_check_state_dir(settings.state_path()))
    else:
        checks.append(Check("state dir", "skip", "not checked: the configuration is invalid"))
    url = ctx.url_option.rstrip("/") if ctx.url_option else None
    if url is None and settings is not None:
        url = default_api_url(settings)
    checks.append(_check_daemon(url))
    if checks[0].status == "fail":
        return checks, EXIT_CONFIG
    failed = any(c.status == "fail" and c.required for c in checks)
    return checks, EXIT_FAILURE if failed else 0


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check this machine: config, Docker, images, state dir, the daemon."""
    checks, code = run_doctor(_context())
    if as_json:
        _print_json({"ok": code == 0, "checks": [dataclasses.asdict(c) for c in checks]})
    else:
        for check in checks:
            label = {"ok": "ok", "fail": "FAIL", "warn": "warn", "skip": "skip"}[check.status]
            detail = check.detail.replace("\n", "\n" + " " * 8)
            click.echo(f"{label:<6}  {check.name}: {detail}")
            if check.fix and check.status in ("fail", "warn"):
                click.echo(f"        fix: {check.fix}")
    if code:
        sys.exit(code)


from roost.cli_jobs import jobs as _jobs_group  # noqa: E402  (registers on ``cli``)

cli.add_command(_jobs_group)

from roost.cli_messages import events as _events_command  # noqa: E402  (registers on ``cli``)
from roost.cli_messages import send as _send_command  # noqa: E402

cli.add_command(_send_command)
cli.add_command(_events_command)


def _late_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        obj = ctx.find_object(CliContext)
        if obj is not None:
            obj.config_path = value
            obj._settings = None


def _accept_config_after_the_verb(command: click.Command) -> None:
    """``roost up --config X`` works as well as ``roost --config X up``."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _accept_config_after_the_verb(sub)
        return
    if any(p.name == "late_config" for p in command.params):
        return
    command.params.append(
        click.Option(
            ["--config", "late_config"],
            type=click.Path(dir_okay=False),
            default=None,
            expose_value=False,
            is_eager=True,
            callback=_late_config,
            help="Config file (same as the option before the verb).",
        )
    )


for _command in cli.commands.values():
    _accept_config_after_the_verb(_command)


def main() -> None:
    """Entry point of the ``roost`` script."""
    cli(prog_name="roost")
