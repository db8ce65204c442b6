"""The ``roost`` CLI and ``serving.serve``: config errors, help, and verbs against a
real uvicorn daemon served in-process on a FakeRuntime engine."""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost import serving
from roost.adapters.state_lock import StateDirLock
from roost.cli.daemon import check_neighbour_table
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import free_port, make_settings
from tests.unit.cli_support import Daemon, invoke, running_daemon

VERBS = [
    "up",
    "ps",
    "start",
    "stop",
    "pause",
    "wake",
    "restart",
    "reset",
    "logs",
    "inspect",
    "doctor",
]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "roost.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize("verb", VERBS)
def test_help_describes_verb_when_asked(verb: str) -> None:
    result = invoke([verb, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: roost {verb}" in result.output


def test_help_lists_every_verb_when_run_without_arguments() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


@pytest.mark.parametrize("verb", ["up", "doctor"])
def test_config_error_exits_2_naming_the_key_when_key_unknown(tmp_path: Path, verb: str) -> None:
    config = write_config(tmp_path, '[server]\nstate_dir = "state"\nlisten_typo = "x"\n')
    result = invoke(["--config", str(config), verb])
    assert result.exit_code == 2, result.output
    assert "server.listen_typo" in result.stderr
    assert "unknown key" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing started


def test_ps_exits_2_naming_listen_when_the_address_it_needs_is_invalid(tmp_path: Path) -> None:
    # ps reads only what it needs to reach the daemon (listen, token_file): a typo
    # elsewhere is for `roost up` and `roost doctor` to report, not a reason to refuse.
    config = write_config(tmp_path, '[server]\nlisten = "nowhere"\n[defaults]\ntypo = 1\n')
    result = invoke(["--config", str(config), "ps"])
    assert result.exit_code == 2, result.output
    assert "server.listen" in result.stderr
    assert "typo" not in result.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[defaults]\nidle_timeout = -5\n", "defaults.idle_timeout"),
        ('[agents.echo]\nimage = "x"\nmemory = "12zb"\n', "agents.echo.memory"),
        ('[agents.Not_A_Label]\nimage = "x"\n', "agents.Not_A_Label"),
    ],
)
def test_up_exits_2_naming_key_and_file_when_config_is_bad_and_given_after_the_verb(
    tmp_path: Path, text: str, key: str
) -> None:
    config = write_config(tmp_path, '[server]\nstate_dir = "state"\n' + text)
    result = invoke(["up", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert key in result.stderr
    assert str(config) in result.stderr
    assert not (tmp_path / "state").exists()  # nothing started


def test_up_exits_2_naming_token_file_when_listen_is_public_without_token(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, '[server]\nlisten = "0.0.0.0:7999"\nstate_dir = "state"\n')
    result = invoke(["--config", str(config), "up"])
    assert result.exit_code == 2
    assert "server.token_file" in result.stderr
    assert not (tmp_path / "state").exists()


def test_config_error_exits_2_when_config_file_missing(tmp_path: Path) -> None:
    result = invoke(["--config", str(tmp_path / "nope.toml"), "ps"])
    assert result.exit_code == 2
    assert "nope.toml" in result.stderr


def test_ps_exits_1_saying_how_to_start_when_no_daemon_answers(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(["--url", url, "ps"])
    assert result.exit_code == 1
    assert f"no Roost answers at {url}" in result.stderr
    assert "roost up" in result.stderr


def test_default_url_comes_from_listen_when_no_url_given(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\n')
    result = invoke(["--config", str(config), "ps"])
    assert result.exit_code == 1
    assert f"no Roost answers at http://127.0.0.1:{port}" in result.stderr


async def test_serve_refuses_with_exit_2_naming_keys_when_public_listen_has_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, "cli-test", server={"listen": f"0.0.0.0:{free_port()}"})
    assert await serving.serve(settings, handle_signals=False) == 2
    err = capsys.readouterr().err
    assert "server.listen" in err
    assert "server.token_file" in err
    assert not settings.state_path().exists()


async def test_serve_exits_1_when_port_already_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(tmp_path, "cli-test", server={"listen": f"127.0.0.1:{port}"})
        assert await serving.serve(settings, handle_signals=False) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not settings.state_path().exists()


async def test_serve_exits_1_when_another_roost_holds_the_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, "cli-test", server={"listen": f"127.0.0.1:{free_port()}"})
    with StateDirLock(settings.state_path()):
        assert await serving.serve(settings, handle_signals=False) == 1
    assert str(settings.state_path()) in capsys.readouterr().err


async def test_serve_exits_1_saying_what_to_do_when_docker_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        tmp_path,
        "cli-test",
        server={"listen": f"127.0.0.1:{free_port()}"},
        docker={"host": f"unix://{tmp_path / 'no-docker.sock'}"},
    )
    assert await serving.serve(settings, handle_signals=False) == 1
    err = capsys.readouterr().err
    assert "no-docker.sock" in err
    assert "start dockerd" in err


# --------------------------------------------------------------------------- daemon


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path) as running:
        yield running


async def test_ps_json_prints_the_agents_when_daemon_runs(daemon: Daemon) -> None:
    result = await daemon.cli("ps", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["name"] for a in data["agents"]] == ["echo"]
    assert data["agents"][0]["state"] == "created"


