"""GET /v1/models and /v1/models/{id}, in OpenAI's list shape (whisper-1 included)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.api.auth import require_api_key
from app.api.registry import ModelRegistry

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])

OWNER = "whisper-serve"


def _model_object(registry: ModelRegistry, model_id: str) -> dict[str, object]:
    served = registry.resolve(model_id)
    return {"id": model_id, "object": "model", "created": served.created, "owned_by": OWNER}


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    registry: ModelRegistry = request.app.state.registry
    return {
        "object": "list",
        "data": [_model_object(registry, model_id) for model_id in registry.ids()],
    }


@router.get("/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, object]:
    return _model_object(request.app.state.registry, model_id)
