"""Turning pydantic's validation errors into one ``ConfigError`` a person can act on.

Role: every configuration problem reads ``file: dotted.key: what is wrong``, one
line per problem; an unknown key suggests the nearest known one ("did you
mean ...?").

Invariants:
- Environment values are never echoed (they may be secrets).
- ``ConfigError.key`` is the first problem's dotted key; ``ConfigError.file`` the
  real file, or None for display names like ``<stored spec>``.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from roost.errors import ConfigError

__all__ = ["config_error", "known_keys", "suggest"]

_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
}


def _dotted(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc if part != "[key]")


def _model_in(annotation: Any) -> Any:
    """The BaseModel class a field holds, looking through Annotated/Optional."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def known_keys(root: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys a table at ``loc`` (below ``root``) may hold; [] when unknown."""
    model: Any = root
    parts = list(loc)
    while parts:
        part = str(parts.pop(0))
        if model is None:
            return []
        fields = model.model_fields
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return []
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            # dict[name, Model]: the next part is a name, the one after a key of Model.
            if not parts:
                return []
            parts.pop(0)
            annotation = typing.get_args(annotation)[1]
        model = _model_in(annotation)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def suggest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest choice, or ''."""
    nearest = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {nearest[0]!r}?)" if nearest else ""


def _problem(
    error: Mapping[str, Any], prefix: tuple[str, ...], root: type[BaseModel] | None
) -> tuple[str, str]:
    loc = tuple(error["loc"])
    # A field alias (docker.agentIdleTimeout) is already in loc as the user wrote it.
    key = _dotted(prefix + loc)
    kind = error["type"]
    secret = "env" in loc  # never echo environment values back
    if kind == "extra_forbidden":
        hint = ""
        if root is not None and loc:
            hint = suggest(str(loc[-1]), known_keys(root, loc[:-1]))
        return key, "unknown key" + hint
    if kind == "missing":
        return key, "required key is missing"
    if kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        # Cross-field errors come from a model validator (empty loc) as "key: message".
        match = re.match(r"^([\w.-]+): (.*)$", message, re.DOTALL)
        if not loc and match:
            return _dotted((*prefix, match.group(1))), match.group(2)
        return key, message
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        got = "" if secret else f", got {error.get('input')!r}"
        return key, f"must be one of {expected}{got}"
    if kind == "string_type" and secret:
        return key, "must be a string (quote it)"
    if kind in _TYPE_MESSAGES:
        got = "" if secret else f", got {error.get('input')!r}"
        return key, _TYPE_MESSAGES[kind] + got
    return key, str(error["msg"])


def _origin(key: str, origins: Mapping[str, str]) -> str:
    """`` (from $VAR)`` when an environment variable set ``key`` (or a key under it)."""
    found = [v for k, v in origins.items() if k == key or k.startswith(key + ".")]
    return f" (from ${', $'.join(sorted(found))})" if found else ""


def config_error(
    exc: ValidationError,
    *,
    file: str,
    prefix: tuple[str, ...],
    root: type[BaseModel] | None = None,
    origins: Mapping[str, str] | None = None,
) -> ConfigError:
    """One ConfigError listing every problem of ``exc`` as ``file: key: message``
    (``origins``: the environment variable that set a key, named after it)."""
    problems = [_problem(error, prefix, root) for error in exc.errors()]
    if origins:
        problems = [(key, message + _origin(key, origins)) for key, message in problems]
    lines = [
        f"{file}: {key}: {message}" if key else f"{file}: {message}" for key, message in problems
    ]
    first_key = problems[0][0] if problems else None
    # ``file`` is a display name when not a real path (e.g. "<stored spec>").
    real_file = None if file.startswith("<") else file
    return ConfigError("\n".join(lines), key=first_key or None, file=real_file)
