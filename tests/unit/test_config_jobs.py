"""roost.config ``[jobs]``: defaults, accepted forms, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from roost import errors
from roost.config import JobsConfig, load_settings, parse_settings


def test_jobs_defaults_match_the_issue_when_section_is_absent(tmp_path: Path) -> None:
    jobs = load_settings(cwd=tmp_path, environ={}).jobs
    assert jobs == JobsConfig()
    assert jobs.max_workers == 4
    assert jobs.kill_grace == 15.0
    assert jobs.default_timeout == 3600.0
    assert jobs.orphan_scan_interval == 60.0
    assert jobs.snapshot_ttl == 7 * 24 * 3600.0
    assert jobs.snapshot_max_count == 20
    assert jobs.snapshot_max_bytes == 10 * 1024**3
    assert jobs.secret_env == ()
    assert jobs.pull_timeout == 300.0


def test_jobs_keys_are_read_when_set_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "roost.toml"
    path.write_text(
        "[jobs]\n"
        "max_workers = 8\n"
        "kill_grace = 1.5\n"
        "default_timeout = 60\n"
        "orphan_scan_interval = 5\n"
        "snapshot_ttl = 0\n"
        "snapshot_max_count = 0\n"
        'snapshot_max_bytes = "2g"\n'
        'secret_env = ["GITHUB_PAT", "SESSION"]\n'
        "pull_timeout = 30\n",
        encoding="utf-8",
    )
    jobs = load_settings(str(path), environ={}).jobs
    assert jobs.max_workers == 8
    assert jobs.kill_grace == 1.5
    assert jobs.default_timeout == 60.0
    assert jobs.orphan_scan_interval == 5.0
    assert jobs.snapshot_ttl == 0.0
    assert jobs.snapshot_max_count == 0
    assert jobs.snapshot_max_bytes == 2 * 1024**3
    assert jobs.secret_env == ("GITHUB_PAT", "SESSION")
    assert jobs.pull_timeout == 30.0


@pytest.mark.parametrize(
    ("jobs", "key", "fragment"),
    [
        ({"max_workers": 0}, "jobs.max_workers", "must be >= 1"),
        ({"max_workers": "4"}, "jobs.max_workers", "must be an integer"),
        ({"kill_grace": -1}, "jobs.kill_grace", "must not be negative"),
        ({"default_timeout": 0}, "jobs.default_timeout", "must be > 0"),
        ({"orphan_scan_interval": 0}, "jobs.orphan_scan_interval", "must be > 0"),
        ({"snapshot_ttl": "week"}, "jobs.snapshot_ttl", "number of seconds"),
        ({"snapshot_max_count": -1}, "jobs.snapshot_max_count", "must be >= 0"),
        ({"snapshot_max_bytes": "lots"}, "jobs.snapshot_max_bytes", "invalid size"),
        ({"secret_env": "API_KEY"}, "jobs.secret_env", "list of variable names"),
        ({"secret_env": ["A=B"]}, "jobs.secret_env", "invalid variable name"),
        ({"pull_timeout": 0}, "jobs.pull_timeout", "must be > 0"),
        ({"workers": 2}, "jobs.workers", "unknown key"),
    ],
)
def test_jobs_error_names_file_and_key_when_value_is_bad(
    jobs: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_settings({"jobs": jobs}, file="roost.toml")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"roost.toml: {key}: ")
    assert fragment in str(caught.value)


def test_jobs_config_is_frozen_when_built() -> None:
    jobs = JobsConfig()
    with pytest.raises(ValueError, match="frozen"):
        jobs.max_workers = 9
