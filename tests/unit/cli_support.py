"""What the CLI tests share: running the ``roost`` CLI in process, and a daemon on
fakes (``serving.serve`` on a free port) for it to talk to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from click.testing import CliRunner, Result

from roost.cli import cli
from roost.engine import Engine
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import make_settings
from tests.support import roost_daemon

__all__ = ["CLEAN_ENV", "IMAGE", "Daemon", "invoke", "running_daemon"]

IMAGE = "roost-mimic:latest"
#: Variables that would leak the developer's environment into the CLI under test.
CLEAN_ENV: dict[str, str | None] = {"ROOST_TOKEN": None, "ROOST_CONFIG": None, "ROOST_URL": None}


def invoke(args: Sequence[str], stdin: str | None = None, **env: str | None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, env={**CLEAN_ENV, **env})


class Daemon:
    def __init__(self, url: str, runtime: FakeRuntime, engine: Engine) -> None:
        self.url = url
        self.runtime = runtime
        self.engine = engine

    async def cli(self, *args: str, token: str | None = None, stdin: str | None = None) -> Result:
        """Run the CLI in a thread: it blocks on HTTP that this loop must answer."""
        env = {"ROOST_TOKEN": token} if token else {}
        return await asyncio.to_thread(invoke, ["--url", self.url, *args], stdin, **env)


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path, *, token: str | None = None, agents: Sequence[str] = ("echo",)
) -> AsyncIterator[Daemon]:
    """A daemon on a FakeRuntime engine with ``agents`` (all on ``IMAGE``), behind
    ``token`` when given."""
    server: dict[str, object] = {}
    if token is not None:
        (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
        server["token_file"] = str(tmp_path / "token")
    settings = make_settings(
        tmp_path, "cli-test", agents={name: {"image": IMAGE} for name in agents}, server=server
    )
    runtime = FakeRuntime(images=[IMAGE])
    engine = Engine(settings, runtime=runtime, agent_client=FakeAgentClient(runtime))
    async with roost_daemon(settings, engine=engine) as (url, _):
        yield Daemon(url, runtime, engine)
