"""The CLI's habits (docker compose / kubectl style) against a real daemon served
in-process on a FakeRuntime engine: ps NAME/-q/--filter, several names or --all
for actions, restart waiting for health, messages ls/show, send from stdin or a
file with an idempotency key, jobs run IMAGE -- CMD, "did you mean", shell
completion, and events -f read by httpx-sse."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost.cli import client
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import wait_until
from tests.unit.cli_support import IMAGE, Daemon, invoke, running_daemon


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon with three agents: coder, echo, echo2."""
    async with running_daemon(tmp_path, agents=("coder", "echo", "echo2")) as running:
        yield running


# --------------------------------------------------------------------------- ps


async def test_ps_shows_only_the_named_agents_in_the_order_given(fleet: Daemon) -> None:
    table = await fleet.cli("ps", "echo2", "coder")
    assert table.exit_code == 0, table.output
    names = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    assert names == ["echo2", "coder"]


async def test_ps_exits_1_suggesting_names_when_a_name_is_unknown(fleet: Daemon) -> None:
    result = await fleet.cli("ps", "echo", "ecoh")
    assert result.exit_code == 1
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["echo"]
    assert "no agent named 'ecoh'; did you mean 'echo' or 'echo2'?" in result.stderr


async def test_ps_quiet_prints_names_and_filter_narrows_by_state(fleet: Daemon) -> None:
    assert (await fleet.cli("start", "echo")).exit_code == 0
    every = await fleet.cli("ps", "-q")
    assert every.stdout.split() == ["coder", "echo", "echo2"]
    running = await fleet.cli("ps", "-q", "--filter", "state=running")
    assert running.stdout.split() == ["echo"]
    either = await fleet.cli("ps", "-q", "--filter", "state=running", "--filter", "state=created")
    assert either.stdout.split() == ["coder", "echo", "echo2"]
    both = await fleet.cli("ps", "--json", "--filter", "state=created", "--filter", "name=echo")
    assert [a["name"] for a in json.loads(both.stdout)["agents"]] == ["echo2"]


@pytest.mark.parametrize(
    ("value", "named"),
    [("colour=red", "unknown key 'colour'"), ("state=asleep", "unknown state 'asleep'"),
     ("state", "expected KEY=VALUE")],
)  # fmt: skip
def test_ps_filter_is_a_usage_error_naming_the_option_when_malformed(
    value: str, named: str
) -> None:
    result = invoke(["--url", "http://127.0.0.1:9", "ps", "--filter", value])
    assert result.exit_code == 2
    assert "--filter" in result.stderr
    assert named in result.stderr


def test_ps_quiet_and_json_together_are_a_usage_error() -> None:
    result = invoke(["--url", "http://127.0.0.1:9", "ps", "-q", "--json"])
    assert result.exit_code == 2
    assert "--quiet or --json" in result.stderr


# --------------------------------------------------------------------------- actions


async def test_start_all_starts_every_agent_and_prints_one_line_each(fleet: Daemon) -> None:
    result = await fleet.cli("start", "--all")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["coder", "echo", "echo2"]
    assert all(": running" in line for line in lines)
    states = {r.name: r.state.value for r in fleet.engine.supervisor.records()}
    assert states == {"coder": "running", "echo": "running", "echo2": "running"}


async def test_stop_several_reports_each_failure_and_exits_1_when_one_fails(
    fleet: Daemon,
) -> None:
    await fleet.cli("start", "echo", "echo2")
    result = await fleet.cli("stop", "echo2", "nobody", "echo", "--json")
    assert result.exit_code == 1
    stopped = json.loads(result.stdout)["agents"]
    assert [(a["name"], a["state"]) for a in stopped] == [("echo2", "stopped"), ("echo", "stopped")]
    assert "roost: nobody: no agent named 'nobody'" in result.stderr


async def test_pause_all_with_filter_acts_only_on_matching_agents(fleet: Daemon) -> None:
    await fleet.cli("start", "coder", "echo")
    result = await fleet.cli("pause", "--all", "--filter", "state=running", "--filter", "name=e")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["coder: paused", "echo: paused"]
    assert fleet.engine.supervisor.get("echo2").state.value == "created"


