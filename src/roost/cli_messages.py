"""``roost send`` and ``roost events``: the durable inbox and the event stream from a shell.

Role: thin clients of ``POST /api/agents/{name}/messages`` and ``GET /api/events``,
registered on the main ``roost`` group by ``roost.cli``. Same conventions as
``roost.cli``: exit 0 on success, 1 on failure, ``--json`` prints the daemon's
JSON unchanged, messages for people go to stderr as one ``roost: ...`` line.

Invariants:
- ``send`` sends MESSAGE as JSON when it parses as JSON, else as
  ``{"text": MESSAGE}``; it exits 0 only when the agent replied (or, with
  ``--no-wait``, when the message was stored).
- ``events -f`` follows until interrupted and resumes after the last event it
  printed if the connection drops.
- ``roost.cli`` is imported lazily (inside the commands): it imports this module
  to register the commands, so importing it at load time would be circular.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import click
import httpx

__all__ = ["events", "message_body", "parse_sse", "send"]

#: Seconds the CLI waits beyond the reply timeout it asked the daemon for.
WAIT_MARGIN = 10.0
RECONNECT_DELAY = 1.0


def message_body(text: str) -> Any:
    """MESSAGE as JSON when it is JSON, else ``{"text": MESSAGE}``."""
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


def _session(read_timeout: float | None) -> tuple[httpx.Client, str]:
    from roost import cli

    ctx = cli._context()
    url, token = ctx.url(), ctx.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(read_timeout, connect=cli.CONNECT_TIMEOUT)
    try:
        return httpx.Client(base_url=url, headers=headers, timeout=timeout), url
    except httpx.InvalidURL as exc:
        raise cli.CliUsageError(f"invalid --url {url!r}: {exc}") from exc


def _failure(url: str, what: str, exc: httpx.HTTPError) -> click.ClickException:
    from roost import cli

    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return cli.CliError(f"no Roost answers at {url}; start it with `roost up`")
    if isinstance(exc, httpx.TimeoutException):
        return cli.CliError(f"Roost at {url} did not answer {what} in time")
    return cli.CliError(f"talking to Roost at {url} failed: {exc}")


def _checked(response: httpx.Response) -> Any:
    from roost import cli

    if response.status_code >= 400:
        raise cli.CliError(cli._error_message(response))
    try:
        return response.json()
    except ValueError as exc:
        raise cli.CliError("Roost answered with something other than JSON") from exc


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.command()
@click.argument("name")
@click.argument("message")
@click.option("--no-wait", is_flag=True, help="Only store it; print the message id.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for the reply (default: the agent's wait_timeout).",
)
@click.option("--idempotency-key", default=None, help="Send again safely: one message per key.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's JSON answer.")
def send(
    name: str,
    message: str,
    no_wait: bool,
    timeout: float | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Send MESSAGE (JSON, or text sent as {"text": ...}) to agent NAME; print its reply."""
    from roost import cli

    params: dict[str, str] = {} if no_wait else {"wait": "true"}
    if timeout is not None and not no_wait:
        params["timeout"] = f"{timeout:g}"
    # Without --timeout the daemon applies the agent's wait_timeout, unknown here.
    read_timeout = cli.READ_TIMEOUT if no_wait else (timeout + WAIT_MARGIN if timeout else None)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    client, url = _session(read_timeout)
    path = f"/api/agents/{name}/messages"
    with client:
        try:
            response = client.post(
                path,
                params=params,
                headers={"Content-Type": "application/json", **headers},
                content=json.dumps(message_body(message)).encode(),
            )
        except httpx.HTTPError as exc:
            raise _failure(url, f"POST {path}", exc) from exc
    answer = _checked(response)
    if as_json:
        _print_json(answer)
    status = answer.get("status") if isinstance(answer, dict) else None
    if no_wait:
        if not as_json:
            click.echo(answer.get("id") if isinstance(answer, dict) else answer)
        return
    if status == "delivered":
        if not as_json:
            _print_json(answer.get("reply"))
        return
    message_id = answer.get("id") if isinstance(answer, dict) else "?"
    if status in ("failed", "dead"):
        raise cli.CliError(f"message {message_id} is {status}: {answer.get('error')}")
    raise cli.CliError(
        f"no reply yet; message {message_id} is {status} "
        f"(see GET /api/agents/{name}/messages/{message_id})"
    )


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """Frames of a text/event-stream as (id, event, data); comments skipped."""
    event_id: str | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, kind, "\n".join(data)
            event_id, kind, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _format_event(event: dict[str, Any]) -> str:
    at = event.get("at")
    when = (
        datetime.datetime.fromtimestamp(at).isoformat(sep=" ", timespec="milliseconds")
        if isinstance(at, int | float)
        else "-"
    )
    details = {k: v for k, v in event.items() if k not in ("id", "kind", "at")}
    agent = details.pop("agent", None)
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in details.items())
    return f"{when}  {event.get('kind', '?'):<16} {agent or '-':<16} {text}".rstrip()


def _show(event: dict[str, Any], as_json: bool) -> None:
    click.echo(json.dumps(event, sort_keys=True) if as_json else _format_event(event))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(min=0, max=10_000),
    default=50,
    show_default=True,
    help="Recent events to print first.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(follow: bool, limit: int, as_json: bool) -> None:
    """Print recent events (lifecycle, message status, agent.waking); -f follows them."""
    client, url = _session(None if follow else 30.0)
    last_id: int | None = None
    with client:
        try:
            recent = _checked(client.get("/api/events", params={"recent": str(limit)}))
        except httpx.HTTPError as exc:
            raise _failure(url, "GET /api/events", exc) from exc
        for event in recent.get("events", []) if isinstance(recent, dict) else []:
            _show(event, as_json)
            last_id = event.get("id", last_id)
        if not follow:
            return
        try:
            while True:
                last_id = _follow(client, url, last_id, as_json)
                time.sleep(RECONNECT_DELAY)  # the stream ended (daemon restart): resume
        except KeyboardInterrupt:
            sys.exit(0)


def _follow(client: httpx.Client, url: str, last_id: int | None, as_json: bool) -> int | None:
    params = {"last_event_id": str(last_id)} if last_id is not None else {}
    try:
        with client.stream("GET", "/api/events", params=params) as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            for event_id, _kind, data in parse_sse(response.iter_lines()):
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                _show(event, as_json)
                if event_id is not None and event_id.isdigit():
                    last_id = int(event_id)
    except httpx.HTTPError as exc:
        if last_id is None:
            raise _failure(url, "GET /api/events", exc) from exc
        click.echo(f"roost: event stream interrupted ({exc}); reconnecting", err=True)
    return last_id
