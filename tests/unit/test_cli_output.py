"""The CLI's output and client modules on their own: tables (plain and coloured),
ages, spinners, progress bars, "did you mean", retries with one idempotency key,
and start-up imports."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from roost.cli import client, output


class Terminal(io.StringIO):
    """A text stream that says it is a terminal; safe to write from two threads."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            return super().write(text)


def poll(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def no_colour_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (59, "59s"),
        (60, "1m"),
        (200, "3m20s"),
        (600, "10m"),
        (3599, "59m"),
        (3600, "1h"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (12 * 86400, "12d"),
    ],
)
def test_age_reads_like_kubectl_when_time_has_passed(seconds: int, shown: str) -> None:
    now = 1_800_000_000.0
    assert output.age(now - seconds, now) == shown


@pytest.mark.parametrize("since", [None, 0, 0.0, "x", True])
def test_age_is_a_dash_when_unknown(since: object) -> None:
    assert output.age(since, 1_800_000_000.0) == "-"


def test_age_is_zero_when_the_clock_is_behind() -> None:
    assert output.age(1_800_000_010.0, 1_800_000_000.0) == "0s"


def test_table_is_plain_columns_when_colour_is_off() -> None:
    stream = io.StringIO()
    output.print_table(
        ["NAME", "STATE"], [["echo", "running"], ["b", "failed"]], file=stream, colour=False
    )
    assert stream.getvalue() == "NAME  STATE\necho  running\nb     failed\n"