@pytest.mark.parametrize(
    ("args", "says"),
    [(["stop"], "missing agent NAME"), (["stop", "echo", "--all"], "NAMEs or --all")],
)
def test_action_is_a_usage_error_when_targets_are_missing_or_doubled(
    args: list[str], says: str
) -> None:
    result = invoke(["--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2
    assert says in result.stderr


async def test_action_suggests_the_nearest_agent_when_the_name_is_unknown(fleet: Daemon) -> None:
    result = await fleet.cli("stop", "codr")
    assert result.exit_code == 1
    assert result.stderr.strip() == "roost: no agent named 'codr'; did you mean 'coder'?"


async def test_restart_waits_until_the_new_container_is_healthy(fleet: Daemon) -> None:
    first = json.loads((await fleet.cli("start", "echo", "--json")).stdout)
    restarted = await fleet.cli("restart", "echo", "--json")
    assert restarted.exit_code == 0, restarted.output
    agent = json.loads(restarted.stdout)
    assert agent["state"] == "running"
    assert agent["url"]
    assert agent["container_id"] not in (None, first["container_id"])


async def test_restart_no_wait_only_requests_it(fleet: Daemon) -> None:
    await fleet.cli("start", "echo")
    result = await fleet.cli("restart", "echo", "--no-wait")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "echo: starting  (requested; not waiting)"


# --------------------------------------------------------------------------- messages


async def test_send_reads_the_message_from_stdin_and_from_a_file(
    fleet: Daemon, tmp_path: Path
) -> None:
    piped = await fleet.cli("send", "echo", "-", stdin='{"from": "stdin"}\n')
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["echo"] == {"from": "stdin"}
    note = tmp_path / "note.txt"
    note.write_text("hello from a file\n", encoding="utf-8")
    filed = await fleet.cli("send", "echo", f"@{note}")
    assert filed.exit_code == 0, filed.output
    assert json.loads(filed.stdout)["echo"] == {"text": "hello from a file"}


def test_send_is_a_usage_error_naming_the_file_when_it_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    result = invoke(["--url", "http://127.0.0.1:9", "send", "echo", f"@{missing}"])
    assert result.exit_code == 2
    assert str(missing) in result.stderr


async def test_send_always_sends_a_fresh_idempotency_key(fleet: Daemon) -> None:
    ids = []
    for _ in range(2):
        sent = await fleet.cli("send", "echo", "same text", "--no-wait")
        assert sent.exit_code == 0, sent.output
        ids.append(sent.stdout.strip())
    assert ids[0] != ids[1]
    keys = [
        json.loads((await fleet.cli("messages", "show", "echo", i, "--json")).stdout)[
            "idempotency_key"
        ]
        for i in ids
    ]
    assert all(uuid.UUID(key) for key in keys)
    assert keys[0] != keys[1]


async def test_send_prints_the_key_to_retry_with_when_the_connection_keeps_dropping() -> None:
    seen: list[bytes] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))  # the request head, then hang up
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        result = await asyncio.to_thread(
            invoke, ["--url", url, "send", "echo", "hi", "--idempotency-key", "k-42"]
        )
    assert result.exit_code == 1
    assert "--idempotency-key k-42" in result.stderr
    assert len(seen) == 3  # sent, then sent again twice with the same key
    assert all(b"\r\nidempotency-key: k-42\r\n" in head.lower() for head in seen)


async def test_messages_ls_and_show_describe_an_agents_messages(fleet: Daemon) -> None:
    sent = await fleet.cli("send", "echo", '{"n": 1}', "--json")
    message_id = json.loads(sent.stdout)["id"]
    listed = await fleet.cli("messages", "ls", "echo")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "ATTEMPTS", "AGE", "ERROR"]
    assert row.split()[:3] == [message_id, "delivered", "1"]
    shown = await fleet.cli("messages", "show", "echo", message_id)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith(f"message {message_id}: delivered\n")
    assert '"n": 1' in shown.stdout
    unknown = await fleet.cli("messages", "ls", "ehco")
    assert unknown.exit_code == 1
    assert "did you mean 'echo'" in unknown.stderr


# --------------------------------------------------------------------------- jobs


async def _job_container(runtime: FakeRuntime) -> str:
    found: list[str] = []

    async def started() -> bool:
        found[:] = [c.id for c in await runtime.list({}) if "roost.job" in c.labels]
        return bool(found) and (await runtime.inspect(found[0])).running

    await wait_until(started, timeout=10, what="the job's container to run")
    return found[0]


