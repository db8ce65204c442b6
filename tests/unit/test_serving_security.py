"""Security defaults of ``roost up``: the token file's mode is checked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from roost import serving
from roost.config import Settings, parse_settings


def _settings(tmp_path: Path, mode: int) -> Settings:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    return parse_settings({"server": {"token_file": str(token)}}, base_dir=tmp_path)


def test_world_readable_token_file_draws_a_warning_naming_it_when_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="roost.serving"):
        assert serving._api_token(settings) == "s3cret"
    assert any("readable by others" in r.message and "token" in r.message for r in caplog.records)


def test_private_token_file_draws_no_warning_when_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, 0o600)
    with caplog.at_level(logging.WARNING, logger="roost.serving"):
        assert serving._api_token(settings) == "s3cret"
    assert not caplog.records
