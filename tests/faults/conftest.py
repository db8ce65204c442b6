"""Fixtures for fault tests: a private dockerd to stop, kill and restart; a tiny tmpfs.

``private_dockerd`` / ``private_dockerd_live_restore`` yield a
:class:`PrivateDockerd`: the socket of a Docker daemon of this session's own
(``scripts/private-dockerd``, instance ``pytest-<pid>`` / ``pytest-<pid>-lr``)
and ``start`` / ``stop`` / ``restart`` coroutines that run the script. Each
instance is created on first use (bridge, daemon, test images) and removed at
the end of the session; between tests it is started again if a test left it
down, and every container, network and volume on it is removed (the daemon
belongs to this session alone).

``small_tmpfs`` mounts a 2 MiB tmpfs for disk-full tests (``state_dir`` on it,
then fill it) and unmounts it afterwards.

``fault_report`` records what a scenario measured (recovery time, messages lost,
alerts sent); the session's terminal summary prints every figure under "fault
report", so a run of ``make faults`` ends with the numbers.

Invariants:
- The shared Docker daemon is never stopped or reconfigured: only this
  session's private instances are.
- The private daemon runs with ``--iptables=false`` on its own bridge: the
  host reaches its containers (by address or published port) and they reach
  the host, but containers on it cannot reach each other (the host's FORWARD
  policy drops bridged traffic); test networking on the standard daemon.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

PRIVATE_DOCKERD = ROOT / "scripts" / "private-dockerd"
SCRIPT_TIMEOUT = 180.0
TMPFS_SIZE = "2m"


def run_private_dockerd(*args: str) -> str:
    """Run scripts/private-dockerd synchronously; return stdout; fail with its output."""
    result = subprocess.run(
        [str(PRIVATE_DOCKERD), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=SCRIPT_TIMEOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"scripts/private-dockerd {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stderr.strip()}"
        )
    return result.stdout


@dataclass(frozen=True)
class PrivateDockerd:
    """One private daemon: where it listens, and how a test takes it down and up."""

    name: str
    socket: str
    subnet: str
    gateway: str
    live_restore: bool

    @property
    def docker_host(self) -> str:
        """The value for ``[docker] host`` and for aiodocker's ``url``."""
        return f"unix://{self.socket}"

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the daemon (SIGTERM); ``kill=True``: SIGKILL it, as a crash would."""
        await self._run("stop", *(["--kill"] if kill else []))

    async def start(self) -> None:
        """Start it again on the same data root; returns once it answers."""
        await self._run("start")

    async def restart(self, *, kill: bool = False) -> None:
        await self._run("restart", *(["--kill"] if kill else []))

    async def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(await self._run("status", "--json"))
        return document

    async def _run(self, verb: str, *options: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(PRIVATE_DOCKERD),
            verb,
            self.name,
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT)
        if process.returncode != 0:
            raise RuntimeError(
                f"scripts/private-dockerd {verb} {self.name} exited {process.returncode}:\n"
                f"{stderr.decode().strip()}"
            )
        return stdout.decode()


def bring_up(name: str, *, live_restore: bool) -> PrivateDockerd:
    options = ["--live-restore"] if live_restore else []
    facts = json.loads(run_private_dockerd("up", name, "--json", *options))
    return PrivateDockerd(
        name=facts["name"],
        socket=facts["socket"],
        subnet=facts["subnet"],
        gateway=facts["gateway"],
        live_restore=facts["live_restore"],
    )


def reset(dockerd: PrivateDockerd) -> None:
    """Running again, and empty of everything tests create."""
    run_private_dockerd("start", dockerd.name)
    host = ["docker", "-H", dockerd.docker_host]
    ids = subprocess.run(
        [*host, "ps", "-aq"], capture_output=True, text=True, check=True
    ).stdout.split()
    if ids:
        removed = subprocess.run([*host, "rm", "-f", *ids], capture_output=True, text=True)
        if removed.returncode != 0:
            # A container the daemon refuses to remove (seen once after a test's
            # daemon restarts): once more after restarting it, then fail saying why.
            run_private_dockerd("restart", dockerd.name)
            left = subprocess.run(
                [*host, "ps", "-aq"], capture_output=True, text=True, check=True
            ).stdout.split()
            if left:
                again = subprocess.run([*host, "rm", "-f", *left], capture_output=True, text=True)
                if again.returncode != 0:
                    raise RuntimeError(
                        f"cannot empty private dockerd {dockerd.name}: {removed.stderr.strip()}; "
                        f"after a restart: {again.stderr.strip()}"
                    )
    subprocess.run([*host, "network", "prune", "-f"], capture_output=True, check=True)
    subprocess.run([*host, "volume", "prune", "-f"], capture_output=True, check=True)


@pytest.fixture(scope="session")
def _private_dockerd_session(docker_images: dict[str, str]) -> Iterator[PrivateDockerd]:
    name = f"pytest-{os.getpid()}"
    dockerd = bring_up(name, live_restore=False)
    yield dockerd
    run_private_dockerd("down", name)


@pytest.fixture(scope="session")
def _private_dockerd_live_restore_session(
    docker_images: dict[str, str],
) -> Iterator[PrivateDockerd]:
    name = f"pytest-{os.getpid()}-lr"
    dockerd = bring_up(name, live_restore=True)
    yield dockerd
    run_private_dockerd("down", name)


@pytest.fixture
def private_dockerd(_private_dockerd_session: PrivateDockerd) -> Iterator[PrivateDockerd]:
    """A private daemon (no live-restore), running and empty when the test starts."""
    yield _private_dockerd_session
    reset(_private_dockerd_session)


@pytest.fixture
def private_dockerd_live_restore(
    _private_dockerd_live_restore_session: PrivateDockerd,
) -> Iterator[PrivateDockerd]:
    """Like ``private_dockerd`` with ``--live-restore``: containers outlive the daemon."""
    yield _private_dockerd_live_restore_session
    reset(_private_dockerd_live_restore_session)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs directory (for ``state_dir``) that a test can fill; unmounted after."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount_point
    finally:
        # A file a test left open (e.g. SQLite) keeps it busy: detach it then.
        result = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=True)


def fill(directory: Path) -> int:
    """Write into ``directory`` until its file system is full; return the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                written += os.write(descriptor, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
    finally:
        os.close(descriptor)


# -- the report: figures measured by the scenarios, printed at the end ------------------

_FIGURES = pytest.StashKey[list[tuple[str, str, str]]]()


@dataclass
class FaultReport:
    """What one scenario measured; ``record`` adds a figure to the session's summary."""

    scenario: str
    figures: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, figure: str, value: object) -> None:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        self.figures.append((self.scenario, figure, shown))


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> FaultReport:
    figures = request.config.stash.setdefault(_FIGURES, [])
    return FaultReport(request.node.name, figures)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    figures = config.stash.get(_FIGURES, [])
    if not figures:
        return
    terminalreporter.section("fault report")
    scenario = None
    for name, figure, value in figures:
        if name != scenario:
            terminalreporter.write_line(name)
            scenario = name
        terminalreporter.write_line(f"    {figure}: {value}")
