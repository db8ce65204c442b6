"""``roost jobs ...``: one-shot jobs from the command line (run, ls, show, logs, cancel).

Role: a thin client of the daemon's ``/api/jobs`` routes, registered on the main
``roost`` group by ``roost.cli``. Same conventions as ``roost.cli``: exit 0 on
success and 1 on failure (``run --wait``: 1 unless the job succeeded), ``--json``
prints the daemon's JSON unchanged, messages for people go to stderr.

Invariants:
- Secrets never appear on a command line: ``--env NAME`` (no ``=``) takes the
  value from this process's environment, as ``docker run -e NAME`` does.
- ``roost.cli`` is imported lazily (inside the commands): it imports this module
  to register the group, so importing it here at load time would be circular.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click
import httpx

if TYPE_CHECKING:
    from roost.cli import ApiClient

__all__ = ["jobs"]

#: Seconds between polls of ``run --wait``.
WAIT_POLL_INTERVAL = 0.5
FINAL_STATUSES = ("succeeded", "failed", "timed_out", "cancelled")
STATUSES = ("queued", "running", *FINAL_STATUSES)


def _client() -> ApiClient:
    from roost import cli

    return cli._context().client()


def _print_json(data: Any) -> None:
    from roost import cli

    cli._print_json(data)


def _pairs(values: tuple[str, ...], what: str, *, from_environment: bool) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not name:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint=what)
        if not sep:
            if not from_environment:
                raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint=what)
            if name not in os.environ:
                raise click.BadParameter(
                    f"{name} is not set in this environment (use NAME=VALUE or export it)",
                    param_hint=what,
                )
            value = os.environ[name]
        pairs[name] = value
    return pairs


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: object) -> str:
    return f"{seconds:.1f}s" if isinstance(seconds, int | float) else "-"


def _exit(job: dict[str, Any]) -> str:
    code = job.get("exit_code")
    text = "-" if code is None else str(code)
    return f"{text} OOM" if job.get("oom_killed") else text


def _describe(job: dict[str, Any]) -> str:
    lines = [
        f"job {job.get('id')}: {job.get('status')}",
        f"  image:      {job.get('image')}"
        + ("  (from snapshot)" if job.get("snapshot_used") else ""),
        f"  command:    {' '.join(job.get('command') or []) or '(image default)'}",
        f"  project:    {job.get('project') or '-'}",
        f"  snapshot:   {job.get('snapshot_key') or '-'}",
        f"  created:    {_when(job.get('created_at'))}",
        f"  started:    {_when(job.get('started_at'))}",
        f"  finished:   {_when(job.get('finished_at'))}",
        f"  duration:   {_duration(job.get('duration'))}",
        f"  exit code:  {_exit(job)}",
        f"  container:  {str(job.get('container_id') or '-')[:12]}",
    ]
    if job.get("error"):
        lines.append(f"  error:      {job['error']}")
    tail = str(job.get("log_tail") or "").rstrip()
    if tail:
        lines.append("  log tail:")
        lines.extend(f"    {line}" for line in tail.splitlines())
    return "\n".join(lines)


@click.group(name="jobs")
def jobs() -> None:
    """One-shot jobs: a container run to completion with a hard timeout."""


@jobs.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "-e",
    "--env",
    "env",
    multiple=True,
    help="NAME=VALUE, or NAME to pass this shell's value (keeps secrets off the command line).",
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option("--memory", help="Memory limit, e.g. 256m (swap equals it); 0: no limit.")
@click.option("--cpus", type=click.FloatRange(min=0), help="CPU limit, e.g. 0.5.")
@click.option("--network", help="Docker network to join.")
@click.option("-l", "--label", "label", multiple=True, help="Extra container label KEY=VALUE.")
@click.option("--project", default="", help="Project name (for filtering).")
@click.option("--snapshot-key", help="Start from / save the snapshot image of this key.")
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit 1 unless it succeeded.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def run(
    image: str,
    command: tuple[str, ...],
    env: tuple[str, ...],
    timeout: float | None,
    memory: str | None,
    cpus: float | None,
    network: str | None,
    label: tuple[str, ...],
    project: str,
    snapshot_key: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Queue IMAGE [COMMAND...] as a job (put options before IMAGE)."""
    body: dict[str, Any] = {
        "image": image,
        "env": _pairs(env, "--env", from_environment=True),
        "labels": _pairs(label, "--label", from_environment=False),
        "project": project,
    }
    if command:
        body["command"] = list(command)
    for key, value in (
        ("timeout", timeout),
        ("memory", memory),
        ("cpus", cpus),
        ("network", network),
        ("snapshot_key", snapshot_key),
    ):
        if value is not None:
            body[key] = value
    with _client() as api:
        job = api.json("POST", "/api/jobs", body=body)
        if wait:
            while job.get("status") not in FINAL_STATUSES:
                time.sleep(WAIT_POLL_INTERVAL)
                job = api.json("GET", f"/api/jobs/{job['id']}")
    if as_json:
        _print_json(job)
    elif wait:
        click.echo(_describe(job))
    else:
        click.echo(f"{job.get('id')}: {job.get('status')}")
    if wait and job.get("status") != "succeeded":
        sys.exit(1)


@jobs.command(name="ls")
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Filter (repeatable)."
)
@click.option("--project", help="Only this project's jobs.")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_jobs(statuses: tuple[str, ...], project: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first: ID STATUS IMAGE PROJECT EXIT DURATION CREATED."""
    from roost import cli

    query: dict[str, str | list[str]] = {"limit": str(limit), "status": list(statuses)}
    if project is not None:
        query["project"] = project
    params = httpx.QueryParams(query)
    with _client() as api:
        data = api.json("GET", "/api/jobs", params=params)
    if as_json:
        _print_json(data)
        return
    rows = [
        [
            str(job.get("id")),
            str(job.get("status")),
            str(job.get("image")),
            str(job.get("project") or "-"),
            _exit(job),
            _duration(job.get("duration")),
            _when(job.get("created_at")),
        ]
        for job in data.get("jobs", [])
    ]
    if not rows:
        click.echo("no jobs")
        return
    headers = ["ID", "STATUS", "IMAGE", "PROJECT", "EXIT", "DURATION", "CREATED"]
    click.echo(cli.format_table(headers, rows))


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(job_id: str, as_json: bool) -> None:
    """Show job JOB_ID: state, times, exit code, error and log tail."""
    with _client() as api:
        job = api.json("GET", f"/api/jobs/{job_id}")
    if as_json:
        _print_json(job)
    else:
        click.echo(_describe(job))


@jobs.command()
@click.argument("job_id")
@click.option("--tail", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def logs(job_id: str, tail: int, as_json: bool) -> None:
    """Print job JOB_ID's output (live while it runs)."""
    with _client() as api:
        response = api.request("GET", f"/api/jobs/{job_id}/logs", params={"tail": str(tail)})
    if as_json:
        _print_json({"job": job_id, "tail": tail, "logs": response.text})
    else:
        click.echo(response.text, nl=False)


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel job JOB_ID (a running one is stopped: SIGTERM, grace, SIGKILL)."""
    with _client() as api:
        job = api.json("POST", f"/api/jobs/{job_id}/cancel", read_timeout=None)
    if as_json:
        _print_json(job)
    else:
        click.echo(f"{job.get('id')}: {job.get('status')}")
