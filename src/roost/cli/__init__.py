"""The ``roost`` command line: a thin front end over the daemon's admin HTTP API.

Role: the root click group and :func:`main` (the ``roost`` script). ``up`` runs
the daemon in the foreground, ``doctor`` checks this machine, every other verb
asks a running daemon over HTTP and prints what it answered.

Modules (imports go one way: this root imports the verb modules, the verb
modules import ``client`` and ``output``, never each other; an import-linter
contract in pyproject.toml keeps it so)::

    __init__   the root group, global options, main()
    agents     ps, start, stop, pause, wake, restart, reset, logs, inspect
    messages   send, messages ls|show
    events     events [-f]
    jobs       jobs run|ls|show|logs|cancel
    daemon     up, doctor
    client     the one API client (httpx), where the daemon is, the CLI's failures
    output     tables (Rich when coloured), --json, ages, spinners, progress bars

Invariants:
- Exit codes: 0 success, 1 failure (the daemon refused, Docker is missing, no
  daemon answers), 2 bad configuration or usage (the message names the key or
  option). ``jobs run --wait`` exits with the job's exit code.
- Messages for people go to stderr as one ``roost: ...`` line that says what to
  do; ``--json`` prints the daemon's JSON on stdout.
- Start-up stays small: importing this package imports click and the verb
  modules only; httpx, Rich, the configuration's pydantic models and the
  engine are imported where they are used (``roost --help`` uses none).
- ``--config`` is accepted before or after the verb.
"""

from __future__ import annotations

import sys

import click

from roost.cli import agents, client, daemon, events, jobs, messages

__all__ = ["cli", "main"]


@click.group(name="roost", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $ROOST_CONFIG, else ./roost.toml).",
)
@click.option(
    "--url",
    envvar="ROOST_URL",
    default=None,
    help="The daemon's URL (default: $ROOST_URL, else from server.listen).",
)
@click.option(
    "--token",
    envvar="ROOST_TOKEN",
    default=None,
    help="API bearer token (default: $ROOST_TOKEN, else server.token_file).",
)
@click.version_option(package_name="roost", prog_name="roost")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, url: str | None, token: str | None) -> None:
    """Roost runs AI agents as Docker containers, on demand.

    \b
    Shell completion, agent names included (zsh: zsh_source, fish: fish_source):
      eval "$(_ROOST_COMPLETE=bash_source roost)"
    """
    ctx.obj = client.Connection(config_path, url, token)


for _command in [
    daemon.up,
    agents.ps,
    *agents.action_commands(),
    agents.logs,
    agents.inspect,
    messages.send,
    messages.route,
    messages.messages,
    events.events,
    jobs.jobs,
    daemon.doctor,
    daemon.reload,
]:
    cli.add_command(_command)


def _late_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        connection = ctx.find_object(client.Connection)
        if connection is not None:
            connection.use_config(value)


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


def _skip_httpx_cli() -> None:
    """Keep ``import httpx`` from importing httpx's own command-line client.

    httpx (0.28) imports ``httpx._main`` (click, Rich, pygments: ~0.1 s here)
    whenever those are installed, as they are with Roost; it guards that import
    with ``except ImportError`` and then offers a stub. Marking the module
    absent before httpx is first imported takes that path. Done by the
    ``roost`` process's entry point only: it owns its imports, a library user's
    process is left alone.
    """
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def main() -> None:
    """Entry point of the ``roost`` script."""
    _skip_httpx_cli()
    cli(prog_name="roost")
