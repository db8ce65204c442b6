"""``roost ps``, the lifecycle verbs (start, stop, pause, wake, restart, reset) and ``roost logs``.

Role: the agent verbs, over ``/api/agents`` through the one :class:`~roost.cli.client.ApiClient`.

Invariants:
- A verb acts on the NAMEs given, or with ``--all`` on every agent, narrowed by
  ``--filter`` (``state=STATE``, ``name=PART``; one key given twice matches
  either value, different keys must all match, as ``docker ps --filter`` does).
- One NAME: one line (or, with ``--json``, the agent object) exactly as before.
  Several agents: acted on a few at a time (:data:`MASS_ACTION_WORKERS`) with a
  progress bar; one line each, in the order selected (``--json``:
  ``{"agents": [...]}``); every failure is reported and the exit code is 1 if
  any failed.
- ``start``, ``wake`` and ``restart`` wait until the agent answers its health
  check (``--no-wait``: only request it). ``restart`` requests the restart,
  then asks the daemon to wake the agent: the daemon waits for health exactly
  as for ``start`` (same ``--timeout``, same error with the log tail) and the
  restart's new container is merged into that wait, never started twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from roost.cli import client, output
from roost.core.states import AgentState

__all__ = ["ACTIONS", "action_commands", "logs", "ps"]

#: Agents acted on at once by a mass action (Docker serves concurrent starts best
#: from a pool of 3-4: DESIGN.md, measured engine limits).
MASS_ACTION_WORKERS = 4
FILTER_KEYS = ("name", "state")
STATE_NAMES = tuple(s.value for s in AgentState)
PS_HEADERS = ("NAME", "STATE", "AGE", "CONTAINER", "RESTARTS", "URL", "EVENTS", "LAST-EXIT")


# --------------------------------------------------------------------------- selection


def parse_filters(values: Sequence[str]) -> dict[str, set[str]]:
    """``--filter KEY=VALUE`` options as ``{key: {values}}``; bad ones are usage errors."""
    filters: dict[str, set[str]] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise click.BadParameter(
                f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}",
                param_hint="'--filter'",
            )
        if key not in FILTER_KEYS:
            raise click.BadParameter(
                f"unknown key {key!r}; valid keys: {', '.join(FILTER_KEYS)}",
                param_hint="'--filter'",
            )
        if key == "state" and value not in STATE_NAMES:
            raise click.BadParameter(
                f"unknown state {value!r}; valid states: {', '.join(STATE_NAMES)}",
                param_hint="'--filter'",
            )
        filters.setdefault(key, set()).add(value)
    return filters


def matches(agent: dict[str, Any], filters: dict[str, set[str]]) -> bool:
    name = str(agent.get("name"))
    if "name" in filters and not any(part in name for part in filters["name"]):
        return False
    return "state" not in filters or str(agent.get("state")) in filters["state"]


filter_option = click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="state=STATE or name=PART (repeatable: a key twice matches either, "
    "different keys must all match).",
)
names_argument = click.argument(
    "names", nargs=-1, metavar="[NAME]...", shell_complete=client.complete_agent_name
)


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


def _event_types(agent: dict[str, Any]) -> str:
    """The event type patterns it handles, comma-joined; '-' for none."""
    patterns = agent.get("event_types")
    if not isinstance(patterns, list) or not patterns:
        return "-"
    return ",".join(str(p) for p in patterns)


def ps_row(agent: dict[str, Any], now: float) -> list[str]:
    return [
        str(agent.get("name")),
        str(agent.get("state")),
        output.age(agent.get("state_since"), now),
        _container(agent),
        str(agent.get("restart_count", 0)),
        str(agent.get("url") or "-"),
        _event_types(agent),
        _last_exit(agent),
    ]


@click.command()
@names_argument
@click.option("-q", "--quiet", is_flag=True, help="Print names only, one per line.")
@filter_option
@output.json_option
def ps(names: tuple[str, ...], quiet: bool, filters: tuple[str, ...], as_json: bool) -> None:
    """List agents (all, or the NAMEs given): NAME STATE AGE CONTAINER RESTARTS URL
    EVENTS LAST-EXIT. AGE is the time in the current state; EVENTS the event types it
    handles (`roost route`)."""
    if quiet and as_json:
        raise click.UsageError("use either --quiet or --json")
    wanted = parse_filters(filters)
    with client.current().client() as api:
        data = api.json("GET", "/api/agents")
    agents = data.get("agents") if isinstance(data, dict) else None
    every = [a for a in agents or [] if isinstance(a, dict)]
    by_name = {str(a.get("name")): a for a in every}
    unknown = [n for n in names if n not in by_name]
    chosen = [by_name[n] for n in dict.fromkeys(names) if n in by_name] if names else every
    chosen = [a for a in chosen if matches(a, wanted)]
    if as_json:
        output.print_json(data if not names and not wanted else {**data, "agents": chosen})
    elif quiet:
        for agent in chosen:
            click.echo(str(agent.get("name")))
    elif not every:
        click.echo("no agents (add [agents.NAME] tables to the config)")
    elif chosen or not unknown:
        now = time.time()
        output.print_table(PS_HEADERS, [ps_row(a, now) for a in chosen], status_columns=("STATE",))
    for name in unknown:
        click.echo(
            f"roost: no agent named {name!r}{client.did_you_mean(name, list(by_name))}", err=True
        )
    if unknown:
        raise SystemExit(client.EXIT_FAILURE)


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


class _Action:
    """One lifecycle verb: how to ask the daemon for it, and whether it waits."""

    def __init__(self, name: str, help_text: str, *, waits: bool) -> None:
        self.name = name
        self.help_text = help_text
        self.waits = waits

    def wait_params(self, timeout: float | None, no_wait: bool) -> dict[str, str]:
        params: dict[str, str] = {}
        if no_wait:
            params["wait"] = "false"
        if timeout is not None:
            params["timeout"] = f"{timeout:g}"
        return params

    def run(
        self, api: client.ApiClient, name: str, timeout: float | None, no_wait: bool
    ) -> tuple[dict[str, Any], bool]:
        """Carry it out for agent ``name``: (the agent as the daemon answered, only requested?)."""
        path = f"/api/agents/{name}/{self.name}"
        if not self.waits:
            return api.json("POST", path), False
        # Without --timeout the daemon applies the agent's startup_timeout, unknown here.
        read_timeout = (
            client.READ_TIMEOUT if no_wait else (timeout + client.WAIT_MARGIN if timeout else None)
        )
        if self.name == "restart":
            restarted = api.json("POST", path)
            if no_wait:
                return restarted, True
            path = f"/api/agents/{name}/wake"
        response = api.request(
            "POST", path, params=self.wait_params(timeout, no_wait), read_timeout=read_timeout
        )
        return _agent_of(api, response, path), response.status_code == 202


def _agent_of(api: client.ApiClient, response: Any, path: str) -> dict[str, Any]:
    try:
        agent = response.json()
    except ValueError as exc:
        raise client.CliError(
            f"Roost at {api.url} answered POST {path} with something other than JSON"
        ) from exc
    return agent if isinstance(agent, dict) else {"answer": agent}


ACTIONS = (
    _Action("start", "Start agent NAME (or several) and wait until it answers its health check.",
            waits=True),
    _Action("stop", "Stop agent NAME (or several): the container is stopped with grace.",
            waits=False),
    _Action("pause", "Pause agent NAME (or several): the container is frozen, memory kept.",
            waits=False),
    _Action("wake", "Wake agent NAME (or several: unpause or start) and wait until healthy.",
            waits=True),
    _Action("restart", "Restart agent NAME (or several) in a fresh container and wait until "
            "it answers its health check.", waits=True),
    _Action("reset", "Clear NAME's restart count and failure (failed → stopped).", waits=False),
)  # fmt: skip


def _targets(
    api: client.ApiClient, names: tuple[str, ...], all_agents: bool, filters: tuple[str, ...]
) -> list[str]:
    wanted = parse_filters(filters)
    if names and all_agents:
        raise click.UsageError("give agent NAMEs or --all, not both")
    if not names and not all_agents and not wanted:
        raise click.UsageError("missing agent NAME (or --all for every agent)")
    if not wanted and not all_agents:
        return list(dict.fromkeys(names))
    agents = api.agents()
    if names:
        by_name = {str(a.get("name")): a for a in agents}
        # Unknown names stay in: the daemon's 404 (with suggestions) reports them.
        return [n for n in dict.fromkeys(names) if n not in by_name or matches(by_name[n], wanted)]
    return [str(a.get("name")) for a in agents if matches(a, wanted)]


def _run_one(
    action: _Action, api: client.ApiClient, name: str, timeout: float | None, no_wait: bool,
    as_json: bool,
) -> None:  # fmt: skip
    waits = action.waits and not no_wait
    with output.waiting(f"{action.name} {name}" + (": waiting until healthy" if waits else "")):
        agent, requested = action.run(api, name, timeout, no_wait)
    if as_json:
        output.print_json(agent)
    else:
        click.echo(_describe_result(agent, requested=requested))


def _run_many(
    action: _Action, api: client.ApiClient, names: list[str], timeout: float | None,
    no_wait: bool, as_json: bool,
) -> None:  # fmt: skip
    import concurrent.futures

    results: dict[str, tuple[dict[str, Any], bool] | client.CliError] = {}

    def one(name: str, advance: Callable[[], None]) -> None:
        try:
            results[name] = action.run(api, name, timeout, no_wait)
        except client.CliError as exc:
            results[name] = exc
        finally:
            advance()

    with (
        output.progress(len(names), f"{action.name} {len(names)} agents") as advance,
        concurrent.futures.ThreadPoolExecutor(
            MASS_ACTION_WORKERS, thread_name_prefix=f"roost-{action.name}"
        ) as pool,
    ):
        for future in [pool.submit(one, name, advance) for name in names]:
            future.result()
    done: list[dict[str, Any]] = []
    failed = False
    for name in names:
        result = results[name]
        if isinstance(result, client.CliError):
            failed = True
            click.echo(f"roost: {name}: {result.format_message()}", err=True)
            continue
        agent, requested = result
        done.append(agent)
        if not as_json:
            click.echo(_describe_result(agent, requested=requested))
    if as_json:
        output.print_json({"agents": done})
    if failed:
        raise SystemExit(client.EXIT_FAILURE)


def _action_command(action: _Action) -> click.Command:
    def command(
        names: tuple[str, ...],
        all_agents: bool,
        filters: tuple[str, ...],
        as_json: bool,
        timeout: float | None = None,
        no_wait: bool = False,
    ) -> None:
        with client.current().client() as api:
            targets = _targets(api, names, all_agents, filters)
            if len(names) == 1 and targets == list(names):
                _run_one(action, api, names[0], timeout, no_wait, as_json)
            elif not targets:
                if as_json:
                    output.print_json({"agents": []})
                else:
                    click.echo("roost: no agent matches", err=True)
            else:
                _run_many(action, api, targets, timeout, no_wait, as_json)

    params: list[Callable[[Any], Any]] = [
        names_argument,
        click.option("-a", "--all", "all_agents", is_flag=True, help="Every agent."),
        filter_option,
    ]
    if action.waits:
        params += [
            click.option(
                "--timeout",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="Seconds to wait for health (default: the agent's startup_timeout).",
            ),
            click.option("--no-wait", is_flag=True, help="Only request it; do not wait."),
        ]
    params.append(output.json_option)
    decorated: Any = command
    for param in reversed(params):
        decorated = param(decorated)
    return click.command(name=action.name, help=action.help_text)(decorated)


def action_commands() -> list[click.Command]:
    return [_action_command(action) for action in ACTIONS]


# --------------------------------------------------------------------------- logs


@click.command()
@click.argument("name", shell_complete=client.complete_agent_name)
@click.option(
    "-n",
    "--tail",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Number of lines.",
)
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new output, across restarts (Ctrl-C ends)."
)
@click.option("--since", metavar="DURATION", help="Only output from this long ago on: 10m, 1h.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with its time.")
@click.option(
    "--previous",
    is_flag=True,
    help="The output kept from the latest exit (a crashed container, also after a restart).",
)
@output.json_option
def logs(
    name: str,
    tail: int,
    follow: bool,
    since: str | None,
    timestamps: bool,
    previous: bool,
    as_json: bool,
) -> None:
    """Print agent NAME's container output."""
    params = {"tail": str(tail)}
    if since:
        params["since"] = since
    if timestamps:
        params["timestamps"] = "true"
    if previous:
        params = {"previous": "true"}
    path = f"/api/agents/{name}/logs"
    with client.current().client() as api:
        if follow and not previous:
            try:
                for text in api.text_stream(path, {**params, "follow": "true"}):
                    click.echo(text, nl=False)
            except KeyboardInterrupt:
                pass
            return
        response = api.request("GET", path, params=params)
    if as_json:
        output.print_json({"agent": name, "previous": previous, "logs": response.text})
    else:
        click.echo(response.text, nl=False)