def test_table_has_colours_and_the_same_words_when_colour_is_on() -> None:
    stream = io.StringIO()
    rows = [["echo", "running", "http://[::1]:8000"], ["b", "failed", "-"]]
    output.print_table(
        ["NAME", "STATE", "URL"], rows, status_columns=("STATE",), file=stream, colour=True
    )
    text = stream.getvalue()
    assert "\x1b[32mrunning" in text  # green
    assert "\x1b[1;31mfailed" in text  # bold red
    assert "[::1]" in text  # cells are text, never Rich markup
    plain = [line.split() for line in _strip_ansi(text).splitlines()]
    assert plain == [["NAME", "STATE", "URL"], *[row for row in rows]]


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_colour_is_wanted_only_on_a_terminal_without_no_color(
    monkeypatch: pytest.MonkeyPatch, no_colour_env: None
) -> None:
    assert output.colour_wanted(Terminal())
    assert not output.colour_wanted(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not output.colour_wanted(Terminal())
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert output.colour_wanted(Terminal())
    monkeypatch.setenv("TERM", "dumb")
    assert not output.colour_wanted(Terminal())


# --------------------------------------------------------------------------- waits


def test_spinner_shows_on_stderr_when_a_wait_lasts(
    monkeypatch: pytest.MonkeyPatch, no_colour_env: None
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with output.waiting("starting echo", delay=0):
        poll(lambda: "starting echo" in terminal.getvalue(), what="the spinner")


def test_spinner_never_shows_when_the_wait_ends_before_the_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    before = set(threading.enumerate())
    with output.waiting("quick", delay=60):
        pass
    # Only threads this block started count (other tests' threads may still be ending).
    poll(lambda: not set(threading.enumerate()) - before, what="the spinner's timer to end")
    assert terminal.getvalue() == ""


def test_spinner_and_progress_stay_silent_when_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with output.waiting("x", delay=0), output.progress(5, "stop 5 agents") as advance:
        advance()
    assert plain.getvalue() == ""


def test_progress_bar_counts_steps_when_stderr_is_a_terminal(
    monkeypatch: pytest.MonkeyPatch, no_colour_env: None
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with output.progress(3, "stop 3 agents") as advance:
        for _ in range(3):
            advance()
        poll(lambda: "3/3" in terminal.getvalue(), what="the bar to show 3/3")
    assert "stop 3 agents" in terminal.getvalue()


# --------------------------------------------------------------------------- client


@pytest.mark.parametrize(
    ("name", "known", "suffix"),
    [
        ("ecoh", ["echo", "coder"], "; did you mean 'echo'?"),
        ("coder2", ["coder1", "coder3", "echo"], "; did you mean 'coder1' or 'coder3'?"),
        ("zzz", ["echo"], ""),
    ],
)
def test_did_you_mean_names_the_nearest_agents_when_a_name_is_unknown(
    name: str, known: list[str], suffix: str
) -> None:
    assert client.did_you_mean(name, known) == suffix


def _api(handler: Callable[[httpx.Request], httpx.Response]) -> client.ApiClient:
    api = client.ApiClient("http://roost.test", None)
    api._http = httpx.Client(base_url=api.url, transport=httpx.MockTransport(handler))
    return api


def test_request_is_sent_again_with_the_same_key_when_the_connection_drops() -> None:
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        if len(keys) < 3:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(202, json={"id": "m1"})

    with _api(handler) as api:
        answer = api.json("POST", "/x", content=b"{}", headers={"Idempotency-Key": "k"}, retries=2)
    assert answer == {"id": "m1"}
    assert keys == ["k", "k", "k"]


def test_request_is_not_repeated_when_no_retries_are_allowed() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadError("connection reset", request=request)

    with _api(handler) as api, pytest.raises(client.ConnectionLost, match="connection reset"):
        api.request("POST", "/x")
    assert len(calls) == 1


def test_404_for_an_unknown_agent_suggests_names_when_the_daemon_knows_near_ones() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/agents":
            return httpx.Response(200, json={"agents": [{"name": "echo"}, {"name": "coder"}]})
        return httpx.Response(404, json={"error": "no agent named 'ecoh'", "agent": "ecoh"})

    with _api(handler) as api, pytest.raises(client.Refused) as refused:
        api.request("POST", "/api/agents/ecoh/stop")
    assert refused.value.format_message() == "no agent named 'ecoh'; did you mean 'echo'?"


def test_404_for_a_known_agent_adds_no_suggestion() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/agents":
            return httpx.Response(200, json={"agents": [{"name": "echo"}]})
        return httpx.Response(404, json={"error": "agent 'echo' has no container", "agent": "echo"})

    with _api(handler) as api, pytest.raises(client.Refused) as refused:
        api.request("GET", "/api/agents/echo/logs")
    assert refused.value.format_message() == "agent 'echo' has no container"


# --------------------------------------------------------------------------- start-up


#: Never imported by `roost --help` or `roost ps`: the server stack, and what only draws.
NOT_ON_THE_PS_PATH = {
    "roost.engine",
    "roost.serving",
    "fastapi",
    "aiodocker",
    "uvicorn",
    "prometheus_client",
    "rich",
    "httpx._main",
}


def _modules_after(*args: str) -> set[str]:
    script = (
        "import sys, json\n"
        "from roost.cli import main\n"
        f"sys.argv = ['roost', *{list(args)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(k for k, v in sys.modules.items() if v is not None)\n"
        "print('MODULES=' + json.dumps(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("MODULES="))
    return set(json.loads(line.removeprefix("MODULES=")))


def _top(modules: set[str]) -> set[str]:
    return modules | {m.split(".")[0] for m in modules}


def test_help_imports_neither_httpx_nor_config_nor_the_server_stack() -> None:
    loaded = _top(_modules_after("--help"))
    assert not loaded & (NOT_ON_THE_PS_PATH | {"httpx", "pydantic", "roost.config"})


def test_ps_imports_no_server_stack_and_no_rich_when_output_is_plain() -> None:
    loaded = _top(_modules_after("--url", "http://127.0.0.1:9", "--token", "t", "ps"))
    assert "httpx" in loaded  # it did reach the client
    assert not loaded & NOT_ON_THE_PS_PATH


def test_ps_reads_its_config_without_pydantic_when_a_file_is_given(tmp_path: Path) -> None:
    config = tmp_path / "roost.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:9"\n[agents.echo]\nimage = "x"\n')
    loaded = _top(_modules_after("--config", str(config), "ps"))
    assert "roost.config.sources" in loaded  # it did read the file
    assert not loaded & (NOT_ON_THE_PS_PATH | {"pydantic", "roost.config.settings"})
