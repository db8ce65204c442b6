"""Routing by event type: which agents handle ``issue.opened``. Pure.

Rules (issue 10; DESIGN.md "Configuration"):
- An agent's ``event_types`` is a list of glob patterns (``fnmatch`` syntax, case
  sensitive: ``*``, ``?``, ``[...]``) matched against the whole event type.
- An agent with no list (``None``) handles ``<prefix>.*``, where the prefix is its
  name up to the first ``-``: agent ``issue-triage`` handles ``issue.*``. An
  empty list handles nothing.
- ``route`` walks the candidates in the order given (the configuration's order:
  the caller passes it) and returns the first match, or every match with
  ``fan_out``; an empty result means no agent handles the type.
- An event type is 1-200 characters of letters, digits and ``. _ : -``, starting
  with a letter or digit (it travels in URL paths and HTTP headers); a pattern may
  also hold the glob characters ``* ? [ ] !``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_EVENT_TYPE",
    "check_event_type",
    "check_pattern",
    "default_patterns",
    "handles",
    "patterns_of",
    "route",
]

MAX_EVENT_TYPE = 200
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_PATTERN = re.compile(r"^[A-Za-z0-9._:*?\[\]!-]+$")


def check_event_type(event_type: str) -> str:
    """``event_type`` itself, or ValueError saying what is wrong with it."""
    if not 0 < len(event_type) <= MAX_EVENT_TYPE or not _EVENT_TYPE.match(event_type):
        raise ValueError(
            f"invalid event type {event_type!r}: use 1-{MAX_EVENT_TYPE} letters, digits "
            "and '.', '_', ':', '-', starting with a letter or digit (e.g. 'issue.opened')"
        )
    return event_type


def check_pattern(pattern: str) -> str:
    """A glob pattern of event types, or ValueError."""
    if not 0 < len(pattern) <= MAX_EVENT_TYPE or not _PATTERN.match(pattern):
        raise ValueError(
            f"invalid event type pattern {pattern!r}: use letters, digits, '.', '_', ':', "
            "'-' and the glob characters '*', '?', '[', ']', '!' (e.g. 'pr.*')"
        )
    return pattern


def default_patterns(agent: str) -> tuple[str, ...]:
    """The prefix rule: agent ``issue-triage`` handles ``issue.*``."""
    return (f"{agent.split('-', 1)[0]}.*",)


def patterns_of(agent: str, event_types: Sequence[str] | None) -> tuple[str, ...]:
    """The patterns an agent handles: its list, or the prefix rule when it has none."""
    return default_patterns(agent) if event_types is None else tuple(event_types)


def handles(patterns: Iterable[str], event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in patterns)


def route(
    candidates: Iterable[tuple[str, Sequence[str]]], event_type: str, *, fan_out: bool = False
) -> list[str]:
    """The agents (by name, in candidate order) that get ``event_type``: the first
    whose patterns match, or with ``fan_out`` every one. Empty: nobody handles it."""
    chosen: list[str] = []
    for name, patterns in candidates:
        if handles(patterns, event_type):
            chosen.append(name)
            if not fan_out:
                break
    return chosen
