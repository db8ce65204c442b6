"""What the CLI prints: tables, JSON, ages and times, spinners and progress bars.

Role: the one place that decides how results look. Verb modules hand it rows
and data; it prints them.

Invariants:
- stdout carries results only (tables, JSON, replies); spinners, progress bars
  and messages for people go to stderr.
- A table is coloured (Rich) only when stdout is a terminal, ``NO_COLOR`` is
  unset or empty and ``TERM`` is not ``dumb``; otherwise it is plain columns
  with the same headers and words, so scripts that read it see no escape codes.
- Rich is imported only when it draws something: a coloured table, a spinner or
  a progress bar. Cells are drawn as text, never as Rich markup.
- Spinners and progress bars appear only when stderr is a terminal; a spinner
  only once a wait has lasted :data:`SPINNER_DELAY` (no flicker on fast calls).
- ``--json`` output is the daemon's JSON, indented, keys sorted: one option
  (:data:`json_option`) and one printer (:func:`print_json`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.status import Status

__all__ = [
    "SPINNER_DELAY",
    "STATUS_STYLES",
    "age",
    "colour_wanted",
    "format_table",
    "json_option",
    "print_json",
    "print_table",
    "progress",
    "waiting",
    "when",
]

#: Seconds a wait lasts before a spinner is shown.
SPINNER_DELAY = 0.3

#: Rich styles of the words in a status column: agent states, job and message statuses.
STATUS_STYLES: dict[str, str] = {
    "created": "dim",
    "starting": "yellow",
    "running": "green",
    "idle": "cyan",
    "paused": "blue",
    "stopped": "dim",
    "crashed": "red",
    "restarting": "yellow",
    "failed": "bold red",
    "queued": "yellow",
    "delivering": "yellow",
    "delivered": "green",
    "dead": "bold red",
    "succeeded": "green",
    "timed_out": "red",
    "cancelled": "dim",
}

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- tables


def colour_wanted(stream: IO[str]) -> bool:
    """True when ``stream`` is a terminal and neither NO_COLOR nor TERM=dumb says no."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return _is_terminal(stream)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain columns, two spaces apart, no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *rows]
    ]
    return "\n".join(lines)


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    status_columns: Collection[str] = (),
    file: IO[str] | None = None,
    colour: bool | None = None,
) -> None:
    """Print a table on ``file`` (stdout); words in ``status_columns`` get
    :data:`STATUS_STYLES` colours when colour is wanted (default: :func:`colour_wanted`)."""
    stream = file if file is not None else sys.stdout
    if colour is None:
        colour = colour_wanted(stream)
    plain = format_table(headers, rows)
    if not colour:
        click.echo(plain, file=stream)
        return
    # As wide as the plain table: cells never wrap, the terminal folds long lines.
    width = max(len(line) for line in plain.splitlines())
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    styled = [h in status_columns for h in headers]
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(
            *(
                Text(cell, style=STATUS_STYLES.get(cell, "") if is_status else "")
                for cell, is_status in zip(row, styled, strict=True)
            )
        )
    console = Console(file=stream, highlight=False, force_terminal=True)
    console.width = max(console.width, width)
    console.print(table)


# --------------------------------------------------------------------------- times


def age(since: object, now: float) -> str:
    """How long ago epoch second ``since`` was, kubectl style: ``45s``, ``3m20s``,
    ``42m``, ``5h10m``, ``30h``, ``3d4h``, ``12d``; ``-`` when unknown."""
    if isinstance(since, bool) or not isinstance(since, int | float) or since <= 0:
        return "-"
    seconds = max(0, int(now - since))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 60:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 1:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def when(timestamp: object) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``; ``-`` when unknown."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- waits


class _DelayedSpinner:
    """A Rich spinner on stderr that appears only after ``delay`` seconds.

    The timer thread and the caller's thread meet under ``_lock``: once
    :meth:`stop` has run, the spinner can no longer appear.
    """

    def __init__(self, text: str, delay: float) -> None:
        self._text = text
        self._lock = threading.Lock()
        self._stopped = False
        self._status: Status | None = None
        self._timer = threading.Timer(delay, self._show)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def _show(self) -> None:
        from rich.console import Console

        with self._lock:
            if self._stopped:
                return
            self._status = Console(stderr=True).status(self._text)
            self._status.start()

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._stopped = True
            if self._status is not None:
                self._status.stop()


@contextlib.contextmanager
def waiting(text: str, *, delay: float = SPINNER_DELAY) -> Iterator[None]:
    """Show a spinner with ``text`` on stderr (a terminal only) while the block runs."""
    if not _is_terminal(sys.stderr):
        yield
        return
    spinner = _DelayedSpinner(text, delay)
    spinner.start()
    try:
        yield
    finally:
        spinner.stop()


@contextlib.contextmanager
def progress(total: int, text: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr for ``total`` steps (a terminal and two steps or more
    only); yields the function that advances it by one (callable from any thread)."""
    if total < 2 or not _is_terminal(sys.stderr):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(text, total=total)
        yield lambda: bar.advance(task)
