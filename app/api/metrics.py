"""GET /metrics: Prometheus text exposition of app.metrics.REGISTRY."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.gpu_memory import refresh_gpu_memory
from app.metrics import REGISTRY

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    # A plain def: FastAPI runs it in a thread, so NVML calls never stall the event loop.
    refresh_gpu_memory()
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
