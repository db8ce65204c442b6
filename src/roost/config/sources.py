"""Where configuration comes from, without validating it: for clients that must start fast.

Role: find the file (``--config``, ``ROOST_CONFIG``, ``./roost.toml``), read it
(TOML, or JSON by its suffix), lay the ``ROOST_<SECTION>__<KEY>`` environment
overrides over it, and read the token file. ``client_view`` gives a client of a
running daemon (``roost ps`` ...) just the two values it needs — where the daemon
listens and its token — without importing pydantic or building every model:
validating the whole file is ``roost up``'s and ``roost doctor``'s job.

Invariants:
- This module imports no pydantic (the CLI's start-up depends on it).
- ``server.listen`` is checked here by the same ``split_listen`` the models use,
  and its default is declared here once (``DEFAULT_LISTEN``; ``ServerConfig``
  takes it from here). Errors are ``ConfigError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from roost.errors import ConfigError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_LISTEN",
    "ClientView",
    "client_view",
    "environment_overrides",
    "find_config_file",
    "laid_over",
    "read_document",
    "read_token",
    "split_listen",
]

DEFAULT_CONFIG_NAME = "roost.toml"
CONFIG_ENV_VAR = "ROOST_CONFIG"
#: Where Roost listens unless ``server.listen`` says otherwise.
DEFAULT_LISTEN = "127.0.0.1:7075"


def split_listen(value: str, *, any_port: bool = False) -> tuple[str, int]:
    """``"127.0.0.1:7075"`` / ``"[::1]:7075"`` / ``":7075"`` → (host, port).
    ``any_port``: port 0 (a free port chosen when binding) is allowed."""
    match = re.match(r"^(?:\[([^\]]+)\]|([^:\[\]]*)):(\d{1,5})$", value.strip())
    if not match:
        raise ValueError(f"must be 'host:port' (e.g. 127.0.0.1:7075), got {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(2)
    port = int(match.group(3))
    lowest = 0 if any_port else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be {lowest}-65535, got {port}")
    return host, port


def find_config_file(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The file to load: ``path``, else ``$ROOST_CONFIG``, else ``./roost.toml``, else None.

    An explicitly named file (argument or variable) must exist; ``./roost.toml``
    is optional.
    """
    env = os.environ if environ is None else environ
    base = Path(cwd) if cwd is not None else None
    named: Path | None = None
    how = ""
    if path is not None and str(path):
        named, how = Path(path), "--config"
    elif env.get(CONFIG_ENV_VAR):
        named, how = Path(env[CONFIG_ENV_VAR]), CONFIG_ENV_VAR
    if named is not None:
        if base is not None and not named.is_absolute():
            named = base / named
        if not named.is_file():
            raise ConfigError(f"{named}: no such config file (from {how})", file=str(named))
        return named
    default = (base / DEFAULT_CONFIG_NAME) if base is not None else Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def read_document(file: Path) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}", file=str(file)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text: {exc}", file=str(file)) from exc
    if file.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                file=str(file),
            ) from exc
        if not isinstance(document, dict):
            raise ConfigError(f"{file}: the top level must be a JSON object", file=str(file))
        return document
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's message carries "(at line N, column M)".
        raise ConfigError(f"{file}: invalid TOML: {exc}", file=str(file)) from exc


ENV_PREFIX = "ROOST_"
ENV_DELIMITER = "__"


def environment_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``ROOST_<SECTION>__<KEY>`` variables as a document to lay over the file's,
    and which variable set each dotted key."""
    overlay: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for variable, raw in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or ENV_DELIMITER not in variable:
            continue
        parts = variable[len(ENV_PREFIX) :].split(ENV_DELIMITER)
        if any(not part for part in parts):
            raise ConfigError(f"environment {variable}: empty key between '__'")
        # Names are lower case in the file; an agent's env keeps its variables' case.
        keys = [
            part if index > 0 and parts[index - 1].lower() == "env" else part.lower()
            for index, part in enumerate(parts)
        ]
        table = overlay
        for key in keys[:-1]:
            child = table.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {variable}: {'.'.join(keys)} is not a table")
            table = child
        table[keys[-1]] = _env_value(raw)
        origins[".".join(keys)] = variable
    return overlay, origins


def _env_value(raw: str) -> Any:
    """A TOML value when the text is one (``30``, ``true``, ``["a"]``), else the text."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def laid_over(document: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(document)
    for key, value in overlay.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, Mapping):
            merged[key] = laid_over(below, value)
        else:
            merged[key] = value
    return merged


def read_token(path: Path, source_file: str | None) -> str:
    """The bearer token in ``path`` (stripped). ConfigError (key ``server.token_file``)
    when it cannot be read or is empty."""
    file = source_file or "<defaults>"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{file}: server.token_file: cannot read {str(path)!r}: {exc.strerror}",
            key="server.token_file",
            file=source_file,
        ) from exc
    if not token:
        raise ConfigError(
            f"{file}: server.token_file: {str(path)!r} is empty",
            key="server.token_file",
            file=source_file,
        )
    return token


@dataclasses.dataclass(frozen=True, slots=True)
class ClientView:
    """What a client of the daemon reads from the configuration."""

    listen_host: str
    listen_port: int
    token_file: Path | None
    source_file: str | None

    def token(self) -> str | None:
        return None if self.token_file is None else read_token(self.token_file, self.source_file)


def client_view(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientView:
    """``server.listen`` and ``server.token_file`` from the file and the environment,
    checked; nothing else is validated."""
    file = find_config_file(path, cwd=cwd, environ=environ)
    overlay, _ = environment_overrides(os.environ if environ is None else environ)
    document = laid_over(read_document(file) if file is not None else {}, overlay)
    display = str(file) if file is not None else "<defaults>"
    server = document.get("server", {})
    if not isinstance(server, Mapping):
        raise ConfigError(f"{display}: server: must be a table", key="server")
    listen = server.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str):
        raise ConfigError(f"{display}: server.listen: must be 'host:port'", key="server.listen")
    try:
        host, port = split_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"{display}: server.listen: {exc}", key="server.listen") from None
    token_file = server.get("token_file", "")
    if not isinstance(token_file, str):
        raise ConfigError(
            f"{display}: server.token_file: must be a string", key="server.token_file"
        )
    base = file.parent.absolute() if file is not None else Path(cwd) if cwd else Path.cwd()
    token_path = base / Path(token_file).expanduser() if token_file else None
    return ClientView(host, port, token_path, str(file) if file is not None else None)
