"""roost.config: schema, validation messages (key and file named), loading precedence,
defaults merging, config_hash scope and the Policy mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from roost import errors
from roost.config import (
    AGENT_KEYS,
    CONTAINER_KEYS,
    AgentSettings,
    LifecycleSettings,
    ResolvedAgent,
    Settings,
    load_settings,
    parse_agent_settings,
    parse_settings,
    parse_size,
    resolve_agent,
)

ROOT = Path(__file__).resolve().parents[2]


def write(directory: Path, text: str, name: str = "roost.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(directory: Path, text: str, name: str = "roost.toml") -> errors.ConfigError:
    path = write(directory, text, name)
    with pytest.raises(errors.ConfigError) as caught:
        load_settings(str(path), environ={})
    return caught.value


# --------------------------------------------------------------------------- defaults


def test_builtin_defaults_match_design_when_no_file_exists(tmp_path: Path) -> None:
    settings = load_settings(cwd=tmp_path, environ={})
    assert settings.source_file is None
    assert settings.agents == {}
    assert settings.server.listen == "127.0.0.1:7075"
    assert settings.server.state_dir == ".roost"
    assert settings.server.token_file == ""
    assert settings.server.max_body_size == 1024 * 1024
    assert settings.server.log_level == "info"
    assert settings.server.resolved_public_url == "http://host.docker.internal:7075"
    assert settings.docker.host == ""
    assert settings.docker.instance == ""
    assert settings.docker.leave_running is False
    assert settings.docker.network == ""
    assert settings.docker.publish_host == "127.0.0.1"
    assert settings.docker.pull_timeout == 300.0
    assert settings.docker.connection_limit == 32
    assert settings.docker.max_concurrent_starts == 4
    assert settings.notify.webhook == ""
    assert settings.notify.timeout == 5.0
    d = settings.defaults
    assert (d.idle_timeout, d.idle_action, d.pause_after, d.idle_mark_after) == (
        1800.0,
        "stop",
        0.0,
        30.0,
    )
    assert (d.max_restarts, d.restart_backoff, d.restart_backoff_max, d.restart_reset_after) == (
        3,
        10.0,
        300.0,
        600.0,
    )
    assert (d.startup_timeout, d.stop_timeout, d.health_path, d.message_path) == (
        120.0,
        10.0,
        "/health",
        "/messages",
    )
    assert (d.liveness_interval, d.liveness_failures) == (10.0, 3)
    assert (d.memory, d.cpus, d.pids_limit, d.no_new_privileges) == (512 * 1024**2, None, 512, True)
    assert (d.waking_notice_after, d.hold_timeout, d.max_concurrent_messages) == (1.0, 60.0, 1)
    assert (d.queue_limit, d.wait_timeout) == (10000, 30.0)
    assert settings.state_path() == tmp_path / ".roost"


# The example from DESIGN.md's "Configuration (contract: file and keys)", verbatim.
DESIGN_EXAMPLE = """
[server]
listen = "127.0.0.1:7075"        # gateway + API + dashboard
state_dir = ".roost"             # SQLite database lives here
token_file = ""                  # bearer token for the API; required off loopback

[docker]
host = ""                        # default: DOCKER_HOST or the local socket
instance = "default"
leave_running = false            # on shutdown, leave containers running (adopted next start)

[notify]
webhook = ""                     # POSTed JSON on agent.failed (and agent.waking, ...)

[defaults]                       # every agent inherits these
idle_timeout = 1800              # seconds without activity (proposal name: agentIdleTimeout)
idle_action = "stop"             # "pause" or "stop"
pause_after = 0                  # >0: pause after this many idle seconds first
max_restarts = 3                 # proposal name: agentMaxRestarts
restart_backoff = 10             # first delay, doubles (proposal: agentRestartBackoffSeconds)
restart_backoff_max = 300
restart_reset_after = 600        # running this long resets the restart counter
startup_timeout = 120
stop_timeout = 10
health_path = "/health"
message_path = "/messages"
liveness_interval = 10           # health probe period while running
liveness_failures = 3            # consecutive failures handled as a crash

