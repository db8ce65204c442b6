"""The admin API fuzzed by Schemathesis against its own OpenAPI document.

A real daemon (``serving.serve``, token on) runs in this process on fakes; the
``schemathesis`` CLI generates requests from ``/openapi.json`` (examples, coverage,
fuzzing and stateful phases) and checks every answer: no server error, status,
content type, headers and body as documented, invalid input refused, the token
enforced, ``Allow`` on 405. Settings and the few justified exceptions are in
``tests/schemathesis.toml``. Left out: ``GET /api/events`` (a stream that never
ends) and the proxy ``/agents/...`` (documented by hand; it needs a real agent
behind it, which the proxy's own tests have). ``positive_data_acceptance`` is off:
some rules are beyond JSON Schema (Docker's 6 MiB memory floor, image names), so
schema-valid input can rightly be refused with a 400/422 that names the field.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from roost.engine import Engine
from roost.testing.fake_agent_client import FakeAgentClient
from roost.testing.fake_runtime import FakeRuntime
from tests.conftest import ROOT, make_settings
from tests.support import roost_daemon

IMAGES = ["roost-mimic:latest", "roost-busybox:latest"]
TOKEN = "fuzz-s3cret"
#: Cases per operation and phase; a fixed seed keeps CI runs alike.
MAX_EXAMPLES = 30
SEED = 20261201


async def test_api_answers_as_documented_when_fuzzed_by_schemathesis(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = make_settings(
        tmp_path,
        "fuzz",
        agents={"echo": {"image": IMAGES[0]}},
        server={"token_file": str(token_file)},
    )
    runtime = FakeRuntime(images=IMAGES)
    engine = Engine(settings, runtime=runtime, agent_client=FakeAgentClient(runtime))
    schemathesis = Path(sys.executable).parent / "schemathesis"
    async with roost_daemon(settings, engine=engine) as (url, _):
        process = await asyncio.create_subprocess_exec(
            str(schemathesis),
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--exclude-path",
            "/api/events",
            "--exclude-path-regex",
            "^/agents/",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--request-timeout",
            "20",
            "--no-color",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report
    assert " passed" in report
