"""Liveness (/health) and readiness (/ready) probes. Never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.registry import ModelRegistry

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    # Liveness: answering at all is the signal; the engines' state is /ready's business.
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    registry: ModelRegistry = request.app.state.registry
    if not registry.ready:
        # Load balancers should stop routing here (starting up or draining for shutdown).
        return JSONResponse(
            {"status": registry.phase.value}, status_code=503, headers={"Retry-After": "1"}
        )
    return JSONResponse({"status": "ready", "models": registry.ids()})
