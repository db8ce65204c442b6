"""``roost send``, ``roost route`` and ``roost messages ls|show``: durable messages
from a shell.

Role: the message verbs, over ``/api/agents/{name}/messages`` and
``/api/route/{event_type}`` through the one :class:`~roost.cli.client.ApiClient`.

Invariants:
- ``send`` sends MESSAGE as JSON when it parses as JSON, else as
  ``{"text": MESSAGE}``; ``-`` reads MESSAGE from stdin and ``@FILE`` from a
  file (one trailing newline dropped). It exits 0 only when the agent replied
  (or, with ``--no-wait``, when the message was stored).
- ``route TYPE MESSAGE`` stores MESSAGE (read like ``send``'s) for the agent that
  handles event type TYPE (``--all``: every one) and prints ``AGENT ID`` per copy;
  it exits 1 when no agent handles the type.
- ``send`` and ``route`` always send an ``Idempotency-Key`` (``--idempotency-key``, else a
  fresh UUID per invocation): it sends again by itself when the connection
  drops after sending, and when it gives up it prints the key, so sending again
  by hand with that key stores the message at most once.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from roost.cli import client, output
from roost.ports.inbox import MessageStatus

__all__ = ["message_body", "messages", "read_message", "route", "send"]

#: Times ``send`` sends again, with the same key, after a lost connection.
SEND_RETRIES = 2
LIST_LIMIT_MAX = 1000
MESSAGE_HEADERS = ("ID", "STATUS", "ATTEMPTS", "AGE", "ERROR")


def message_body(text: str) -> Any:
    """MESSAGE as JSON when it is JSON, else ``{"text": MESSAGE}``."""
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text}


def read_message(argument: str) -> str:
    """The MESSAGE argument: itself, stdin for ``-``, a file's text for ``@FILE``."""
    if argument == "-":
        text = sys.stdin.read()
    elif argument.startswith("@"):
        path = Path(argument[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise click.BadParameter(
                f"cannot read {str(path)!r}: {reason}", param_hint="'MESSAGE'"
            ) from exc
    else:
        return argument
    return text.removesuffix("\n")


@click.command()
@click.argument("name", shell_complete=client.complete_agent_name)
@click.argument("message")
@click.option("--no-wait", is_flag=True, help="Only store it; print the message id.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for the reply (default: the agent's wait_timeout).",
)
@click.option(
    "--idempotency-key",
    default=None,
    help="One message per key, however often it is sent (default: a fresh UUID).",
)
@output.json_option
def send(
    name: str,
    message: str,
    no_wait: bool,
    timeout: float | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Send MESSAGE to agent NAME and print its reply.

    MESSAGE is JSON, or text sent as {"text": MESSAGE}; - reads it from stdin,
    @FILE from a file.
    """
    body = message_body(read_message(message))
    key = idempotency_key or str(uuid.uuid4())
    params: dict[str, str] = {} if no_wait else {"wait": "true"}
    if timeout is not None and not no_wait:
        params["timeout"] = f"{timeout:g}"
    # Without --timeout the daemon applies the agent's wait_timeout, unknown here.
    read_timeout = (
        client.READ_TIMEOUT if no_wait else (timeout + client.WAIT_MARGIN if timeout else None)
    )
    path = f"/api/agents/{name}/messages"
    with client.current().client() as api:
        try:
            with output.waiting(f"{name}: waiting for the reply" if not no_wait else "sending"):
                answer = api.json(
                    "POST",
                    path,
                    params=params,
                    content=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json", "Idempotency-Key": key},
                    read_timeout=read_timeout,
                    retries=SEND_RETRIES,
                )
        except client.ConnectionLost as exc:
            raise client.CliError(
                f"{exc.format_message()}\nthe message may be stored: send it again with "
                f"--idempotency-key {key} to store it at most once"
            ) from exc
    if as_json:
        output.print_json(answer)
    status = answer.get("status") if isinstance(answer, dict) else None
    if no_wait:
        if not as_json:
            click.echo(answer.get("id") if isinstance(answer, dict) else answer)
        return
    if status == "delivered":
        if not as_json:
            output.print_json(answer.get("reply"))
        return
    message_id = answer.get("id") if isinstance(answer, dict) else "?"
    if status in ("failed", "dead"):
        raise client.CliError(f"message {message_id} is {status}: {answer.get('error')}")
    raise client.CliError(
        f"no reply yet; message {message_id} is {status} "
        f"(see `roost messages show {name} {message_id}`)"
    )


# --------------------------------------------------------------------------- route


@click.command()
@click.argument("event_type", metavar="TYPE")
@click.argument("message")
@click.option("--all", "fan_out", is_flag=True, help="Every agent that handles TYPE gets a copy.")
@click.option(
    "--idempotency-key",
    default=None,
    help="One message per agent and key, however often it is sent (default: a fresh UUID).",
)
@output.json_option
def route(
    event_type: str, message: str, fan_out: bool, idempotency_key: str | None, as_json: bool
) -> None:
    """Route MESSAGE by event TYPE: store it for the first agent that handles TYPE
    (in configuration order), or for every one with --all; print AGENT ID per copy.

    MESSAGE is JSON, or text sent as {"text": MESSAGE}; - reads it from stdin,
    @FILE from a file.
    """
    body = message_body(read_message(message))
    key = idempotency_key or str(uuid.uuid4())
    with client.current().client() as api:
        try:
            answer = api.json(
                "POST",
                f"/api/route/{event_type}",
                params={"all": "true"} if fan_out else {},
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
                retries=SEND_RETRIES,
            )
        except client.ConnectionLost as exc:
            raise client.CliError(
                f"{exc.format_message()}\nthe message may be stored: route it again with "
                f"--idempotency-key {key} to store it at most once"
            ) from exc
    if as_json:
        output.print_json(answer)
        return
    copies = answer if isinstance(answer, list) else [answer]
    for copy in copies:
        if isinstance(copy, dict):
            click.echo(f"{copy.get('agent')} {copy.get('id')}")


# --------------------------------------------------------------------------- messages


@click.group()
def messages() -> None:
    """An agent's durable messages: ls, show."""


@messages.command(name="ls")
@click.argument("name", shell_complete=client.complete_agent_name)
@click.option(
    "--status",
    type=click.Choice([s.value for s in MessageStatus]),
    default=None,
    help="Only messages in this status.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=LIST_LIMIT_MAX),
    default=50,
    show_default=True,
    help="The newest this many.",
)
@output.json_option
def list_messages(name: str, status: str | None, limit: int, as_json: bool) -> None:
    """List agent NAME's newest messages, oldest first: ID STATUS ATTEMPTS AGE ERROR."""
    params = {"limit": str(limit)}
    if status is not None:
        params["status"] = status
    with client.current().client() as api:
        data = api.json("GET", f"/api/agents/{name}/messages", params=params)
    if as_json:
        output.print_json(data)
        return
    listed = data.get("messages") if isinstance(data, dict) else None
    rows = [m for m in listed or [] if isinstance(m, dict)]
    if not rows:
        click.echo(f"no messages for {name}" + (f" in status {status}" if status else ""))
        return
    now = time.time()
    output.print_table(
        MESSAGE_HEADERS,
        [
            [
                str(m.get("id")),
                str(m.get("status")),
                str(m.get("attempts", 0)),
                output.age(m.get("created_at"), now),
                _first_line(m.get("error")),
            ]
            for m in rows
        ],
        status_columns=("STATUS",),
    )


def _first_line(text: object, width: int = 60) -> str:
    lines = str(text or "").splitlines()
    if not lines:
        return "-"
    return lines[0] if len(lines[0]) <= width else lines[0][: width - 3] + "..."


def _json_text(value: Any) -> list[str]:
    return json.dumps(value, indent=2, sort_keys=True).splitlines()


def describe_message(message: dict[str, Any]) -> str:
    lines = [
        f"message {message.get('id')}: {message.get('status')}",
        f"  agent:       {message.get('agent')}",
        f"  attempts:    {message.get('attempts', 0)}",
        f"  created:     {output.when(message.get('created_at'))}",
        f"  updated:     {output.when(message.get('updated_at'))}",
        f"  delivered:   {output.when(message.get('delivered_at'))}",
        f"  key:         {message.get('idempotency_key') or '-'}",
    ]
    if message.get("event_type"):
        lines.append(f"  event type:  {message['event_type']}")
    if message.get("next_attempt_at"):
        lines.append(f"  next try:    {output.when(message.get('next_attempt_at'))}")
    if message.get("error"):
        lines.append(f"  error:       {message['error']}")
    lines.append("  body:")
    lines.extend(f"    {line}" for line in _json_text(message.get("body")))
    if message.get("status") == "delivered":
        lines.append("  reply:")
        lines.extend(f"    {line}" for line in _json_text(message.get("reply")))
    return "\n".join(lines)


@messages.command()
@click.argument("name", shell_complete=client.complete_agent_name)
@click.argument("message_id", metavar="ID")
@output.json_option
def show(name: str, message_id: str, as_json: bool) -> None:
    """Show message ID of agent NAME: status, attempts, times, body, reply, error."""
    with client.current().client() as api:
        message = api.json("GET", f"/api/agents/{name}/messages/{message_id}")
    if as_json:
        output.print_json(message)
    else:
        click.echo(describe_message(message if isinstance(message, dict) else {}))
