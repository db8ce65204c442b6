"""The CLI's one client of the daemon's admin API, and how the CLI fails.

Role: every verb reaches the daemon through :class:`ApiClient` (httpx, one
connection pool per command), made by :class:`Connection`, which knows where
the daemon is and which token to send. Failures are :class:`CliError` (exit 1)
or :class:`CliUsageError` (exit 2), printed as one ``roost: ...`` line on stderr.

Invariants:
- Where things come from: ``--config`` (else ``ROOST_CONFIG``, else
  ``./roost.toml``); the daemon URL from ``--url`` (else ``ROOST_URL``, else
  ``server.listen``); the token from ``--token`` (else ``ROOST_TOKEN``, else
  ``server.token_file``). The configuration is read only when a value is needed
  from it, at most once per command.
- httpx, httpx-sse and the configuration module (pydantic) are imported inside
  the functions that use them, never when this module is imported: ``roost
  --help`` pays for none of them.
- Every transport failure and every answer >= 400 becomes a CliError whose
  message says what went wrong and what to do. A 404 that names an agent the
  daemon does not know adds the nearest known names ("did you mean 'echo'?").
- A request is sent again only when the caller says it is safe to repeat
  (``retries``: a GET, or a POST with an ``Idempotency-Key``), and only when the
  connection was lost after it was sent; a timeout is never retried.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import click

from roost import errors

if TYPE_CHECKING:
    import httpx
    from click.shell_completion import CompletionItem

    from roost.config import Settings
    from roost.config.sources import ClientView

__all__ = [
    "CONNECT_TIMEOUT",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "READ_TIMEOUT",
    "WAIT_MARGIN",
    "ApiClient",
    "CliError",
    "CliUsageError",
    "Connection",
    "ConnectionLost",
    "Refused",
    "complete_agent_name",
    "connection_of",
    "current",
    "default_api_url",
    "did_you_mean",
]

EXIT_FAILURE = 1
EXIT_CONFIG = 2
#: Seconds allowed to connect to the daemon, and to answer reads.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: Extra seconds the CLI waits beyond a wait it asked the daemon for (``?timeout=``).
WAIT_MARGIN = 10.0
#: "Did you mean": at most this many names, each at least this alike (difflib ratio).
SUGGESTIONS = 3
SUGGESTION_CUTOFF = 0.6
#: Seconds a shell completion may spend asking the daemon for agent names.
COMPLETION_TIMEOUT = 2.0


class CliError(click.ClickException):
    """A failure reported as one ``roost: ...`` line on stderr (exit 1)."""

    exit_code = EXIT_FAILURE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"roost: {self.format_message()}", err=True)


class Refused(CliError):
    """The daemon answered, with an error (HTTP status >= 400) or not in the API's shape."""


class ConnectionLost(CliError):
    """The request may have reached the daemon but no whole answer came back (the
    connection dropped or the answer timed out): what it asked for may have happened."""


class CliUsageError(CliError):
    """Bad configuration or arguments (exit 2); the message names the key or option."""

    exit_code = EXIT_CONFIG


def default_api_url(settings: Settings | ClientView) -> str:
    """The URL a local client uses to reach ``server.listen``."""
    from roost.config.sources import ClientView

    if isinstance(settings, ClientView):
        host, port = settings.listen_host, settings.listen_port
    else:
        host, port = settings.server.listen_host, settings.server.listen_port
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _config_failure(exc: errors.ConfigError) -> CliUsageError:
    return CliUsageError(f"configuration error: {exc}")


