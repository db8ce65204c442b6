"""``EmbeddedEngine``: a whole Roost engine inside the library, started on first use.

Role: the core the async library classes share (``AsyncContainerManager``,
``AsyncDockerAgentRunner``): settings of their own, one engine started lazily in
the running event loop and shut down again, and the naming rule that turns any
string a caller uses into an agent name. ``SyncTwin`` is what the plain-call
classes (``ContainerManager``, ``DockerAgentRunner``) share: their core on a
private loop thread, ``with`` support, ``instance`` and ``core``.

Invariants:
- Construction checks Docker synchronously, with the engine's own rule for
  where Docker is (``adapters.docker_runtime.check_reachable``): an unreachable
  engine raises ``ContainerError`` (``DockerUnavailable``) before anything else,
  like the code the library replaces. Options are validated then too
  (``ConfigError`` naming the key).
- Own instance id (``<prefix>-<random>`` unless given) and own state directory:
  two library objects in one process, or one beside ``roost up``, never touch
  each other's containers.
- A state directory the caller did not give is a temporary one, created when
  the engine starts and removed when it stops: after ``_shutdown_engine``
  nothing is left on disk, and the engine has removed every container.
- At most one engine at a time, started once however many callers race; after
  a shutdown the next call starts a new one (possibly on another event loop:
  the sync classes run the core on a fresh loop thread after each stop).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from roost.adapters.docker_runtime import check_reachable
from roost.config import Settings, parse_settings, validate_agent_name
from roost.engine import Engine
from roost.library.loop_thread import LoopThread

__all__ = ["EmbeddedEngine", "SyncTwin", "agent_name_for", "derived_name"]

#: Longest readable part of a derived agent name (63-character DNS label, minus "-" and 8 hex).
_SLUG_LENGTH = 54


def agent_name_for(text: str) -> str:
    """The agent's name in Roost (a DNS label) for any string a caller uses.

    A string that is a DNS label already is kept as it is. Any other gets a
    readable slug plus 8 hex digits of its hash, so two strings never share an
    agent: ``"Code Agent"`` → ``code-agent-1c9f...``, ``""`` → ``agent-e3b0c442``.
    """
    try:
        return validate_agent_name(text)
    except ValueError:
        return derived_name(text, unique=text)


def derived_name(readable: str, *, unique: str) -> str:
    """A DNS label: a slug of ``readable`` plus 8 hex digits of the hash of ``unique``."""
    digest = hashlib.sha256(unique.encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", readable.lower()).strip("-")[:_SLUG_LENGTH].strip("-")
    return f"{slug or 'agent'}-{digest}"


class EmbeddedEngine:
    """A Roost engine of one library object (see the module docstring).

    ``defaults`` are ``[defaults]`` keys (any agent setting); ``sections`` are
    further top-level sections of the configuration (e.g. ``swarm``).
    """

    async def stop_all(self) -> object:
        """Stop and remove everything this object made (each class says what)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()

    def __init__(
        self,
        *,
        defaults: dict[str, Any],
        docker_host: str | None,
        state_dir: str | os.PathLike[str] | None,
        instance: str | None,
        sections: dict[str, Any] | None = None,
        instance_prefix: str = "lib",
    ) -> None:
        check_reachable(docker_host)
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self._document: dict[str, Any] = {
            "docker": {
                "host": docker_host or "",
                "instance": instance or f"{instance_prefix}-{secrets.token_hex(4)}",
            },
            "defaults": defaults,
            **(sections or {}),
        }
        self._settings = self._settings_at(self._given_state_dir or Path(tempfile.gettempdir()))
        self._engine: Engine | None = None
        self._starting: asyncio.Lock | None = None
        #: the temporary state directory of the running engine (removed on shutdown).
        self._temporary_dir: Path | None = None

    def _settings_at(self, state_dir: Path) -> Settings:
        document = {**self._document, "server": {"state_dir": str(state_dir)}}
        return parse_settings(document, file=f"<{type(self).__name__}>")

    @property
    def instance(self) -> str:
        """The ``roost.instance`` label on every container this object creates."""
        return self._settings.docker.instance

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def engine(self) -> Engine | None:
        """The running engine (None before first use and after a shutdown)."""
        return self._engine

    async def _ensure_engine(self) -> Engine:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._engine is None:
                self._engine = await self._start_engine()
            return self._engine

    async def _start_engine(self) -> Engine:
        temporary = None
        if self._given_state_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix=f"roost-{self.instance}-"))
        settings = self._settings_at(self._given_state_dir or temporary or Path())
        engine = self._new_engine(settings)
        try:
            await engine.start()
        except BaseException:
            if temporary is not None:
                await asyncio.to_thread(shutil.rmtree, temporary, ignore_errors=True)
            raise
        self._settings = settings
        self._temporary_dir = temporary
        return engine

    def _new_engine(self, settings: Settings) -> Engine:
        """The engine to run; tests override this to run on a ``FakeRuntime``."""
        return Engine(settings)

    async def _shutdown_engine(self) -> None:
        """Stop and remove every container, stop the engine, remove the temporary
        state directory. Idempotent."""
        engine, self._engine = self._engine, None
        self._starting = None  # the next engine may run on another loop
        if engine is None:
            return
        try:
            await engine.stop(leave_running=False, remove=True)
        finally:
            temporary, self._temporary_dir = self._temporary_dir, None
            if temporary is not None:
                await asyncio.to_thread(shutil.rmtree, temporary, ignore_errors=True)


CoreT = TypeVar("CoreT", bound=EmbeddedEngine)


class SyncTwin(Generic[CoreT]):
    """An async core's plain-call face: the core runs on a private event-loop thread
    (started on first use, stopped by ``stop_all``; leaving ``with`` calls it)."""

    def __init__(self, core: CoreT) -> None:
        self._core = core
        self._loop = LoopThread(f"roost-{core.instance}")

    def stop_all(self) -> object:
        """Stop the core's work and the loop thread (each class says what)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    @property
    def instance(self) -> str:
        return self._core.instance

    @property
    def core(self) -> CoreT:
        """The async twin this wraps (its engine runs on the private loop thread)."""
        return self._core
