"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI-compatible)."""

from __future__ import annotations

import asyncio
import logging
import weakref

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from app.api.auth import require_api_key
from app.api.disconnect import ClientDisconnected, cancel_on_disconnect
from app.api.errors import CLIENT_CLOSED_REQUEST
from app.api.forms import TranscriptionForm, build_transcribe_options
from app.api.registry import ModelRegistry, Phase
from app.api.sse import check_streamable, stream_transcription
from app.api.upload import read_multipart_form
from app.audio.budget import AudioBudget, AudioLease
from app.audio.decode import decode_audio
from app.config import Settings
from app.constants import OPENAI_ALIAS, SAMPLE_RATE
from app.decoding.options import Task
from app.errors import InvalidRequestError, ShuttingDownError
from app.formats import render
from app.server import memory

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Depends(require_api_key)])


# The body is parsed by our streaming reader, not by FastAPI, so describe it for /docs by hand.
def _form_schema(*, streams: bool) -> dict:
    properties: dict[str, object] = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string", "default": OPENAI_ALIAS},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {
            "type": "string",
            "enum": ["json", "text", "srt", "vtt", "verbose_json"],
            "default": "json",
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"type": "string", "enum": ["word", "segment"]},
        },
    }
    if streams:  # translations cannot stream (check_streamable)
        properties["stream"] = {"type": "boolean", "default": False}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": properties}
                }
            },
        }
    }


@router.post(
    "/transcriptions", openapi_extra=_form_schema(streams=True), summary="Transcribe audio"
)
async def create_transcription(request: Request) -> Response:
    return await _serve(request, task="transcribe")


@router.post(
    "/translations",
    openapi_extra=_form_schema(streams=False),
    summary="Translate audio into English",
)
async def create_translation(request: Request) -> Response:
    return await _serve(request, task="translate")


async def _serve(request: Request, *, task: Task) -> Response:
    try:
        return await _transcribe(request, task)
    except (ClientDisconnect, ClientDisconnected):
        # Nobody is listening; the status only reaches logs and metrics.
        log.info("Client disconnected from %s; work cancelled", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _transcribe(request: Request, task: Task) -> Response:
    settings: Settings = request.app.state.settings
    registry: ModelRegistry = request.app.state.registry
    if registry.phase is not Phase.READY:
        raise ShuttingDownError(f"The service is {registry.phase.value}; retry shortly.")

    upload = await read_multipart_form(request, max_file_bytes=settings.max_upload_bytes)
    form = TranscriptionForm.from_multipart(upload)
    if form.stream:
        check_streamable(form, task)
    model = registry.resolve(form.model)
    options = build_transcribe_options(form, task=task, model=model, settings=settings)
    file = upload.files.get("file")
    if file is None:
        raise InvalidRequestError(
            "You must provide an audio file in the 'file' field.", param="file"
        )
    if not file.data:
        raise InvalidRequestError("The uploaded file is empty.", param="file")

    budget: AudioBudget = request.app.state.audio_budget
    lease: AudioLease | None = budget.lease()
    audio: np.ndarray | None = None
    try:
        # Decoding is CPU work in C libraries (FFmpeg, soxr); keep it off the event loop.
        audio = await asyncio.to_thread(
            decode_audio,
            file.data,
            sample_rate=SAMPLE_RATE,
            max_duration_s=settings.max_audio_seconds,
            hold=lease.hold,
        )
        del upload, file  # the compressed bytes are no longer needed
        if form.stream:
            response = await stream_transcription(
                request, model.runtime, audio, options, duration_limit_s=settings.max_audio_seconds
            )
            # The stream holds the samples until it ends: give the memory back with them.
            weakref.finalize(audio, lease.release)
            lease = None
            return response
        result = await cancel_on_disconnect(
            request,
            model.runtime.transcribe(audio, options, duration_limit_s=settings.max_audio_seconds),
        )
    finally:
        if lease is not None:
            if lease.held >= memory.TRIM_AFTER_BYTES:
                audio = None  # the samples go before the trim
                await asyncio.to_thread(memory.trim)  # give the samples' pages back
            lease.release()
    # AUDIO_SECONDS and REAL_TIME_FACTOR are recorded by the runtime itself, so that every
    # entry point (REST, realtime, CLI) counts them once.
    body, media_type = render(result, form.response_format, form.timestamp_granularities)
    if isinstance(body, str):
        return Response(content=body, media_type=media_type)
    return JSONResponse(content=body, media_type=media_type)