@dataclasses.dataclass
class Connection:
    """Where the daemon is and how to authenticate, from options, environment and config."""

    config_path: str | None
    url_option: str | None
    token_option: str | None
    _settings: Settings | None = None
    _view: ClientView | None = None

    def settings(self) -> Settings:
        """The whole configuration, validated (``up``, ``doctor``: pydantic is loaded)."""
        if self._settings is None:
            from roost import config

            try:
                self._settings = config.load_settings(self.config_path)
            except errors.ConfigError as exc:
                raise _config_failure(exc) from exc
        return self._settings

    def view(self) -> ClientView:
        """Just where the daemon listens and its token file (talking to a daemon needs
        no more, and reading it this way keeps ``roost ps`` fast)."""
        if self._view is None:
            from roost.config.sources import client_view

            try:
                self._view = client_view(self.config_path)
            except errors.ConfigError as exc:
                raise _config_failure(exc) from exc
        return self._view

    def use_config(self, path: str) -> None:
        """``--config`` given after the verb: forget what was read from another file."""
        self.config_path = path
        self._settings = None
        self._view = None

    def url(self) -> str:
        url = self.url_option or default_api_url(self.view())
        return url.rstrip("/")

    def token(self) -> str | None:
        if self.token_option:
            return self.token_option
        try:
            return self.view().token()
        except errors.ConfigError as exc:
            raise _config_failure(exc) from exc

    def client(self) -> ApiClient:
        return ApiClient(self.url(), self.token())


def current() -> Connection:
    """The running command's connection.

    Shell completion parses the command line without running the root group's
    callback, so then it is built from the root's parsed options.
    """
    return connection_of(click.get_current_context())


def connection_of(ctx: click.Context) -> Connection:
    """:func:`current` for a given context (shell completion runs outside any)."""
    found = ctx.find_object(Connection)
    if found is not None:
        return found
    params = ctx.find_root().params
    return Connection(params.get("config_path"), params.get("url"), params.get("token"))


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """``"; did you mean 'echo'?"`` with the nearest known names, or ``""``."""
    import difflib

    def likeness(other: str) -> float:
        return difflib.SequenceMatcher(None, name, other).ratio()

    # difflib's own ranking (get_close_matches) orders ties backwards: best first, then by name.
    ranked = sorted((-likeness(n), n) for n in set(known))
    nearest = [n for score, n in ranked if -score >= SUGGESTION_CUTOFF][:SUGGESTIONS]
    if not nearest:
        return ""
    return "; did you mean " + " or ".join(repr(n) for n in nearest) + "?"