[agents.echo]
image = "roost-mimic:latest"
port = 8000
env = { MODE = "echo" }
memory = "256m"
cpus = 0.5
"""


def test_design_example_loads_when_copied_verbatim(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, DESIGN_EXAMPLE)), environ={})
    echo = settings.agent("echo")
    assert echo.image == "roost-mimic:latest"
    assert echo.env == {"MODE": "echo"}
    assert echo.memory == 256 * 1024**2
    assert echo.cpus == 0.5
    assert echo.explicit().keys() >= {"image", "env", "memory", "cpus", "port"}
    lifecycle = LifecycleSettings()
    for key in LifecycleSettings.model_fields:
        assert getattr(echo, key) == getattr(lifecycle, key), key


def test_example_file_loads_with_a_demo_echo_agent_when_read_from_examples() -> None:
    settings = load_settings(str(ROOT / "examples" / "roost.toml"), environ={})
    echo = settings.agent("echo")
    assert echo.image == "roost-mimic:latest"
    assert echo.port == 8000
    assert settings.server.state_dir == ".roost"
    assert 0 < echo.pause_after < echo.idle_timeout <= 600


def test_every_field_has_a_description_when_models_are_inspected() -> None:
    from roost import config

    models: list[type[BaseModel]] = [
        config.ServerConfig,
        config.DockerConfig,
        config.NotifyConfig,
        config.JobsConfig,
        config.SwarmConfig,
        config.AgentSettings,
        config.ResolvedAgent,
        config.SpawnedAgent,
        config.Settings,
    ]
    undocumented = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undocumented == []


def test_defaults_and_agents_share_one_model_when_schema_is_compared() -> None:
    settings = Settings.model_fields
    assert settings["defaults"].annotation is AgentSettings
    assert set(AGENT_KEYS) == set(AgentSettings.model_fields)
    assert set(AGENT_KEYS) | {"name"} == set(ResolvedAgent.model_fields)


def test_every_agent_setting_is_declared_in_exactly_one_group_when_counted() -> None:
    from roost import config

    groups: list[type[BaseModel]] = [
        config.ContainerSettings,
        config.LifecycleSettings,
        config.DeliverySettings,
        config.HoldSettings,
        config.RoutingSettings,
    ]
    declared = [key for group in groups for key in group.model_fields]
    assert sorted(declared) == sorted(AGENT_KEYS)
    assert len(declared) == len(set(declared))


def test_settings_are_frozen_when_assigned() -> None:
    settings = parse_settings({})
    with pytest.raises(ValueError, match="frozen"):
        settings.server.listen = "0.0.0.0:1"


# --------------------------------------------------------------------------- errors

# (toml text, dotted key, a fragment of the message)
INVALID_CASES: list[tuple[str, str, str]] = [
    ("[server]\nbogus = 1\n", "server.bogus", "unknown key"),
    ("[nonsense]\nx = 1\n", "nonsense", "unknown key"),
    ("[agents.echo]\nimage = 'x'\nmemroy = '1g'\n", "agents.echo.memroy", "unknown key"),
    ("[defaults]\nidle_timeout = -1\n", "defaults.idle_timeout", "must not be negative"),
    ("[defaults]\nidle_timeout = 'soon'\n", "defaults.idle_timeout", "number of seconds"),
    ("[defaults]\nstop_timeout = -0.5\n", "defaults.stop_timeout", "must not be negative"),
    ("[defaults]\nrestart_backoff = -2\n", "defaults.restart_backoff", "must not be negative"),
    ("[defaults]\nstartup_timeout = 0\n", "defaults.startup_timeout", "must be > 0"),
    ("[defaults]\nidle_timeout = nan\n", "defaults.idle_timeout", "finite"),
    ("[defaults]\nidle_timeout = true\n", "defaults.idle_timeout", "number of seconds"),
    ("[defaults]\nidle_action = 'sleep'\n", "defaults.idle_action", "'pause' or 'stop'"),
    ("[defaults]\nmax_restarts = -1\n", "defaults.max_restarts", "must be >= 0"),
    ("[defaults]\nmax_restarts = 2.5\n", "defaults.max_restarts", "must be an integer"),
    ("[defaults]\nliveness_failures = 0\n", "defaults.liveness_failures", "must be >= 1"),
    ("[defaults]\nhealth_path = 'health'\n", "defaults.health_path", "starting with '/'"),
    ("[defaults]\nmemory = '12zb'\n", "defaults.memory", "invalid size '12zb'"),
    ("[defaults]\nmemory = '1m'\n", "defaults.memory", "minimum of 6m"),
    ("[defaults]\ncpus = -1\n", "defaults.cpus", ">= 0.01"),
    ("[defaults]\nno_new_privileges = 'yes'\n", "defaults.no_new_privileges", "true or false"),
    (
        "[defaults]\nrestart_backoff = 60\nrestart_backoff_max = 30\n",
        "defaults.restart_backoff_max",
        "must be >= restart_backoff",
    ),
    ("[server]\nlisten = '127.0.0.1'\n", "server.listen", "host:port"),
    ("[server]\nlisten = '127.0.0.1:0'\n", "server.listen", "1-65535"),
    ("[server]\nlisten = '127.0.0.1:70000'\n", "server.listen", "1-65535"),
    ("[server]\nmax_body_size = 'lots'\n", "server.max_body_size", "invalid size"),
    ("[server]\nlog_level = 'loud'\n", "server.log_level", "debug, info"),
    ("[server]\npublic_url = 'host:1'\n", "server.public_url", "http://"),
    ("[server]\nstate_dir = 3\n", "server.state_dir", "must be a string"),
    ("[docker]\ninstance = 'My_Roost'\n", "docker.instance", "invalid name"),
    ("[docker]\npublish_host = 'localhost'\n", "docker.publish_host", "IP address"),
    ("[docker]\nconnection_limit = 0\n", "docker.connection_limit", "must be >= 1"),
    ("[docker]\nmax_concurrent_starts = 0\n", "docker.max_concurrent_starts", "must be >= 1"),
    ("[docker]\npull_timeout = -5\n", "docker.pull_timeout", "must not be negative"),
    ("[docker]\nagentIdleTimeout = -1\n", "docker.agentIdleTimeout", "must not be negative"),
    ("[notify]\nwebhook = 'ftp://x'\n", "notify.webhook", "http://"),
    ("[notify]\ntimeout = 0\n", "notify.timeout", "must be > 0"),
    ("[agents.echo]\nport = 8000\n", "agents.echo.image", "required"),
    ("[agents.echo]\nimage = ''\n", "agents.echo.image", "required"),
    ("[agents.echo]\nimage = 'x'\nport = 0\n", "agents.echo.port", "must be >= 1"),
    ("[agents.echo]\nimage = 'x'\nport = 65536\n", "agents.echo.port", "<= 65535"),
    ("[agents.echo]\nimage = 'x'\nhost_port = -1\n", "agents.echo.host_port", ">= 0"),
    ("[agents.echo]\nimage = 'x'\nhost_ip = 'lo'\n", "agents.echo.host_ip", "IP address"),
    ("[agents.echo]\nimage = 'x'\nmemory = '12zb'\n", "agents.echo.memory", "invalid size"),
    ("[agents.echo]\nimage = 'x'\nidle_timeout = -1\n", "agents.echo.idle_timeout", "negative"),
    ("[agents.echo]\nimage = 'x'\nidle_action = 'nap'\n", "agents.echo.idle_action", "'pause'"),
    ("[agents.echo]\nimage = 'x'\ncommand = 'run'\n", "agents.echo.command", "list of strings"),
    ("[agents.echo]\nimage = 'x'\nenv = { PORT = 8080 }\n", "agents.echo.env.PORT", "quote it"),
    ("[agents.echo]\nimage = 'x'\nenv = 'A=1'\n", "agents.echo.env", "table"),
    ("[agents.Echo]\nimage = 'x'\n", "agents.Echo", "invalid name"),
    ("[agents.-echo]\nimage = 'x'\n", "agents.-echo", "invalid name"),
    ("[agents.echo_1]\nimage = 'x'\n", "agents.echo_1", "invalid name"),
    (f"[agents.{'a' * 64}]\nimage = 'x'\n", f"agents.{'a' * 64}", "invalid name"),
    ("[agents]\necho = 'x'\n", "agents.echo", "must be a table"),
    (
        "[agents.echo]\nimage = 'x'\nrestart_backoff = 400\n",
        "agents.echo.restart_backoff",
        "must be >= restart_backoff",
    ),
    (
        "[docker]\nagentIdleTimeout = 60\n[defaults]\nidle_timeout = 30\n",
        "docker.agentIdleTimeout",
        "conflicts with defaults.idle_timeout",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), INVALID_CASES, ids=[case[1] for case in INVALID_CASES]
)
def test_error_names_file_and_key_when_value_is_invalid(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    error = load_error(tmp_path, text)
    path = str(tmp_path / "roost.toml")
    assert error.key == key
    assert error.file == path
    first_line = str(error).splitlines()[0]
    assert first_line.startswith(f"{path}: {key}: ")
    assert fragment in first_line


def test_message_has_documented_shape_when_size_is_invalid(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[agents.echo]\nimage = 'x'\nmemory = '12zb'\n")
    assert str(error) == (
        f"{tmp_path / 'roost.toml'}: agents.echo.memory: invalid size '12zb' (use e.g. 256m, 1g)"
    )


def test_message_is_relative_when_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "[server]\nbogus = 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ConfigError) as caught:
        load_settings(environ={})
    assert str(caught.value) == "roost.toml: server.bogus: unknown key"
    assert caught.value.file == "roost.toml"


def test_error_lists_every_problem_one_per_line_when_several_keys_are_bad(
    tmp_path: Path,
) -> None:
    error = load_error(
        tmp_path,
        "[server]\nbogus = 1\n[defaults]\nidle_timeout = -1\n[agents.echo]\nmemory = '1q'\n",
    )
    lines = str(error).splitlines()
    keys = {line.split(": ")[1] for line in lines}
    # (a missing image is checked once the tables are valid: agents.echo.image comes next)
    assert keys == {"server.bogus", "defaults.idle_timeout", "agents.echo.memory"}
    assert all(line.startswith(str(tmp_path / "roost.toml") + ": ") for line in lines)


def test_env_values_are_never_echoed_when_env_is_invalid(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[agents.echo]\nimage = 'x'\nenv = { TOKEN = 987654321 }\n")
    assert error.key == "agents.echo.env.TOKEN"
    assert "987654321" not in str(error)


def test_error_names_file_and_line_when_toml_syntax_is_broken(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nlisten = \n")
    assert error.file == str(tmp_path / "roost.toml")
    assert str(error).startswith(f"{tmp_path / 'roost.toml'}: invalid TOML")
    assert "line 2" in str(error)


def test_error_names_file_and_line_when_json_syntax_is_broken(tmp_path: Path) -> None:
    error = load_error(tmp_path, '{\n  "docker": {,}\n}\n', name="roost.json")
    assert error.file == str(tmp_path / "roost.json")
    assert "line 2" in str(error)


def test_error_names_file_when_json_top_level_is_not_an_object(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[1, 2]", name="roost.json")
    assert "top level" in str(error)
    assert error.file == str(tmp_path / "roost.json")


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("512k", 512 * 1024),
        ("256m", 256 * 1024**2),
        ("256M", 256 * 1024**2),
        ("256mb", 256 * 1024**2),
        ("256MiB", 256 * 1024**2),
        ("1g", 1024**3),
        ("1.5g", 3 * 1024**3 // 2),
        ("0", 0),
    ],
)
def test_size_is_parsed_in_binary_units_when_given_docker_style(raw: Any, expected: int) -> None:
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["12zb", "", "m", "-1m", -1, 1.5, True, None, "1 g b"])
def test_size_is_rejected_when_malformed(raw: Any) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(raw)


@pytest.mark.parametrize(
    ("listen", "host", "port", "loopback"),
    [
        ("127.0.0.1:7075", "127.0.0.1", 7075, True),
        ("127.1.2.3:80", "127.1.2.3", 80, True),
        ("localhost:7075", "localhost", 7075, True),
        ("[::1]:7075", "::1", 7075, True),
        ("0.0.0.0:7075", "0.0.0.0", 7075, False),
        (":7075", "", 7075, False),
        ("[::]:7075", "::", 7075, False),
        ("192.168.1.5:7075", "192.168.1.5", 7075, False),
        ("roost.example.com:443", "roost.example.com", 443, False),
    ],
)
def test_listen_is_split_and_classified_when_parsed(
    listen: str, host: str, port: int, loopback: bool
) -> None:
    settings = parse_settings({"server": {"listen": listen, "token_file": "t"}})
    assert settings.server.listen_host == host
    assert settings.server.listen_port == port
    assert settings.requires_token() is (not loopback)


def test_public_url_is_derived_from_listen_port_when_unset() -> None:
    settings = parse_settings({"server": {"listen": "127.0.0.1:9001"}})
    assert settings.server.resolved_public_url == "http://host.docker.internal:9001"
    explicit = parse_settings({"server": {"public_url": "http://172.17.0.1:9001/"}})
    assert explicit.server.resolved_public_url == "http://172.17.0.1:9001"


def test_sizes_and_cpus_are_normalised_when_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[server]\nmax_body_size = '2m'\n[defaults]\nmemory = 0\ncpus = 0\n"
        "[agents.a]\nimage = 'x'\nmemory = '1g'\ncpus = 1\n[agents.b]\nimage = 'y'\n",
    )
    settings = load_settings(str(path), environ={})
    assert settings.server.max_body_size == 2 * 1024**2
    assert settings.agent("a").memory == 1024**3
    assert settings.agent("a").cpus == 1.0
    assert settings.agent("b").memory == 0  # no limit
    assert settings.agent("b").cpus is None  # 0 means no limit


def test_log_level_is_lowercased_when_given_in_capitals() -> None:
    assert parse_settings({"server": {"log_level": "DEBUG"}}).server.log_level == "debug"


# --------------------------------------------------------------------------- tokens


def test_load_fails_when_listen_is_public_and_no_token_file_is_set(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nlisten = '0.0.0.0:7075'\n")
    assert error.key == "server.token_file"
    assert "not loopback" in str(error)


def test_token_is_read_stripped_relative_to_the_config_file_when_listen_is_public(
    tmp_path: Path,
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "token").write_text("  s3cret\n", encoding="utf-8")
    path = write(tmp_path / "conf", "[server]\nlisten = '0.0.0.0:7075'\ntoken_file = 'token'\n")
    settings = load_settings(str(path), cwd=tmp_path, environ={})
    assert settings.requires_token() is True
    assert settings.token() == "s3cret"
    assert settings.state_path() == tmp_path / "conf" / ".roost"


def test_load_fails_naming_token_file_when_token_file_is_missing(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nlisten = '0.0.0.0:7075'\ntoken_file = 'nope'\n")
    assert error.key == "server.token_file"
    assert "cannot read" in str(error)


def test_load_fails_when_token_file_is_empty(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(" \n", encoding="utf-8")
    error = load_error(tmp_path, "[server]\nlisten = '0.0.0.0:7075'\ntoken_file = 'token'\n")
    assert error.key == "server.token_file"
    assert "empty" in str(error)


def test_token_is_none_when_no_token_file_is_configured() -> None:
    settings = parse_settings({})
    assert settings.token() is None
    assert settings.requires_token() is False


# --------------------------------------------------------------------------- precedence


def test_explicit_path_wins_when_env_and_cwd_also_have_configs(tmp_path: Path) -> None:
    explicit = write(tmp_path, "[docker]\ninstance = 'explicit'\n", "explicit.toml")
    from_env = write(tmp_path, "[docker]\ninstance = 'from-env'\n", "env.toml")
    write(tmp_path, "[docker]\ninstance = 'cwd'\n")
    settings = load_settings(str(explicit), cwd=tmp_path, environ={"ROOST_CONFIG": str(from_env)})
    assert settings.docker.instance == "explicit"
    assert settings.source_file == str(explicit)


def test_roost_config_wins_over_cwd_when_no_path_is_given(tmp_path: Path) -> None:
    from_env = write(tmp_path, "[docker]\ninstance = 'from-env'\n", "env.toml")
    write(tmp_path, "[docker]\ninstance = 'cwd'\n")
    settings = load_settings(cwd=tmp_path, environ={"ROOST_CONFIG": str(from_env)})
    assert settings.docker.instance == "from-env"


def test_cwd_roost_toml_is_used_when_nothing_else_is_named(tmp_path: Path) -> None:
    write(tmp_path, "[docker]\ninstance = 'cwd'\n")
    settings = load_settings(cwd=tmp_path, environ={"ROOST_CONFIG": ""})
    assert settings.docker.instance == "cwd"
    assert settings.source_file == str(tmp_path / "roost.toml")


@pytest.mark.parametrize("how", ["path", "env"])
def test_error_names_the_file_when_a_named_config_is_missing(tmp_path: Path, how: str) -> None:
    missing = str(tmp_path / "missing.toml")
    path, environ = (missing, {}) if how == "path" else (None, {"ROOST_CONFIG": missing})
    with pytest.raises(errors.ConfigError) as caught:
        load_settings(path, cwd=tmp_path, environ=environ)
    assert caught.value.file == missing
    assert str(caught.value).startswith(f"{missing}: no such config file")


def test_environment_is_not_read_when_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOST_CONFIG", str(tmp_path / "missing.toml"))
    assert load_settings(cwd=tmp_path, environ={}).source_file is None


def test_process_environment_is_read_when_environ_is_omitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write(tmp_path, "[docker]\ninstance = 'process-env'\n", "env.toml")
    monkeypatch.setenv("ROOST_CONFIG", str(from_env))
    assert load_settings(cwd=tmp_path).docker.instance == "process-env"


# --------------------------------------------------------------------------- proposal shape


def test_proposal_json_shape_maps_onto_defaults_when_loaded(tmp_path: Path) -> None:
    document = {
        "docker": {
            "agentIdleTimeout": 1800,
            "agentMaxRestarts": 5,
            "agentRestartBackoffSeconds": 7,
        },
        "agents": {"echo": {"image": "roost-mimic:latest"}},
    }
    path = write(tmp_path, json.dumps(document), "roost.json")
    settings = load_settings(str(path), environ={})
    assert settings.defaults.idle_timeout == 1800.0
    assert settings.defaults.max_restarts == 5
    assert settings.defaults.restart_backoff == 7.0
    assert settings.agent("echo").max_restarts == 5


def test_proposal_keys_are_accepted_when_inside_a_toml_docker_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[docker]\nagentIdleTimeout = 60\nagentMaxRestarts = 1\n"
        "[defaults]\nrestart_backoff = 2\nidle_timeout = 60\n",
    )
    settings = load_settings(str(path), environ={})
    assert settings.defaults.idle_timeout == 60.0
    assert settings.defaults.max_restarts == 1
    assert settings.defaults.restart_backoff == 2.0


def test_json_error_names_the_proposal_key_when_its_value_is_bad(tmp_path: Path) -> None:
    error = load_error(tmp_path, '{"docker": {"agentMaxRestarts": "3"}}', name="roost.json")
    assert error.key == "docker.agentMaxRestarts"
    assert "integer" in str(error)


# --------------------------------------------------------------------------- merging


def test_agent_inherits_defaults_and_overrides_win_when_resolved() -> None:
    settings = parse_settings(
        {
            "defaults": {"idle_timeout": 100, "idle_action": "pause", "memory": "1g"},
            "agents": {
                "plain": {"image": "a"},
                "tuned": {"image": "b", "idle_timeout": 5, "memory": "64m", "pids_limit": 0},
            },
        }
    )
    plain, tuned = settings.agent("plain"), settings.agent("tuned")
    assert (plain.idle_timeout, plain.idle_action, plain.memory) == (100.0, "pause", 1024**3)
    assert (tuned.idle_timeout, tuned.idle_action, tuned.memory) == (5.0, "pause", 64 * 1024**2)
    assert tuned.pids_limit == 0
    assert plain.pids_limit == 512
    assert plain.name == "plain"
    assert set(settings.resolved_agents()) == {"plain", "tuned"}


def test_resolve_agent_equals_settings_agent_when_built_by_hand() -> None:
    defaults = AgentSettings.model_validate({"max_restarts": 9})
    spec = resolve_agent("manual", defaults, AgentSettings(image="img", port=9000))
    assert spec.max_restarts == 9
    assert spec.port == 9000
    assert spec.command is None
    by_file = parse_settings(
        {"defaults": {"max_restarts": 9}, "agents": {"manual": {"image": "img", "port": 9000}}}
    ).agent("manual")
    assert spec == by_file


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2", 2.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
    ],
)
def test_durations_accept_units_when_written_as_text(raw: Any, seconds: float) -> None:
    settings = parse_settings({"defaults": {"idle_timeout": raw}})
    assert settings.defaults.idle_timeout == seconds


@pytest.mark.parametrize("raw", ["5x", "m5", "", "1h-5m", "soon"])
def test_durations_are_refused_naming_the_key_when_malformed(raw: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_settings({"jobs": {"kill_grace": raw}})
    assert caught.value.key == "jobs.kill_grace"
    assert "duration like '90s'" in str(caught.value)


@pytest.mark.parametrize(
    ("document", "key", "suggestion"),
    [
        ({"servr": {}}, "servr", "server"),
        ({"defaults": {"idle_timout": 3}}, "defaults.idle_timout", "idle_timeout"),
        ({"agents": {"a": {"image": "x", "memroy": "1g"}}}, "agents.a.memroy", "memory"),
        ({"docker": {"agentIdleTimout": 5}}, "docker.agentIdleTimout", "agentIdleTimeout"),
    ],
)
def test_unknown_key_suggests_the_nearest_one_when_misspelt(
    document: dict[str, Any], key: str, suggestion: str
) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_settings(document)
    assert caught.value.key == key
    assert f"did you mean {suggestion!r}?" in str(caught.value)


def test_unknown_agent_raises_not_found_when_looked_up() -> None:
    with pytest.raises(errors.NotFound, match="nobody"):
        parse_settings({}).agent("nobody")


def test_spec_round_trips_when_stored_as_json() -> None:
    settings = parse_settings(
        {"agents": {"echo": {"image": "x", "command": ["a", "b"], "env": {"K": "v"}, "cpus": 1}}}
    )
    spec = settings.agent("echo")
    assert ResolvedAgent.from_json(spec.to_json()) == spec
    assert ResolvedAgent.from_json(json.loads(spec.to_json())) == spec
    assert ResolvedAgent.from_json(spec.model_dump(mode="json")) == spec


def test_stored_spec_raises_config_error_when_it_is_corrupt() -> None:
    with pytest.raises(errors.ConfigError):
        ResolvedAgent.from_json('{"name": "x", "idle_timeout": -1}')
    with pytest.raises(errors.ConfigError):
        ResolvedAgent.from_json("{not json")


def test_parse_agent_config_names_the_agent_key_when_registered_over_api() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_agent_settings({"image": "x", "memory": "lots"}, name="worker")
    assert caught.value.key == "agents.worker.memory"
    with pytest.raises(errors.ConfigError) as bad_name:
        parse_agent_settings({"image": "x"}, name="Bad Name")
    assert bad_name.value.key == "agents.Bad Name"
    assert parse_agent_settings({"image": "x"}, name="worker").image == "x"


# --------------------------------------------------------------------------- hash & policy

BASE_AGENT: dict[str, Any] = {
    "image": "img:1",
    "port": 8000,
    "env": {"A": "1"},
    "command": ["run"],
    "memory": "256m",
    "cpus": 0.5,
    "pids_limit": 100,
    "no_new_privileges": True,
}

CONTAINER_CHANGES: dict[str, Any] = {
    "cap_drop": [],
    "cap_add": ["NET_ADMIN"],
    "read_only_rootfs": True,
    "user": "1000:1000",
    "private_cgroupns": False,
    "image": "img:2",
    "port": 8001,
    "host_port": 9001,
    "host_ip": "0.0.0.0",
    "env": {"A": "2"},
    "command": ["run", "--fast"],
    "memory": "512m",
    "cpus": 1.0,
    "pids_limit": 200,
    "no_new_privileges": False,
    "placement": ["node.labels.gpu==true"],
}

POLICY_CHANGES: dict[str, Any] = {
    "idle_timeout": 5,
    "idle_action": "pause",
    "pause_after": 1,
    "idle_mark_after": 2,
    "max_restarts": 9,
    "restart_backoff": 1,
    "restart_backoff_max": 20,
    "restart_reset_after": 3,
    "startup_timeout": 4,
    "stop_timeout": 5,
    "health_path": "/ready",
    "message_path": "/in",
    "liveness_interval": 6,
    "liveness_failures": 7,
    "waking_notice_after": 8,
    "hold_timeout": 9,
    "waiting_page": True,
    "max_concurrent_messages": 2,
    "queue_limit": 3,
    "wait_timeout": 4,
    "delivery": "pull",
    "max_attempts": 5,
    "lease_timeout": 6,
    "nudge_path": "/task",
    "connect_timeout": 7,
    "event_types": ["issue.*"],
    "may_route": True,
}


def spec_with(**changes: Any) -> ResolvedAgent:
    # (on the swarm backend: the only one where placement is allowed; same hash rules)
    document = {"docker": {"backend": "swarm"}, "agents": {"a": {**BASE_AGENT, **changes}}}
    return parse_settings(document).agent("a")


def test_change_lists_cover_every_field_when_compared_to_the_schema() -> None:
    assert set(CONTAINER_CHANGES) == set(CONTAINER_KEYS)
    assert set(CONTAINER_CHANGES) | set(POLICY_CHANGES) | {"name"} == set(
        ResolvedAgent.model_fields
    )


@pytest.mark.parametrize(("key", "value"), sorted(CONTAINER_CHANGES.items()))
def test_config_hash_changes_when_a_container_field_changes(key: str, value: Any) -> None:
    assert spec_with(**{key: value}).config_hash != spec_with().config_hash


@pytest.mark.parametrize(("key", "value"), sorted(POLICY_CHANGES.items()))
def test_config_hash_is_stable_when_only_policy_changes(key: str, value: Any) -> None:
    assert spec_with(**{key: value}).config_hash == spec_with().config_hash


def test_config_hash_is_stable_when_spelling_or_order_differs() -> None:
    one = spec_with(memory="1g", env={"A": "1", "B": "2"})
    other = spec_with(memory=1024**3, env={"B": "2", "A": "1"})
    assert one.config_hash == other.config_hash
    assert len(one.config_hash) == 64


def test_spec_is_the_policy_the_core_obeys_when_resolved() -> None:
    from roost.core.policy import Policy

    spec = spec_with(**POLICY_CHANGES)
    policy: Policy = spec  # structurally: the spec is its own policy, nothing is copied
    # can_pause is the backend's, not a setting: settings answer True.
    names = [name for name in dir(Policy) if not name.startswith("_") and name != "can_pause"]
    assert names
    assert policy.can_pause is True
    for name in names:
        assert getattr(policy, name) == POLICY_CHANGES[name], name
        assert getattr(policy, name) != getattr(LifecycleSettings(), name), name


def test_config_hash_leaves_placement_out_when_an_agent_has_none() -> None:
    # Agents from before placement existed keep their hash (no container recreated).
    assert "placement" not in spec_with().container_fields()
    assert spec_with(placement=["node.role!=manager"]).container_fields()["placement"] == [
        "node.role!=manager"
    ]


@pytest.mark.parametrize(
    "constraint",
    ["node.labels.gpu==true", "node.role != manager", "node.id==abc123", "engine.labels.a.b==x"],
)
def test_placement_is_accepted_when_swarm_runs_the_agents(tmp_path: Path, constraint: str) -> None:
    path = write(
        tmp_path,
        f'[docker]\nbackend = "swarm"\n[agents.a]\nimage = "x"\nplacement = ["{constraint}"]\n',
    )
    settings = load_settings(path, environ={})
    assert settings.agent("a").placement == (constraint,)
    assert settings.docker.backend == "swarm"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[agents.a]\nimage = "x"\nplacement = ["node.labels.gpu==true"]\n',
            "agents.a.placement: only the swarm backend places agents",
        ),
        (
            '[defaults]\nplacement = ["node.role==worker"]\n',
            "defaults.placement: only the swarm backend places agents",
        ),
        (
            '[docker]\nbackend = "swarm"\n[agents.a]\nimage = "x"\nplacement = ["gpu==true"]\n',
            "agents.a.placement: invalid placement constraint 'gpu==true'",
        ),
        ('[docker]\nbackend = "kubernetes"\n', "docker.backend: must be one of 'engine', 'swarm'"),
        (
            '[docker]\nnode_hosts = { n1 = "10.0.0.1" }\n',
            "docker.node_hosts: node 'n1': must be a Docker address",
        ),
    ],
)
def test_backend_settings_are_refused_naming_the_key_when_invalid(
    tmp_path: Path, text: str, message: str
) -> None:
    error = load_error(tmp_path, text)
    assert f"roost.toml: {message}" in str(error)


def test_settings_validate_directly_when_built_in_code() -> None:
    settings = Settings.model_validate({"agents": {"a": {"image": "x"}}})
    assert settings.agent("a").image == "x"


def test_settings_round_trip_when_dumped_by_alias_and_validated_again() -> None:
    settings = load_settings(str(ROOT / "examples" / "roost.toml"), environ={})
    again = Settings.model_validate(settings.model_dump(by_alias=True))
    assert again.model_dump() == settings.model_dump()


# --------------------------------------------------------------------------- environment


def test_environment_overrides_any_key_when_named_section_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.echo]\nimage = 'roost-mimic:latest'\nmemory = '128m'\n")
    settings = load_settings(
        str(path),
        environ={
            "ROOST_DEFAULTS__IDLE_TIMEOUT": "5m",
            "ROOST_AGENTS__ECHO__MEMORY": "256m",
            "ROOST_AGENTS__ECHO__ENV__Mode": "echo",
            "ROOST_SERVER__LISTEN": "127.0.0.1:9999",
            "ROOST_DOCKER__LEAVE_RUNNING": "true",
            "ROOST_DEFAULTS__MAX_RESTARTS": "7",
            "ROOST_CONFIG": "",  # not a key: ignored here
        },
    )
    echo = settings.agent("echo")
    assert echo.idle_timeout == 300.0
    assert echo.memory == 256 * 1024**2
    assert echo.env == {"Mode": "echo"}
    assert echo.max_restarts == 7
    assert settings.server.listen == "127.0.0.1:9999"
    assert settings.docker.leave_running is True


def test_environment_error_names_the_variable_and_suggests_the_key_when_misspelt(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "")
    with pytest.raises(errors.ConfigError) as bad:
        load_settings(str(path), environ={"ROOST_DEFAULTS__IDLE_TIMEOUT": "-5"})
    assert "defaults.idle_timeout: must not be negative" in str(bad.value)
    assert "$ROOST_DEFAULTS__IDLE_TIMEOUT" in str(bad.value)
    with pytest.raises(errors.ConfigError) as misspelt:
        load_settings(str(path), environ={"ROOST_SERVR__LISTEN": "x:1"})
    assert "did you mean 'server'?" in str(misspelt.value)
    assert "$ROOST_SERVR__LISTEN" in str(misspelt.value)


def test_config_package_loads_every_public_name_lazily_when_accessed() -> None:
    from roost import config

    assert sorted(config._LAZY) == sorted(config.__all__)
    for name in config.__all__:
        assert getattr(config, name) is not None, name


def test_client_view_reads_listen_and_token_without_validating_the_rest(tmp_path: Path) -> None:
    from roost.config.sources import client_view

    (tmp_path / "token").write_text("s3cret\n")
    path = write(
        tmp_path,
        '[server]\nlisten = "0.0.0.0:7100"\ntoken_file = "token"\n[defaults]\ntypo = 1\n',
    )
    view = client_view(str(path), environ={})
    assert (view.listen_host, view.listen_port) == ("0.0.0.0", 7100)
    assert view.token() == "s3cret"
    moved = client_view(str(path), environ={"ROOST_SERVER__LISTEN": "127.0.0.1:7200"})
    assert moved.listen_port == 7200
    with pytest.raises(errors.ConfigError) as bad:
        client_view(str(write(tmp_path, '[server]\nlisten = "nowhere"\n')), environ={})
    assert bad.value.key == "server.listen"