async def test_jobs_run_passes_the_command_after_dashes_and_exits_with_its_code(
    daemon: Daemon,
) -> None:
    running = asyncio.create_task(
        daemon.cli("jobs", "run", "--wait", IMAGE, "--", "sh", "-c", "exit 3")
    )
    cid = await _job_container(daemon.runtime)
    assert daemon.runtime.container_spec(cid).command == ("sh", "-c", "exit 3")
    daemon.runtime.write_log(cid, "working on it")  # streamed while the job runs
    daemon.runtime.crash(cid, exit_code=3)
    result = await running
    assert result.exit_code == 3, result.output
    assert "working on it" in result.stdout
    assert result.stdout.index("working on it") < result.stdout.index("exit code:  3")
    assert "job " in result.stdout


async def test_jobs_run_wait_exits_0_when_the_job_succeeds(daemon: Daemon) -> None:
    running = asyncio.create_task(daemon.cli("jobs", "run", "--wait", "--json", IMAGE, "true"))
    cid = await _job_container(daemon.runtime)
    assert daemon.runtime.container_spec(cid).command == ("true",)
    daemon.runtime.crash(cid, exit_code=0)
    result = await running
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "succeeded"


# --------------------------------------------------------------------------- completion


async def test_completion_offers_the_daemons_agent_names(fleet: Daemon) -> None:
    def complete(words: str) -> list[str]:
        result = invoke(
            [],
            _ROOST_COMPLETE="bash_complete",
            COMP_WORDS=f"roost --url {fleet.url} {words}",
            COMP_CWORD=str(len(words.split()) + 3 - (0 if words.endswith(" ") else 1)),
        )
        assert result.exit_code == 0, result.output
        return [line.split(",", 1)[1] for line in result.stdout.splitlines()]

    assert await asyncio.to_thread(complete, "start ec") == ["echo", "echo2"]
    assert await asyncio.to_thread(complete, "stop echo ") == ["coder", "echo2"]
    assert await asyncio.to_thread(complete, "send c") == ["coder"]


def test_completion_offers_nothing_when_no_daemon_answers() -> None:
    result = invoke(
        [],
        _ROOST_COMPLETE="bash_complete",
        COMP_WORDS="roost --url http://127.0.0.1:9 start e",
        COMP_CWORD="4",
    )
    assert result.exit_code == 0
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------- events


async def test_event_stream_resumes_after_the_last_event_id(fleet: Daemon) -> None:
    def newest_id() -> int:
        with client.ApiClient(fleet.url, None) as api:
            events = api.json("GET", "/api/events", params={"recent": "1"})["events"]
        return int(events[-1]["id"]) if events else 0

    before = await asyncio.to_thread(newest_id)
    await fleet.cli("send", "echo", "hi")

    def read_until_delivered(after: int) -> list[int | None]:
        ids = []
        with client.ApiClient(fleet.url, None) as api:
            for event_id, event in api.event_stream(after):
                assert event["id"] == event_id
                ids.append(event_id)
                if event.get("kind") == "message.status" and event.get("status") == "delivered":
                    return ids
        raise AssertionError("the stream ended before the delivery")

    ids = await asyncio.wait_for(asyncio.to_thread(read_until_delivered, before), timeout=20)
    assert len(ids) > 1
    numbers = [i for i in ids if isinstance(i, int) and i > before]
    assert numbers == ids
    assert numbers == sorted(set(numbers))
    first = ids[0]
    assert isinstance(first, int)
    again = await asyncio.wait_for(asyncio.to_thread(read_until_delivered, first), timeout=20)
    assert again == ids[1:]


async def test_events_follow_prints_live_events_and_exits_0_on_ctrl_c(
    fleet: Daemon, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ROOST_TOKEN", "ROOST_CONFIG")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roost.cli", "--url", fleet.url, "events", "-f", "--json", "-n", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        await wait_until(
            lambda: fleet.engine.events.subscribers > 0, timeout=20, what="the CLI to follow"
        )
        await fleet.cli("start", "echo", "--no-wait")
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        event = json.loads(line)
        assert event["kind"] == "agent.state"
        assert event["agent"] == "echo"
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), timeout=20)
    assert code == 0


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path) as running:
        yield running