def error_message(response: httpx.Response) -> str:
    """The daemon's ``{"error": ...}`` (with its log tail), or the status and body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        message = error
    else:
        message = f"HTTP {response.status_code}: {response.text.strip()[:200]}"
    if response.status_code == 401:
        message += " (pass --token, set ROOST_TOKEN, or set server.token_file in the config)"
    tail = body.get("log_tail") if isinstance(body, dict) else None
    if isinstance(tail, str) and tail.strip() and tail.strip() not in message:
        message += "\nlog tail:\n" + tail.rstrip()
    return message


class ApiClient:
    """Blocking calls to the daemon's admin API, failures turned into :class:`CliError`."""

    def __init__(self, url: str, token: str | None) -> None:
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(
                base_url=url,
                headers=headers,
                timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            )
        except httpx.InvalidURL as exc:
            raise CliUsageError(f"invalid --url {url!r}: {exc}") from exc

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    # ----------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | Sequence[str]] | None = None,
        body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = READ_TIMEOUT,
        retries: int = 0,
    ) -> httpx.Response:
        """Send one request; an answer >= 400 raises CliError with the daemon's message.

        ``body`` is sent as JSON, ``content`` as is. ``retries``: times to send it
        again when the connection is lost after sending (only for requests that
        are safe to repeat).
        """
        import httpx

        timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT)
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method,
                    path,
                    params=params,
                    json=body,
                    content=content,
                    headers=headers,
                    timeout=timeout,
                )
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt >= retries:
                    raise self._failure(method, path, exc) from exc
                attempt += 1
            except httpx.HTTPError as exc:
                raise self._failure(method, path, exc) from exc
        if response.status_code >= 400:
            raise Refused(self._refusal(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request`, answering the decoded JSON body."""
        return self._decoded(self.request(method, path, **kwargs), f"{method} {path}")

    def _decoded(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise Refused(
                f"Roost at {self.url} answered {what} with something other than JSON"
            ) from exc

    def _failure(self, method: str, path: str, exc: httpx.HTTPError) -> CliError:
        import httpx

        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return CliError(f"no Roost answers at {self.url}; start it with `roost up`")
        if isinstance(exc, httpx.UnsupportedProtocol):
            return CliUsageError(f"invalid --url {self.url!r}: use http://host:port")
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionLost(f"Roost at {self.url} did not answer {method} {path} in time")
        return ConnectionLost(f"talking to Roost at {self.url} failed ({method} {path}): {exc}")

    def _refusal(self, response: httpx.Response) -> str:
        message = error_message(response)
        if response.status_code != 404:
            return message
        try:
            body = response.json()
        except ValueError:
            return message
        name = body.get("agent") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return message
        try:
            known = self.agent_names()
        except CliError:
            return message  # no suggestions rather than a second failure
        return message if name in known else message + did_you_mean(name, known)

    # ----------------------------------------------------------------- shapes

    def agents(self) -> list[dict[str, Any]]:
        """``GET /api/agents``: every agent as JSON, by name."""
        data = self.json("GET", "/api/agents")
        agents = data.get("agents") if isinstance(data, dict) else None
        return [a for a in agents or [] if isinstance(a, dict)]

    def agent_names(self) -> list[str]:
        return [str(a.get("name")) for a in self.agents()]

    def healthz(self, timeout: float) -> dict[str, Any] | None:
        """``GET /healthz``'s body when Roost answers it (no token needed), else None."""
        import httpx

        try:
            response = self._http.get("/healthz", timeout=timeout)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def event_stream(self, last_id: int | None) -> Iterator[tuple[int | None, dict[str, Any]]]:
        """Follow ``GET /api/events`` (server-sent events, read by httpx-sse) from
        after ``last_id``: ``(id, event)`` pairs until the daemon ends the stream.

        Raises Refused when the daemon answers with an error or not with events,
        and CliError (ConnectionLost once opened) when the connection fails.
        """
        import httpx
        import httpx_sse

        headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        try:
            with httpx_sse.connect_sse(
                self._http, "GET", "/api/events", headers=headers, timeout=timeout
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise Refused(self._refusal(source.response))
                for sse in source.iter_sse():
                    try:
                        event = json.loads(sse.data)
                    except ValueError:
                        continue  # not one of ours; the stream itself is fine
                    if isinstance(event, dict):
                        yield (int(sse.id) if sse.id.isdigit() else None), event
        except httpx_sse.SSEError as exc:
            raise Refused(
                f"Roost at {self.url} did not answer GET /api/events with events: {exc}"
            ) from exc
        except httpx.HTTPError as exc:
            raise self._failure("GET", "/api/events", exc) from exc

    def text_stream(self, path: str, params: Mapping[str, str]) -> Iterator[str]:
        """Follow a streamed text answer (e.g. followed logs) until the daemon ends it."""
        import httpx

        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise Refused(self._refusal(response))
                yield from response.iter_text()
        except httpx.HTTPError as exc:
            raise self._failure("GET", path, exc) from exc


def complete_agent_name(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion for agent names: the daemon's agents that start with
    ``incomplete`` and are not already on the command line; none when no daemon answers."""
    from click.shell_completion import CompletionItem

    given = ctx.params.get(param.name or "") or ()
    if isinstance(given, str):
        given = (given,)
    try:
        with connection_of(ctx).client() as api:
            data = api.json("GET", "/api/agents", read_timeout=COMPLETION_TIMEOUT)
    except click.ClickException:
        return []
    agents = data.get("agents") if isinstance(data, dict) else None
    names = [str(a.get("name")) for a in agents or [] if isinstance(a, dict)]
    return [CompletionItem(n) for n in names if n.startswith(incomplete) and n not in given]
