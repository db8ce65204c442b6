"""The OpenAPI document tells the truth, and the docs pages work offline."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.api.app import PUBLIC_PATHS
from roost.testing import EngineHarness
from tests.conftest import make_settings

TOKEN = "docs-s3cret"
ERROR_REF = "#/components/schemas/ErrorBody"


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[EngineHarness]:
    settings = make_settings(tmp_path, "docs", agents={"echo": {"image": "roost-mimic:latest"}})
    async with EngineHarness.running(settings, token=TOKEN) as harness:
        yield harness


async def openapi(harness: EngineHarness) -> dict[str, Any]:
    response = await harness.client.get("/openapi.json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]


async def test_every_error_answer_is_documented_with_the_one_error_shape(
    secured: EngineHarness,
) -> None:
    schema = await openapi(secured)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, method, operation in operations(schema):
        responses = operation["responses"]
        assert "500" in responses, (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                content = response["content"]["application/json"]
                assert content["schema"] == {"$ref": ERROR_REF}, (method, path, status)
        if method in ("post", "put", "patch"):
            assert {"400", "413"} <= set(responses), (method, path)


async def test_routes_name_their_typed_answers_and_errors_when_documented(
    secured: EngineHarness,
) -> None:
    schema = await openapi(secured)
    paths = schema["paths"]

    def ok_schema(path: str, method: str, status: str = "200") -> Any:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert ok_schema("/api/agents/{name}", "get") == {"$ref": "#/components/schemas/AgentDetails"}
    assert ok_schema("/api/agents/{name}/stop", "post") == {"$ref": "#/components/schemas/Agent"}
    assert ok_schema("/api/jobs/{job_id}", "get") == {"$ref": "#/components/schemas/Job"}
    assert ok_schema("/api/agents/{name}/messages/{message_id}", "get") == {
        "$ref": "#/components/schemas/Message"
    }
    assert set(paths["/api/agents/{name}/wake"]["post"]["responses"]) >= {
        "200",
        "202",
        "404",
        "409",
        "422",
        "502",
        "503",
        "504",
        "500",
        "401",
    }
    agent = schema["components"]["schemas"]["Agent"]
    assert {"name", "state", "container_id", "url", "restart_count", "last_exit"} <= set(
        agent["required"]
    )
    assert agent["examples"][0]["name"] == "echo"
    name = paths["/api/agents/{name}"]["get"]["parameters"][0]
    assert name["examples"]["echo"]["value"] == "echo"


async def test_token_is_documented_on_every_route_but_the_public_ones(
    secured: EngineHarness,
) -> None:
    schema = await openapi(secured)
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, method, operation in operations(schema):
        if path in PUBLIC_PATHS:
            assert "security" not in operation, path
        else:
            assert operation["security"] == [{"bearer": []}], (method, path)
            assert "401" in operation["responses"], (method, path)


async def test_proxy_route_and_its_wake_headers_are_documented_when_added_by_hand(
    secured: EngineHarness,
) -> None:
    schema = await openapi(secured)
    proxy = schema["paths"]["/agents/{name}/{path}"]
    assert set(proxy) == {"get", "put", "post", "delete", "options", "head", "patch"}
    answer = proxy["get"]["responses"]["default"]
    assert set(answer["headers"]) == {"Roost-Cold-Start", "Roost-Wake-Ms"}
    waiting = proxy["get"]["responses"]["503"]
    assert set(waiting["content"]) == {"application/json", "text/html"}
    assert "waiting_page" in waiting["description"]
    assert {"404", "413", "502", "401"} <= set(proxy["post"]["responses"])


async def test_docs_pages_load_their_assets_from_roost_without_a_token(
    secured: EngineHarness,
) -> None:
    for page in ("/docs", "/redoc"):
        response = await secured.client.get(page)
        assert response.status_code == 200, page
        assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/docs/assets/"), (page, asset)
            fetched = await secured.client.get(asset)
            assert fetched.status_code == 200, asset
        assert "fonts.googleapis" not in response.text
    swagger = (await secured.client.get("/docs")).text
    assert '"validatorUrl": null' in swagger  # no call to the public validator


async def test_405_lists_every_method_of_the_path_in_allow_when_method_is_wrong(
    secured: EngineHarness,
) -> None:
    response = await secured.client.request(
        "PATCH", "/api/agents", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert "allowed: GET, POST" in response.json()["error"]


async def test_body_that_is_not_json_answers_400_naming_the_route(
    secured: EngineHarness,
) -> None:
    response = await secured.client.post(
        "/api/jobs",
        content=b"\xff{",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "the request body of POST /api/jobs is not valid JSON"
