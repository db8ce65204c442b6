"""The ``roost-mimic`` test agent image, driven through the docker CLI.

Every other Docker test provokes lifecycle paths through this image, so these
tests pin each behaviour it promises (see images/mimic/mimic.py): echo and
message-id bookkeeping, slow start, exit codes, unhealthy, hang, OOM, SIGTERM,
streaming. Each test labels its containers ``roost.test=<random>`` and removes
exactly those; nothing here sleeps to wait, it polls with a deadline or blocks
on ``docker wait``.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.docker

REPO_ROOT = Path(__file__).resolve().parents[2]
MIMIC_IMAGE = "roost-mimic:latest"
TEST_LABEL = "roost.test"
AGENT_PORT = 8000
HEALTHY_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
REQUEST_TIMEOUT = 5.0
HUNG_REQUEST_TIMEOUT = 0.5
MEMORY_LIMIT_ARGS = ("--memory", "64m", "--memory-swap", "64m")


@dataclass(frozen=True)
class MimicContainer:
    container_id: str
    base_url: str


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any


def _docker(*args: str, timeout: float = 60.0) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _request(
    method: str,
    url: str,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Reply:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, json.loads(response.read() or b"null"))
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, json.loads(error.read() or b"null"))


def _poll_status(url: str, accept: Callable[[int], bool], *, timeout: float) -> list[int]:
    """GET url until accept(status) holds; return every status seen, in order.

    Connection errors count as "not answering yet": Docker's port proxy accepts
    TCP before the app listens, so early requests can be reset.
    """
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = _request("GET", url, timeout=1.0).status
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = None
        if status is not None:
            seen.append(status)
            if accept(status):
                return seen
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"{url}: no accepted status within {timeout} s; saw {seen}")


def _wait_healthy(container: MimicContainer) -> None:
    _poll_status(f"{container.base_url}/health", lambda status: status == 200, timeout=10.0)


def _wait_exit_code(container: MimicContainer) -> int:
    return int(_docker("wait", container.container_id, timeout=EXIT_TIMEOUT))


def _state(container: MimicContainer) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        _docker("inspect", "--format", "{{json .State}}", container.container_id)
    )
    return state


def _is_timeout(error: BaseException) -> bool:
    if isinstance(error, urllib.error.URLError):
        return isinstance(error.reason, TimeoutError)
    return isinstance(error, TimeoutError)


@pytest.fixture(scope="module")
def mimic_image() -> str:
    """Build the image if its inputs changed (cached: a fraction of a second otherwise)."""
    subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-images"), MIMIC_IMAGE],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return MIMIC_IMAGE


RunMimic = Callable[..., MimicContainer]


@pytest.fixture
def run_mimic(mimic_image: str) -> Iterator[RunMimic]:
    label = f"{TEST_LABEL}=mimic-{uuid.uuid4().hex[:12]}"

    def run(
        env: Mapping[str, str] | None = None,
        docker_args: tuple[str, ...] = (),
        *,
        port: int = AGENT_PORT,
    ) -> MimicContainer:
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        container_id = _docker(
            "run",
            "--detach",
            "--label",
            label,
            "--publish",
            f"127.0.0.1::{port}",
            *env_args,
            *docker_args,
            mimic_image,
        )
        host_port = _docker("port", container_id, f"{port}/tcp").splitlines()[0]
        return MimicContainer(container_id, f"http://127.0.0.1:{host_port.rsplit(':', 1)[1]}")

    yield run
    leftovers = _docker("ps", "--all", "--quiet", "--filter", f"label={label}").split()
    if leftovers:
        _docker("rm", "--force", "--volumes", *leftovers)


def test_echo_replies_with_body_agent_and_id_count_when_messages_posted(
    run_mimic: RunMimic,
) -> None:
    container = run_mimic({"ROOST_AGENT": "echo-agent"})
    _wait_healthy(container)
    url = f"{container.base_url}/messages"

    replies = [
        _request("POST", url, {"text": text}, headers={"Roost-Message-Id": message_id})
        for text, message_id in (("one", "m1"), ("two", "m2"), ("one again", "m1"))
    ]
    anonymous = _request("POST", url, [1, 2, 3])
    seen = _request("GET", f"{container.base_url}/seen")

    assert [reply.status for reply in replies] == [200, 200, 200]
    assert replies[0].body == {
        "echo": {"text": "one"},
        "agent": "echo-agent",
        "message_id": "m1",
        "count": 1,
    }
    assert [reply.body["count"] for reply in replies] == [1, 2, 2]
    assert anonymous.body == {
        "echo": [1, 2, 3],
        "agent": "echo-agent",
        "message_id": None,
        "count": 2,
    }
    assert seen.body == {"ids": ["m1", "m2", "m1"], "distinct": 2, "max_in_flight": 1}


def test_health_answers_503_then_200_when_startup_delay_set(run_mimic: RunMimic) -> None:
    container = run_mimic({"STARTUP_DELAY": "1.5"})

    statuses = _poll_status(
        f"{container.base_url}/health", lambda status: status != 503, timeout=HEALTHY_TIMEOUT
    )
    assert statuses[0] == 503
    assert statuses[-1] == 200
    assert set(statuses) == {503, 200}


def test_message_answers_503_when_agent_still_starting(run_mimic: RunMimic) -> None:
    container = run_mimic({"STARTUP_DELAY": "30"})
    _poll_status(f"{container.base_url}/health", lambda status: status == 503, timeout=10.0)

    reply = _request("POST", f"{container.base_url}/messages", {"text": "early"})

    assert reply.status == 503
    seen = _request("GET", f"{container.base_url}/seen").body
    assert seen == {"ids": [], "distinct": 0, "max_in_flight": 1}  # the 503 itself


def test_container_exits_with_requested_code_when_exit_message_sent(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)

    reply = _request("POST", f"{container.base_url}/messages", {"cmd": "exit", "code": 7})

    assert reply == Reply(200, {"exiting": 7})
    assert _wait_exit_code(container) == 7


def test_container_exits_with_code_when_exit_after_elapsed(run_mimic: RunMimic) -> None:
    container = run_mimic({"EXIT_AFTER": "0.3", "EXIT_CODE": "3"})

    assert _wait_exit_code(container) == 3
    assert "exiting with code 3" in _docker("logs", container.container_id)


def test_every_message_exits_when_mode_is_exit(run_mimic: RunMimic) -> None:
    container = run_mimic({"MODE": "exit", "EXIT_CODE": "5"})
    _wait_healthy(container)

    reply = _request("POST", f"{container.base_url}/messages", {"text": "bye"})

    assert reply == Reply(200, {"exiting": 5})
    assert _wait_exit_code(container) == 5


def test_health_answers_500_when_unhealthy_message_sent(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)

    reply = _request("POST", f"{container.base_url}/messages", {"cmd": "unhealthy"})

    assert reply == Reply(200, {"unhealthy": True})
    assert _request("GET", f"{container.base_url}/health") == Reply(500, {"ok": False})
    assert _state(container)["Running"] is True


def test_health_turns_500_when_unhealthy_after_elapsed(run_mimic: RunMimic) -> None:
    container = run_mimic({"UNHEALTHY_AFTER": "0.5"})

    statuses = _poll_status(
        f"{container.base_url}/health", lambda status: status == 500, timeout=HEALTHY_TIMEOUT
    )

    assert statuses[-1] == 500


def test_container_is_oom_killed_when_oom_message_sent(run_mimic: RunMimic) -> None:
    container = run_mimic(None, MEMORY_LIMIT_ARGS)
    _wait_healthy(container)

    reply = _request("POST", f"{container.base_url}/messages", {"cmd": "oom"})

    assert reply == Reply(200, {"oom": True})
    assert _wait_exit_code(container) == 137
    assert _state(container)["OOMKilled"] is True


def test_container_is_oom_killed_when_oom_env_set(run_mimic: RunMimic) -> None:
    container = run_mimic({"OOM": "1"}, MEMORY_LIMIT_ARGS)

    assert _wait_exit_code(container) == 137
    assert _state(container)["OOMKilled"] is True


def test_health_times_out_when_hang_message_sent(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)

    reply = _request("POST", f"{container.base_url}/messages", {"cmd": "hang"})
    with pytest.raises((urllib.error.URLError, TimeoutError)) as raised:
        _request("GET", f"{container.base_url}/health", timeout=HUNG_REQUEST_TIMEOUT)

    assert reply == Reply(200, {"hanging": True})
    assert _is_timeout(raised.value), raised.value
    assert _state(container)["Running"] is True


def test_stop_exits_zero_when_sigterm_received(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)
    _request("POST", f"{container.base_url}/messages", {"cmd": "hang"})

    # With a 30 s grace period, exit code 0 (not 137) proves SIGTERM was handled
    # even by a hung agent: a SIGKILL after the grace period would give 137.
    _docker("stop", "--time", "30", container.container_id)

    assert _state(container)["ExitCode"] == 0
    assert "received signal 15" in _docker("logs", container.container_id)


def test_stop_kills_when_sigterm_ignored(run_mimic: RunMimic) -> None:
    container = run_mimic({"IGNORE_SIGTERM": "1"})
    _wait_healthy(container)

    _docker("stop", "--time", "1", container.container_id)

    assert _state(container)["ExitCode"] == 137


def test_stream_sends_chunks_when_stream_requested(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)

    url = f"{container.base_url}/stream?n=3&interval=0.05"
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as response:
        transfer_encoding = response.headers["Transfer-Encoding"]
        lines = [json.loads(line) for line in response.read().splitlines()]

    assert transfer_encoding == "chunked"
    assert lines == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]


def test_env_and_sleep_endpoints_answer_when_requested(run_mimic: RunMimic) -> None:
    container = run_mimic({"ROOST_AGENT": "env-agent", "ROOST_AGENT_ID": "id-42"})
    _wait_healthy(container)

    environment = _request("GET", f"{container.base_url}/env").body
    slept = _request("POST", f"{container.base_url}/sleep?seconds=0.1")

    assert environment["ROOST_AGENT"] == "env-agent"
    assert environment["ROOST_AGENT_ID"] == "id-42"
    assert slept == Reply(200, {"slept": 0.1})


def test_message_fails_with_requested_status_when_fail_cmd_sent(run_mimic: RunMimic) -> None:
    container = run_mimic()
    _wait_healthy(container)
    url = f"{container.base_url}/messages"

    failed = _request(
        "POST", url, {"cmd": "fail", "status": 502}, headers={"Roost-Message-Id": "f1"}
    )
    unknown = _request("POST", url, {"cmd": "dance"})

    assert failed.status == 502
    assert failed.body["message_id"] == "f1"
    assert unknown.status == 400


def test_custom_port_and_paths_are_served_when_configured(run_mimic: RunMimic) -> None:
    container = run_mimic(
        {"PORT": "9000", "HEALTH_PATH": "/ready", "MESSAGE_PATH": "/inbox"}, port=9000
    )
    _poll_status(f"{container.base_url}/ready", lambda status: status == 200, timeout=10.0)

    reply = _request("POST", f"{container.base_url}/inbox", {"text": "hi"})
    default_path = _request("POST", f"{container.base_url}/messages", {"text": "hi"})

    assert reply.body["echo"] == {"text": "hi"}
    assert default_path.status == 404
