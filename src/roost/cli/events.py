"""``roost events``: Roost's recent events, and with ``-f`` the live stream.

Role: the event verb, over ``GET /api/events`` through the one
:class:`~roost.cli.client.ApiClient` (the stream is read by httpx-sse there).

Invariants:
- Recent events first (``?recent=N``, JSON), then with ``-f`` the server-sent
  stream resumed after the newest of them (``Last-Event-ID``; with ``-n 0`` the
  newest is fetched but not printed), so nothing is printed twice and nothing
  between the list and the stream is missed.
- ``-f`` follows until interrupted (exit 0). When the daemon ends the stream
  or the connection fails, it reconnects every :data:`RECONNECT_DELAY` seconds
  from the last event printed (saying so once per outage); an error answer
  from the daemon (a refused token, say) ends it with exit 1.
- ``--json``: one JSON object per line (the daemon's event, unchanged).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import click

from roost.cli import client

__all__ = ["events", "format_event"]

RECONNECT_DELAY = 1.0
#: Seconds allowed to read the recent events (``--follow`` then waits without limit).
RECENT_TIMEOUT = 30.0


def format_event(event: dict[str, Any]) -> str:
    """``<time>  <kind>  <agent>  key=value ...`` on one line."""
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
    click.echo(json.dumps(event, sort_keys=True) if as_json else format_event(event))


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
    last_id: int | None = None
    with client.current().client() as api:
        # At least one, so that following resumes after the newest event even with -n 0.
        recent = api.json(
            "GET", "/api/events", params={"recent": str(max(limit, 1))}, read_timeout=RECENT_TIMEOUT
        )
        listed = recent.get("events") if isinstance(recent, dict) else None
        shown = [e for e in listed or [] if isinstance(e, dict)]
        for event in shown[len(shown) - limit :] if limit else []:
            _show(event, as_json)
        for event in shown:
            if isinstance(event.get("id"), int):
                last_id = event["id"]
        if not follow:
            return
        try:
            _follow(api, last_id, as_json)
        except KeyboardInterrupt:
            raise SystemExit(0) from None


def _follow(api: client.ApiClient, last_id: int | None, as_json: bool) -> None:
    interrupted = False
    while True:
        try:
            for event_id, event in api.event_stream(last_id):
                interrupted = False
                _show(event, as_json)
                last_id = event_id if event_id is not None else last_id
        except client.Refused:
            raise
        except client.CliError as exc:
            if not interrupted:  # once per outage, not once per attempt
                click.echo(
                    f"roost: event stream interrupted ({exc.format_message()}); reconnecting",
                    err=True,
                )
            interrupted = True
        # The stream ended (the daemon stopped or restarted) or failed: resume.
        time.sleep(RECONNECT_DELAY)
