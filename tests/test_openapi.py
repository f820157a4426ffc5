"""The OpenAPI document describes every error response (schemathesis checks the rest in CI)."""

from __future__ import annotations

ERROR_REF = "#/components/schemas/ErrorResponse"
#: every error an upload endpoint can answer
AUDIO_ERRORS = {"400", "401", "404", "408", "413", "415", "500", "503"}


async def test_every_route_documents_its_errors_with_the_error_schema(make_client) -> None:
    client = await make_client(api_key="k")
    spec = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    expected = {
        ("post", "/v1/audio/transcriptions"): AUDIO_ERRORS,
        ("post", "/v1/audio/translations"): AUDIO_ERRORS,
        ("get", "/v1/models"): {"401", "500", "503"},
        ("get", "/v1/models/{model_id}"): {"401", "404", "500", "503"},
    }
    for (method, path), statuses in expected.items():
        operation = spec["paths"][path][method]
        responses = operation["responses"]
        assert "422" not in responses
        assert statuses <= set(responses), (path, sorted(responses))
        for status in statuses:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (path, status)
        assert "Retry-After" in responses["503"]["headers"]
        assert operation["security"] == [{"bearer": []}]
    transcript = spec["paths"]["/v1/audio/transcriptions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/plain", "text/vtt", "text/event-stream"} <= set(transcript)
    assert "503" in spec["paths"]["/ready"]["get"]["responses"]


async def test_no_security_is_declared_without_a_key(make_client) -> None:
    client = await make_client()
    spec = (await client.get("/openapi.json")).json()
    assert spec["paths"]["/v1/models"]["get"]["security"] == []
