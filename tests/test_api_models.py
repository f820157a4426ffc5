"""GET /v1/models and /v1/models/{id} in OpenAI's shapes."""

from __future__ import annotations

from conftest import FakeRuntime, assert_openai_error


async def test_list_models_includes_alias(make_client) -> None:
    client = await make_client(
        {"tiny.en": FakeRuntime("tiny.en"), "base": FakeRuntime("base", multilingual=True)}
    )
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny.en", "base", "whisper-1"]
    for model in body["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int) and model["created"] > 0
        assert isinstance(model["owned_by"], str)


async def test_get_model(make_client) -> None:
    client = await make_client()
    for model_id in ("tiny.en", "whisper-1"):
        response = await client.get(f"/v1/models/{model_id}")
        assert response.status_code == 200
        assert response.json()["id"] == model_id


async def test_get_unknown_model_is_404(make_client) -> None:
    client = await make_client()
    response = await client.get("/v1/models/large-v3")
    assert_openai_error(response, 404, param="model", code="model_not_found")
