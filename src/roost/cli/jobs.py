"""``roost jobs ...``: one-shot jobs from the command line (run, ls, show, logs, cancel).

Role: the job verbs, over ``/api/jobs`` through the one
:class:`~roost.cli.client.ApiClient`.

Invariants:
- ``jobs run [OPTIONS] IMAGE [--] [COMMAND...]``: options go before IMAGE;
  everything after IMAGE is the command, and a ``--`` right after IMAGE only
  marks where it begins (it is never the program).
- ``run --wait`` exits with the job's own exit code as ``docker run`` does: 0
  when it succeeded, the container's exit code when it has a non-zero one,
  else 1 (timed out, cancelled, or failed before the program ran).
- Secrets never appear on a command line: ``--env NAME`` (no ``=``) takes the
  value from this process's environment, as ``docker run -e NAME`` does.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from roost.cli import client, output

__all__ = ["exit_code_of", "jobs"]

#: Seconds between polls of ``run --wait``.
WAIT_POLL_INTERVAL = 0.5
FINAL_STATUSES = ("succeeded", "failed", "timed_out", "cancelled")
STATUSES = ("queued", "running", *FINAL_STATUSES)
JOB_HEADERS = ("ID", "STATUS", "IMAGE", "PROJECT", "EXIT", "DURATION", "CREATED")


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


def _duration(seconds: object) -> str:
    return f"{seconds:.1f}s" if isinstance(seconds, int | float) else "-"


def _exit(job: dict[str, Any]) -> str:
    code = job.get("exit_code")
    text = "-" if code is None else str(code)
    return f"{text} OOM" if job.get("oom_killed") else text


def exit_code_of(job: dict[str, Any]) -> int:
    """What ``run --wait`` exits with: 0, the job's non-zero exit code, or 1."""
    if job.get("status") == "succeeded":
        return 0
    code = job.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256:
        return code
    return client.EXIT_FAILURE


def describe_job(job: dict[str, Any]) -> str:
    lines = [
        f"job {job.get('id')}: {job.get('status')}",
        f"  image:      {job.get('image')}"
        + ("  (from snapshot)" if job.get("snapshot_used") else ""),
        f"  command:    {' '.join(job.get('command') or []) or '(image default)'}",
        f"  project:    {job.get('project') or '-'}",
        f"  snapshot:   {job.get('snapshot_key') or '-'}",
        f"  created:    {output.when(job.get('created_at'))}",
        f"  started:    {output.when(job.get('started_at'))}",
        f"  finished:   {output.when(job.get('finished_at'))}",
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
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit with its exit code.")
@output.json_option
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
    """Queue IMAGE [--] [COMMAND...] as a job (put options before IMAGE)."""
    if command[:1] == ("--",):
        # Click stops parsing at IMAGE (so the command's own options pass through)
        # and then keeps a `--` that follows it: it only marks where COMMAND begins.
        command = command[1:]
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
    with client.current().client() as api:
        job = api.json("POST", "/api/jobs", body=body)
        if wait and not as_json:
            # The job's own output, as it runs (like docker run), then its outcome.
            for text in api.text_stream(f"/api/jobs/{job['id']}/logs", {"follow": "true"}):
                click.echo(text, nl=False)
        if wait:
            with output.waiting(f"job {job.get('id')}: waiting until it ends"):
                while job.get("status") not in FINAL_STATUSES:
                    time.sleep(WAIT_POLL_INTERVAL)
                    job = api.json("GET", f"/api/jobs/{job['id']}", retries=1)
    if as_json:
        output.print_json(job)
    elif wait:
        click.echo(describe_job(job))
    else:
        click.echo(f"{job.get('id')}: {job.get('status')}")
    if wait:
        sys.exit(exit_code_of(job))


@jobs.command(name="ls")
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Filter (repeatable)."
)
@click.option("--project", help="Only this project's jobs.")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=50, show_default=True)
@output.json_option
def list_jobs(statuses: tuple[str, ...], project: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first: ID STATUS IMAGE PROJECT EXIT DURATION CREATED."""
    query: dict[str, str | list[str]] = {"limit": str(limit), "status": list(statuses)}
    if project is not None:
        query["project"] = project
    with client.current().client() as api:
        data = api.json("GET", "/api/jobs", params=query)
    if as_json:
        output.print_json(data)
        return
    rows = [
        [
            str(job.get("id")),
            str(job.get("status")),
            str(job.get("image")),
            str(job.get("project") or "-"),
            _exit(job),
            _duration(job.get("duration")),
            output.when(job.get("created_at")),
        ]
        for job in data.get("jobs", [])
    ]
    if not rows:
        click.echo("no jobs")
        return
    output.print_table(JOB_HEADERS, rows, status_columns=("STATUS",))


@jobs.command()
@click.argument("job_id")
@output.json_option
def show(job_id: str, as_json: bool) -> None:
    """Show job JOB_ID: state, times, exit code, error and log tail."""
    with client.current().client() as api:
        job = api.json("GET", f"/api/jobs/{job_id}")
    if as_json:
        output.print_json(job)
    else:
        click.echo(describe_job(job))


@jobs.command()
@click.argument("job_id")
@click.option("-n", "--tail", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing its output until it ends.")
@output.json_option
def logs(job_id: str, tail: int, follow: bool, as_json: bool) -> None:
    """Print job JOB_ID's output (live while it runs)."""
    with client.current().client() as api:
        if follow and not as_json:
            try:
                for text in api.text_stream(f"/api/jobs/{job_id}/logs", {"follow": "true"}):
                    click.echo(text, nl=False)
            except KeyboardInterrupt:
                pass
            return
        response = api.request("GET", f"/api/jobs/{job_id}/logs", params={"tail": str(tail)})
    if as_json:
        output.print_json({"job": job_id, "tail": tail, "logs": response.text})
    else:
        click.echo(response.text, nl=False)


@jobs.command()
@click.argument("job_id")
@output.json_option
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel job JOB_ID (a running one is stopped: SIGTERM, grace, SIGKILL)."""
    with (
        client.current().client() as api,
        output.waiting(f"job {job_id}: cancelling"),
    ):
        job = api.json("POST", f"/api/jobs/{job_id}/cancel", read_timeout=None)
    if as_json:
        output.print_json(job)
    else:
        click.echo(f"{job.get('id')}: {job.get('status')}")
