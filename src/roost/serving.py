"""Run Roost as a daemon: the engine plus the admin API under uvicorn, until a signal.

Two listeners: ``server.listen`` (the admin API, the proxy and the dashboard;
loopback by default) and ``server.agent_listen`` (the agent listener,
``roost.edge.agent_app``: the agent endpoints only, with per-agent tokens; by
default on the gateway of the agents' network, the address containers reach).

Order (each step must succeed before the next, so a refusal starts nothing):
1. read the API token; refuse (ConfigError naming ``server.listen`` and
   ``server.token_file``) when ``listen`` is not loopback and there is none;
2. bind the listen socket (a taken port fails here, before any container is touched);
3. start the engine (state lock, store, Docker, reconcile); once Docker answers
   and the agents' network exists, and before any agent is touched, bind the
   agent listener and make its URL every new container's ``ROOST_URL``;
4. serve HTTP on both until SIGTERM or SIGINT (SIGHUP re-reads the config file and
   applies its agents; an invalid file changes nothing and never stops the
   daemon; a second SIGTERM/SIGINT forces the close of open
   connections), or until the ``shutdown`` event is set;
5. stop the engine: managed containers are stopped with their grace period, or
   left running when ``docker.leave_running`` (the next start adopts them).

Invariants:
- uvicorn's own signal handling is disabled: it would re-raise the captured
  signal after serving and kill the process before the engine has stopped.
- When ``serve`` owns the process (``handle_signals``, as ``roost up``), what
  start-up built (modules, the app, the engine, its records) is moved out of the
  cyclic garbage collector's reach (``gc.freeze``) once, before serving: each full
  collection then walks only what was made since, instead of ~90 000 long-lived
  objects every few hundred requests (measured: ~20 µs of CPU per proxied request,
  bench P4). Frozen objects are still freed by reference counting; only cycles
  among them would be kept.
- Exit codes: 0 after a clean shutdown, 2 for configuration errors, 1 otherwise.
  Refusals are one clear line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Generator

import uvicorn

from roost import errors
from roost.aio import TaskSet
from roost.config import Settings
from roost.edge import create_agent_app, create_app
from roost.edge.connections import protocol_with_head_deadline
from roost.engine import Engine

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "bind_listen_socket",
    "freeze_startup_heap",
    "serve",
]

log = logging.getLogger("roost.serving")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _Server(uvicorn.Server):
    """uvicorn without its signal capture: ``serve`` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _fail(message: str) -> None:
    print(f"roost: {message}", file=sys.stderr)


def _api_token(settings: Settings) -> str | None:
    """The token, or ConfigError when listening off loopback without one. A token
    file others can read draws a warning (it is a password)."""
    token = settings.token()
    path = settings.token_path()
    if token is not None and path is not None:
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode
            if mode & 0o077:
                log.warning(
                    "server.token_file %s is readable by others (mode %o); "
                    "make it private: chmod 600 %s",
                    path,
                    stat.S_IMODE(mode),
                    path,
                )
    if token is None and settings.requires_token():
        file = settings.source_file or "<defaults>"
        raise errors.ConfigError(
            f"{file}: server.listen ({settings.server.listen}) is reachable from other "
            "machines, so the API needs a token: set server.token_file to a file holding "
            "one, or listen on 127.0.0.1",
            key="server.token_file",
            file=settings.source_file,
        )
    return token


