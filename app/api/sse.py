"""`stream=true` on POST /v1/audio/transcriptions: server-sent events, as OpenAI sends them.

    data: {"type": "transcript.text.delta", "delta": "And so, my fellow Americans"}
    data: {"type": "transcript.text.delta", "delta": " ask not what your country can do for you"}
    data: {"type": "transcript.text.done", "text": "And so, my fellow ...", "usage": {...}}

Deltas are the segments of the long-form transcriber, each sent as soon as it is final (the
runtime's `on_segment` callback); they concatenate to the `done` text. Errors before the
first event (queue full, audio too long) are ordinary HTTP errors; one after it is sent as an
`error` event, because the 200 status has gone out by then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse

from app.api.disconnect import cancel_on_disconnect
from app.api.forms import TranscriptionForm
from app.decoding.options import Task, TranscribeOptions
from app.decoding.results import Segment, TranscriptionResult
from app.errors import InvalidRequestError, WhisperServeError

if TYPE_CHECKING:  # app.runtime imports torch, which must not load with the API modules
    from app.runtime import Runtime

log = logging.getLogger(__name__)

STREAMABLE_FORMATS = ("json", "text")


def check_streamable(form: TranscriptionForm, task: Task) -> None:
    """400 for stream=true where OpenAI does not stream either."""
    if task != "transcribe":
        raise InvalidRequestError(
            "Streaming is only supported for transcriptions; omit 'stream'.", param="stream"
        )
    if form.response_format not in STREAMABLE_FORMATS:
        raise InvalidRequestError(
            "stream=true supports response_format 'json' or 'text'.", param="response_format"
        )


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Deltas:
    """Segment texts -> deltas that concatenate exactly to the final (stripped) transcript."""

    def __init__(self) -> None:
        self._joined = ""
        self.sent = ""

    def add(self, text: str) -> str:
        self._joined += text
        # Hold back trailing whitespace: the transcript is stripped, and the next segment's
        # delta carries it if more text follows.
        ready = self._joined.strip()
        delta = ready[len(self.sent) :] if ready.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def rest(self, final: str) -> str:
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


async def stream_transcription(
    request: Request,
    runtime: Runtime,
    audio: np.ndarray,
    options: TranscribeOptions,
    *,
    duration_limit_s: float,
) -> StreamingResponse:
    segments: asyncio.Queue[Segment] = asyncio.Queue()

    async def on_segment(segment: Segment) -> None:
        segments.put_nowait(segment)

    work = asyncio.ensure_future(
        runtime.transcribe(audio, options, duration_limit_s=duration_limit_s, on_segment=on_segment)
    )

    async def first_output() -> Segment | None:
        waiter = asyncio.ensure_future(segments.get())
        try:
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if waiter.done() and not waiter.cancelled():
            return waiter.result()
        work.result()  # raise early errors while an HTTP status can still say so
        return None

    try:
        first = await cancel_on_disconnect(request, first_output())
    except BaseException:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    return StreamingResponse(
        _events(work, first, segments),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    work: asyncio.Future[TranscriptionResult],
    first: Segment | None,
    segments: asyncio.Queue[Segment],
) -> AsyncIterator[str]:
    deltas = _Deltas()
    try:
        if first is not None:
            delta = deltas.add(first.text)
            if delta:
                yield _event({"type": "transcript.text.delta", "delta": delta})
        while True:
            if segments.empty():
                if work.done():
                    break
                getter = asyncio.ensure_future(segments.get())
                await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                segment = getter.result()
            else:
                segment = segments.get_nowait()
            delta = deltas.add(segment.text)
            if delta:
                yield _event({"type": "transcript.text.delta", "delta": delta})
        try:
            result = work.result()
        except WhisperServeError as exc:
            yield _error(exc.message, exc.error_type, exc.code, exc.param)
            return
        except Exception:
            log.exception("streamed transcription failed")
            yield _error("The server had an error while processing your request.", "server_error")
            return
        rest = deltas.rest(result.text)
        if rest:
            yield _event({"type": "transcript.text.delta", "delta": rest})
        usage = {"type": "duration", "seconds": round(result.duration, 3)}
        yield _event({"type": "transcript.text.done", "text": result.text, "usage": usage})
    finally:
        # The client went away mid-stream (or we are done): free the decoder slots.
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)


def _error(message: str, error_type: str, code: str | None = None, param: str | None = None) -> str:
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return _event({"type": "error", "error": error})
