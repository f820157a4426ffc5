"""`stream=true` on POST /v1/audio/transcriptions: OpenAI's server-sent transcript events."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import httpx
import numpy as np
import openai
import pytest
from conftest import FakeRuntime, assert_openai_error, make_result, make_wav
from realtime_helpers import serve

from app.decoding.options import TranscribeOptions
from app.decoding.results import Segment, TranscriptionResult
from app.decoding.transcribe import SegmentCallback
from app.errors import QueueFullError

pytestmark = pytest.mark.usefixtures("clean_env")

URL = "/v1/audio/transcriptions"
TEXTS = [" And so, my fellow Americans,", " ask not what your country can do for you,", " ask."]


def sse_events(body: str) -> list[dict]:
    """The JSON payloads of `data:` lines, in order."""
    events = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def segment(index: int, text: str) -> Segment:
    base = make_result().segments[0]
    return replace(base, id=index, start=float(index), end=index + 0.9, text=text)


class SegmentRuntime(FakeRuntime):
    """A runtime that sends each of `texts` to `on_segment` as a segment of its own.

    After the first segment it waits for `release`, so a test can check that the first
    delta reached the client while the transcription was still running.
    """

    def __init__(self, texts: list[str], *, error_after_first: BaseException | None = None) -> None:
        super().__init__()
        self.texts = texts
        self.release = asyncio.Event()
        self.error_after_first = error_after_first

    async def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        *,
        duration_limit_s: float | None = None,
        on_segment: SegmentCallback | None = None,
    ) -> TranscriptionResult:
        self.calls.append((audio, options, duration_limit_s))
        segments = []
        try:
            for index, text in enumerate(self.texts):
                segments.append(segment(index, text))
                if on_segment is not None:
                    await on_segment(segments[-1])
                if index == 0:
                    await self.release.wait()
                    if self.error_after_first is not None:
                        raise self.error_after_first
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        text = "".join(self.texts).strip()
        return TranscriptionResult(text=text, segments=segments, language="en", duration=3.0)


async def test_stream_sends_a_delta_per_segment_then_done(
    make_client, wav_bytes
) -> None:
    runtime = FakeRuntime(result=make_result(" Hello world."))
    client = await make_client({"tiny.en": runtime})
    response = await client.post(
        URL, files={"file": ("a.wav", wav_bytes, "audio/wav")}, data={"stream": "true"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.done"]
    assert events[0]["delta"] == "Hello world."
    assert events[-1]["text"] == "Hello world."
    assert events[-1]["usage"] == {"type": "duration", "seconds": 1.0}
    # The same options as without stream: the REST defaults.
    assert runtime.last_options.window.beam_size == 5


async def test_segments_are_streamed_as_they_are_decoded() -> None:
    runtime = SegmentRuntime(TEXTS)
    async with (
        serve(runtime) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client,
    ):
        request = client.stream(
            "POST", URL, files={"file": ("a.wav", make_wav(), "audio/wav")}, data={"stream": "true"}
        )
        async with request as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = await asyncio.wait_for(anext(lines), 5)
            # The first segment is out while the transcription still waits for `release`.
            assert json.loads(first[len("data: ") :]) == {
                "type": "transcript.text.delta",
                "delta": "And so, my fellow Americans,",
            }
            runtime.release.set()
            rest = [line async for line in lines]
    events = sse_events(first + "\n\n" + "\n".join(rest))
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
    done = events[-1]["text"]
    assert done == "".join(TEXTS).strip()
    assert "".join(e["delta"] for e in events[:-1]) == done  # deltas concatenate to the text


async def test_the_openai_sdk_reads_the_stream() -> None:
    runtime = SegmentRuntime(TEXTS)
    runtime.release.set()
    async with serve(runtime) as address:
        sdk = openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="x", max_retries=0)
        stream = await sdk.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", make_wav(), "audio/wav"), stream=True
        )
        events = [event async for event in stream]
        await sdk.close()
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert events[-1].text == "".join(TEXTS).strip()
    assert "".join(e.delta for e in events[:-1]) == events[-1].text


async def test_error_after_the_first_delta_is_an_error_event() -> None:
    runtime = SegmentRuntime(TEXTS, error_after_first=QueueFullError("at capacity"))
    async with (
        serve(runtime) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client,
    ):
        request = client.stream(
            "POST", URL, files={"file": ("a.wav", make_wav(), "audio/wav")}, data={"stream": "true"}
        )
        async with request as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = await asyncio.wait_for(anext(lines), 5)
            runtime.release.set()  # now the transcription fails
            rest = [line async for line in lines]
    events = sse_events(first + "\n\n" + "\n".join(rest))
    assert [e["type"] for e in events] == ["transcript.text.delta", "error"]
    assert events[-1]["error"]["code"] == "queue_full"


async def test_error_before_any_output_is_an_http_error(make_client, wav_bytes) -> None:
    runtime = FakeRuntime(error=QueueFullError("at capacity", retry_after_s=2))
    client = await make_client({"tiny.en": runtime})
    response = await client.post(
        URL, files={"file": ("a.wav", wav_bytes, "audio/wav")}, data={"stream": "true"}
    )
    assert_openai_error(response, 503, code="queue_full")
    assert response.headers["retry-after"] == "2"


@pytest.mark.parametrize(
    ("url", "fields", "param"),
    [
        (URL, {"stream": "true", "response_format": "srt"}, "response_format"),
        (URL, {"stream": "true", "response_format": "verbose_json"}, "response_format"),
        ("/v1/audio/translations", {"stream": "true"}, "stream"),
    ],
)
async def test_unstreamable_requests_are_400(make_client, wav_bytes, url, fields, param) -> None:
    client = await make_client()
    response = await client.post(
        url, files={"file": ("a.wav", wav_bytes, "audio/wav")}, data=fields
    )
    assert_openai_error(response, 400, param=param)


async def test_stream_false_is_the_plain_response(make_client, wav_bytes) -> None:
    client = await make_client()
    response = await client.post(
        URL, files={"file": ("a.wav", wav_bytes, "audio/wav")}, data={"stream": "false"}
    )
    assert response.status_code == 200
    assert response.json() == {"text": "Hello world."}


async def test_client_leaving_mid_stream_cancels_the_work() -> None:
    runtime = SegmentRuntime(TEXTS)  # never released: blocks after the first segment
    async with serve(runtime) as address:
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client:
            request = client.stream(
                "POST",
                URL,
                files={"file": ("a.wav", make_wav(), "audio/wav")},
                data={"stream": "true"},
            )
            async with request as response:
                await asyncio.wait_for(anext(response.aiter_lines()), 5)
        for _ in range(200):
            if runtime.cancelled:
                break
            await asyncio.sleep(0.01)
        assert runtime.cancelled