async def bind_listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` ('' is every interface). OSError if taken."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve(
    settings: Settings,
    *,
    engine: Engine | None = None,
    listen_socket: socket.socket | None = None,
    agent_socket: socket.socket | None = None,
    shutdown: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run Roost until told to stop; return the process exit code.

    ``engine`` (default: built from ``settings``), ``listen_socket`` (default:
    bound from ``server.listen``) and ``agent_socket`` (default: bound from
    ``server.agent_listen`` once the agents' network is known) let tests run a
    daemon on fakes in-process; setting ``shutdown`` stops it like SIGTERM does.
    """
    logging.basicConfig(level=settings.server.log_level.upper(), format=_LOG_FORMAT)
    try:
        token = _api_token(settings)
    except errors.ConfigError as exc:
        _fail(str(exc))
        return EXIT_CONFIG

    sock = listen_socket
    if sock is None:
        host, port = settings.server.listen_host, settings.server.listen_port
        try:
            sock = await bind_listen_socket(host, port)
        except OSError as exc:
            _fail(
                f"cannot listen on {settings.server.listen} (server.listen): "
                f"{exc.strerror or exc}; is another Roost or program using it?"
            )
            return EXIT_FAILURE

    agent_sockets: list[socket.socket] = [] if agent_socket is None else [agent_socket]
    with contextlib.closing(sock), contextlib.ExitStack() as closing:
        closing.callback(_close_all, agent_sockets)
        if engine is None:
            try:
                engine = Engine(settings)
            except errors.ConfigError as exc:
                _fail(str(exc))
                return EXIT_CONFIG
        engine.add_opener(_agent_listener_opener(settings, engine, agent_sockets))
        try:
            await engine.start()
        except errors.ConfigError as exc:
            _fail(str(exc))
            return EXIT_CONFIG
        except errors.DockerUnavailable as exc:
            _fail(f"{exc} (start dockerd, e.g. with scripts/setup, or set docker.host)")
            return EXIT_FAILURE
        except errors.RoostError as exc:
            _fail(f"cannot start: {exc}")
            return EXIT_FAILURE
        try:
            return await _run_http(
                settings, engine, sock, agent_sockets[0], token, shutdown, handle_signals
            )
        finally:
            log.info("shutting down (leave_running=%s)", settings.docker.leave_running)
            await engine.stop()
            log.info("roost stopped")


def freeze_startup_heap() -> None:
    """Collect once, then exempt every object alive now from later cyclic collections
    (``gc.freeze``): start-up's objects live as long as the process."""
    gc.collect()
    gc.freeze()


def _close_all(sockets: list[socket.socket]) -> None:
    for each in sockets:
        each.close()


def _agent_listener_opener(
    settings: Settings, engine: Engine, sockets: list[socket.socket]
) -> Callable[[], Awaitable[None]]:
    """Bind the agent listener (unless a socket was given) once the agents' network
    is known, and make it the ROOST_URL of the containers created from now on."""

    async def open_agent_listener() -> None:
        if not sockets:
            host = settings.server.agent_listen_host or engine.agents_gateway
            if not host:
                raise errors.ConfigError(
                    f"{settings.source_file or '<defaults>'}: server.agent_listen "
                    f"({settings.server.agent_listen!r}) names no host and the agents' "
                    f"network ({engine.agents_network or 'bridge'}) has no gateway: set "
                    "server.agent_listen = 'HOST:PORT' to an address containers reach",
                    key="server.agent_listen",
                    file=settings.source_file,
                )
            try:
                sockets.append(await bind_listen_socket(host, settings.server.agent_listen_port))
            except OSError as exc:
                raise errors.RoostError(
                    f"cannot listen on {host}:{settings.server.agent_listen_port} "
                    f"(server.agent_listen, the agent listener): {exc.strerror or exc}"
                ) from exc
        engine.agent_url = _url_of(sockets[0])
        log.info("agent listener on %s (ROOST_URL of agent containers)", engine.agent_url)

    return open_agent_listener


def _uvicorn_config(settings: Settings, app: object) -> uvicorn.Config:
    level = settings.server.log_level
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level=level,
        lifespan="off",
        log_config=None,  # our basicConfig formats uvicorn's records too
        access_log=level == "debug",  # the dashboard polls every 2 s
        # Roost is the edge: the proxy appends the real peer to X-Forwarded-For, so
        # uvicorn must not replace the peer with what a loopback client claims.
        proxy_headers=False,
        http=protocol_with_head_deadline(settings.server.header_timeout),
        timeout_keep_alive=int(max(1.0, settings.server.keep_alive_timeout)),
        limit_concurrency=settings.server.max_connections,
    )


async def _run_http(
    settings: Settings,
    engine: Engine,
    sock: socket.socket,
    agent_sock: socket.socket,
    token: str | None,
    shutdown: asyncio.Event | None,
    handle_signals: bool,
) -> int:
    edge = create_app(engine, token=token)
    server = _Server(_uvicorn_config(settings, edge))
    agent_server = _Server(_uvicorn_config(settings, create_agent_app(engine)))
    if handle_signals:  # the process is ours (roost up): see the module docstring
        freeze_startup_heap()
    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("%s again: closing open connections now", signal.Signals(signum).name)
            server.force_exit = True
        else:
            log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    async def stop_when_asked() -> None:
        await stop.wait()
        # uvicorn waits for open responses to end: end the event streams (api.events),
        # the agents' WebSockets and their long polls first.
        await edge.api.state.event_streams.close()
        await engine.release_agents()
        server.should_exit = True
        agent_server.should_exit = True
        if server.force_exit:
            agent_server.force_exit = True

    reloads = TaskSet(log)

    async def reload() -> None:
        try:
            await engine.reload_from_file()
        except errors.RoostError as exc:
            # An invalid file changes nothing; the daemon goes on as it was.
            log.error("SIGHUP: configuration not reloaded: %s", exc)

    def on_hangup() -> None:
        log.info("SIGHUP: reloading the configuration")
        reloads.spawn(reload(), "roost.reload")

    installed: list[signal.Signals] = []
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        installed.append(signal.SIGHUP)
    watcher = asyncio.create_task(stop_when_asked(), name="roost.serving.shutdown")
    log.info("roost listening on %s (dashboard /, API /api, docs /docs)", _url_of(sock))

    async def serve_agents() -> None:
        try:
            await agent_server.serve(sockets=[agent_sock])
        except SystemExit:  # uvicorn's way to say it cannot serve: never out of a task
            log.error("the agent listener on %s could not start", _url_of(agent_sock))

    agents_task = asyncio.create_task(serve_agents(), name="roost.serving.agent-listener")
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn exits the process when it cannot start serving; we still stop the engine.
        _fail(f"the HTTP server could not start on {settings.server.listen}")
        return EXIT_FAILURE
    finally:
        agent_server.should_exit = True
        agent_server.force_exit = agent_server.force_exit or server.force_exit
        await asyncio.gather(agents_task, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await reloads.close()
        for signum in installed:
            loop.remove_signal_handler(signum)
    return EXIT_OK if server.started else EXIT_FAILURE