async def test_start_ps_logs_stop_drive_the_agent_when_daemon_runs(daemon: Daemon) -> None:
    started = await daemon.cli("start", "echo", "--json")
    assert started.exit_code == 0, started.output
    agent = json.loads(started.stdout)
    assert agent["state"] == "running"
    cid = agent["container_id"]

    table = await daemon.cli("ps")
    assert table.exit_code == 0
    header, row = table.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "STATE",
        "AGE",
        "CONTAINER",
        "RESTARTS",
        "URL",
        "EVENTS",
        "LAST-EXIT",
    ]
    name, state, age, *rest = row.split()
    assert [name, state, *rest] == ["echo", "running", cid[:12], "0", agent["url"], "echo.*", "-"]
    assert re.fullmatch(r"\d+s", age), age
    assert "\x1b[" not in table.stdout  # not a terminal: no colour

    daemon.runtime.log_lines[cid] = ["hello", "world"]
    logs = await daemon.cli("logs", "echo", "--tail", "1")
    assert logs.exit_code == 0
    assert logs.stdout == "world\n"

    stopped = await daemon.cli("stop", "echo")
    assert stopped.exit_code == 0
    assert stopped.stdout.strip() == "echo: stopped"


async def test_action_exits_1_with_the_daemons_message_when_refused(daemon: Daemon) -> None:
    paused = await daemon.cli("pause", "echo")
    assert paused.exit_code == 1
    assert "only a running agent can be paused" in paused.stderr
    unknown = await daemon.cli("stop", "nobody")
    assert unknown.exit_code == 1
    assert "no agent named 'nobody'" in unknown.stderr


async def test_route_prints_agent_and_id_and_exits_1_when_no_agent_handles_type(
    daemon: Daemon,
) -> None:
    routed = await daemon.cli("route", "echo.ping", '{"n": 1}')
    assert routed.exit_code == 0, routed.output
    agent, message_id = routed.stdout.split()
    assert agent == "echo"
    shown = await daemon.cli("messages", "show", "echo", message_id, "--json")
    assert json.loads(shown.stdout)["event_type"] == "echo.ping"

    fanned = await daemon.cli("route", "echo.ping", "hi", "--all", "--json")
    assert [copy["agent"] for copy in json.loads(fanned.stdout)] == ["echo"]

    nobody = await daemon.cli("route", "deploy.done", "{}")
    assert nobody.exit_code == 1
    assert "no agent handles event type 'deploy.done'" in nobody.stderr


async def test_shutdown_stops_managed_containers_when_daemon_exits(tmp_path: Path) -> None:
    runtime: FakeRuntime | None = None
    cid = ""
    async with running_daemon(tmp_path) as running:
        runtime = running.runtime
        result = await running.cli("start", "echo", "--json")
        cid = json.loads(result.stdout)["container_id"]
        assert (await runtime.inspect(cid)).running
    assert runtime is not None
    assert ("stop", cid) in runtime.calls


async def test_cli_sends_token_and_explains_401_when_daemon_needs_token(tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    async with running_daemon(tmp_path, token=token) as running:
        refused = await running.cli("ps")
        assert refused.exit_code == 1
        assert "ROOST_TOKEN" in refused.stderr
        accepted = await running.cli("ps", "--json", token=token)
        assert accepted.exit_code == 0, accepted.output
        assert json.loads(accepted.stdout)["agents"][0]["name"] == "echo"


# --------------------------------------------------------------------------- doctor


@pytest.mark.docker
def test_doctor_fails_naming_the_fix_when_agent_image_absent(tmp_path: Path) -> None:
    image = f"roost-absent-{secrets.token_hex(4)}:1"
    config = write_config(
        tmp_path,
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "state"\n'
        f'[agents.ghost]\nimage = "{image}"\n',
    )
    result = invoke(["--config", str(config), "doctor", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert checks["config"]["status"] == "ok"
    assert checks["docker"]["status"] == "ok"
    assert checks["docker"]["detail"].startswith("Docker answers, API version 1.")
    assert checks[f"image {image}"]["status"] == "fail"
    assert "scripts/build-images" in checks[f"image {image}"]["fix"]
    assert checks["state dir"]["status"] == "ok"
    assert checks["daemon"]["status"] == "warn"
    assert checks["daemon"]["required"] is False


@pytest.mark.docker
def test_doctor_fails_naming_the_fix_when_the_swarm_backend_has_no_manager(
    tmp_path: Path,
) -> None:
    # The shared engine is no swarm manager: backend = "swarm" cannot work there.
    config = write_config(
        tmp_path,
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "state"\n'
        '[docker]\nbackend = "swarm"\n[agents.a]\nimage = "anywhere:1"\n',
    )
    result = invoke(["--config", str(config), "doctor", "--json"])
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["docker"]["status"] == "ok"
    assert checks["swarm"]["status"] == "fail"
    assert "is not a swarm manager" in checks["swarm"]["detail"]
    assert "docker.host" in checks["swarm"]["fix"]
    assert checks["images"]["status"] == "skip"


def test_doctor_names_the_agents_the_neighbour_table_has_room_for() -> None:
    # Debian's default: ~512 containers the host talks to, then none answers.
    small = check_neighbour_table(1024)
    assert small.status == "warn"
    assert small.required is False
    assert "about 512 agents" in small.detail
    assert "gc_thresh3" in small.fix
    roomy = check_neighbour_table(8192)
    assert (roomy.status, roomy.fix) == ("ok", "")
    assert "about 4096 agents" in roomy.detail
    assert check_neighbour_table(None).status == "skip"


@pytest.mark.docker
def test_doctor_passes_when_nothing_is_missing(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, f'[server]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "state"\n'
    )
    result = invoke(["--config", str(config), "doctor"])
    assert result.exit_code == 0, result.output
    assert "ok      docker: Docker answers" in result.stdout
    assert "fix: start it with `roost up`" in result.stdout
