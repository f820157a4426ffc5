"""The browser demo: GET / serves a static page that streams the microphone to /v1/realtime."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    # Under /static, not at /: a catch-all mount would answer unknown API paths with HTML
    # instead of the API's JSON 404.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