@click.command()
@click.argument("name", shell_complete=client.complete_agent_name)
@output.json_option
def inspect(name: str, as_json: bool) -> None:
    """Show agent NAME in full: state, config, history, exits, queue and leases."""
    with client.current().client() as api:
        agent = api.json("GET", f"/api/agents/{name}")
        queue = api.json("GET", f"/api/agents/{name}/messages", params={"limit": "1"})
        leases = api.json("GET", f"/api/agents/{name}/leases")
    detail = {
        **agent,
        "queue_depth": queue.get("pending"),
        "leases": leases.get("leases", []),
    }
    if as_json:
        output.print_json(detail)
        return
    click.echo(
        f"{detail['name']}: {detail['state']}"
        + (f" ({detail['last_error']})" if detail.get("last_error") else "")
    )
    click.echo(f"  container: {detail.get('container_id') or '-'}")
    click.echo(f"  url: {detail.get('url') or '-'}")
    click.echo(f"  restarts: {detail.get('restart_count', 0)}")
    click.echo(f"  queue depth: {detail['queue_depth']}")
    click.echo(f"  leases: {len(detail['leases'])}")
    if detail.get("degraded"):
        click.echo(f"  degraded: {detail['degraded']}")
    config = detail.get("config") or {}
    click.echo("config:")
    for key in sorted(config):
        click.echo(f"  {key} = {json.dumps(config[key])}")
    click.echo("history (oldest first):")
    for entry in detail.get("history", []):
        click.echo(
            f"  {output.when(entry['at'])}  {entry['from']} -> {entry['to']}  ({entry['reason']})"
        )
    click.echo("exits (newest first):")
    for exit_info in detail.get("exits", []):
        code = exit_info.get("exit_code")
        oom = " OOM" if exit_info.get("oom_killed") else ""
        error = f" {exit_info['error']}" if exit_info.get("error") else ""
        click.echo(f"  {exit_info.get('finished_at') or '?'}  exit {code}{oom}{error}")
        for line in (exit_info.get("log_tail") or "").splitlines()[-5:]:
            click.echo(f"      | {line}")
