"""Successful transcriptions/translations: form -> TranscribeOptions mapping, formats, metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import FakeRuntime, make_wav

from app.config import Settings
from app.decoding.options import DEFAULT_TEMPERATURES
from app.main import create_app
from app.metrics import REQUESTS

TRANSCRIBE = "/v1/audio/transcriptions"
TRANSLATE = "/v1/audio/translations"


def audio_files(data: bytes) -> dict:
    return {"file": ("clip.wav", data, "audio/wav")}


async def test_json_is_the_default_format(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    response = await client.post(
        TRANSCRIBE, files=audio_files(wav_bytes), data={"model": "whisper-1"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["text"] == "Hello world."
    audio, options, limit = runtime.calls[0]
    assert audio.dtype.name == "float32" and audio.ndim == 1
    assert audio.shape[0] == 16_000  # 1 s at 16 kHz
    assert limit == Settings().max_audio_seconds


@pytest.mark.parametrize(
    ("response_format", "content_type", "check"),
    [
        ("text", "text/plain", lambda body: body.strip() == "Hello world."),
        (
            "srt",
            "",
            lambda body: "00:00:00,000 --> 00:00:00,900" in body and "Hello world." in body,
        ),
        (
            "vtt",
            "text/vtt",
            lambda body: body.startswith("WEBVTT") and "00.000 --> " in body and "00.900\n" in body,
        ),
    ],
)
async def test_text_formats(make_client, wav_bytes, response_format, content_type, check) -> None:
    client = await make_client()
    response = await client.post(
        TRANSCRIBE, files=audio_files(wav_bytes), data={"response_format": response_format}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(content_type)
    assert check(response.text), response.text


async def test_verbose_json_with_words_and_segments(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    response = await client.post(
        TRANSCRIBE,
        files=audio_files(wav_bytes),
        data={"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "Hello world."
    assert body["language"] in ("en", "english")
    assert body["duration"] == pytest.approx(1.0)
    assert [w["word"].strip() for w in body["words"]] == ["Hello", "world."]
    assert body["segments"][0]["start"] == 0.0 and body["segments"][0]["end"] == 0.9
    assert runtime.last_options.word_timestamps is True


async def test_segment_granularity_does_not_compute_words(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    await client.post(
        TRANSCRIBE,
        files=audio_files(wav_bytes),
        data={"response_format": "verbose_json", "timestamp_granularities[]": "segment"},
    )
    assert runtime.last_options.word_timestamps is False


async def test_temperature_zero_means_fallback_sequence(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    await client.post(TRANSCRIBE, files=audio_files(wav_bytes), data={"temperature": "0"})
    assert runtime.last_options.temperatures == DEFAULT_TEMPERATURES
    assert runtime.last_options.window.temperature == 0.0


async def test_positive_temperature_is_used_alone(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    await client.post(TRANSCRIBE, files=audio_files(wav_bytes), data={"temperature": "0.3"})
    assert runtime.last_options.temperatures == (0.3,)
    assert runtime.last_options.window.temperature == 0.3


async def test_prompt_language_and_defaults_from_settings(make_client, wav_bytes) -> None:
    runtime = FakeRuntime("base", multilingual=True)
    client = await make_client({"base": runtime}, beam_size=3, vad_long_form=True)
    await client.post(
        TRANSCRIBE,
        files=audio_files(wav_bytes),
        data={"prompt": "Glossary: Thornton.", "language": "French"},
    )
    options = runtime.last_options
    assert options.initial_prompt == "Glossary: Thornton."
    assert options.window.language == "fr"
    assert options.window.task == "transcribe"
    assert options.window.beam_size == 3
    assert options.long_form == "vad"


async def test_vad_gating_settings_reach_the_options(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime}, vad_threshold=0.6, vad_speech_pad_ms=200)
    await client.post(TRANSCRIBE, files=audio_files(wav_bytes))
    vad = runtime.last_options.vad
    assert vad is not None and vad.threshold == 0.6 and vad.speech_pad_ms == 200
    assert vad.min_silence_ms == 2000 and vad.min_speech_ms == 250  # the documented defaults
    off = FakeRuntime()
    client = await make_client({"tiny.en": off}, vad=False)
    await client.post(TRANSCRIBE, files=audio_files(wav_bytes))
    assert off.last_options.vad is None


async def test_english_only_model_accepts_en_and_detects_nothing(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    for language in ("en", "EN", ""):
        response = await client.post(
            TRANSCRIBE, files=audio_files(wav_bytes), data={"language": language}
        )
        assert response.status_code == 200, response.text
        assert runtime.last_options.window.language == "en"


async def test_translation_on_multilingual_model(make_client, wav_bytes) -> None:
    runtime = FakeRuntime("base", multilingual=True)
    client = await make_client({"base": runtime})
    response = await client.post(TRANSLATE, files=audio_files(wav_bytes), data={"model": "base"})
    assert response.status_code == 200, response.text
    assert runtime.last_options.window.task == "translate"
    assert runtime.last_options.window.language is None  # detected


async def test_translation_on_english_only_model_transcribes(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    response = await client.post(TRANSLATE, files=audio_files(wav_bytes))
    assert response.status_code == 200, response.text
    assert runtime.last_options.window.task == "transcribe"


async def test_model_selection_and_alias(make_client, wav_bytes) -> None:
    tiny, base = FakeRuntime("tiny.en"), FakeRuntime("base", multilingual=True)
    client = await make_client({"tiny.en": tiny, "base": base}, default_model="base")
    for model, expected in (("whisper-1", base), ("base", base), ("tiny.en", tiny), (None, base)):
        data = {"model": model} if model else {}
        before = len(expected.calls)
        response = await client.post(TRANSCRIBE, files=audio_files(wav_bytes), data=data)
        assert response.status_code == 200, response.text
        assert len(expected.calls) == before + 1, model


async def test_file_field_without_filename(make_client, wav_bytes) -> None:
    # curl -F 'file=<clip.wav' sends the bytes as a plain field.
    client = await make_client()
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode()
        + wav_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = await client.post(
        TRANSCRIBE,
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text


async def test_request_metrics(make_client, wav_bytes) -> None:
    client = await make_client()
    labels = {"endpoint": TRANSCRIBE, "status": "200"}
    requests_before = REQUESTS.labels(**labels)._value.get()
    response = await client.post(TRANSCRIBE, files=audio_files(make_wav(seconds=2.0)))
    assert response.status_code == 200
    assert REQUESTS.labels(**labels)._value.get() == requests_before + 1

    scrape = (await client.get("/metrics")).text
    assert 'whisper_requests_total{endpoint="/v1/audio/transcriptions",status="200"}' in scrape
    await client.get("/v1/models/tiny.en")
    scrape = (await client.get("/metrics")).text
    assert 'endpoint="/v1/models/{model_id}"' in scrape  # route template, not the raw path


async def test_client_disconnect_cancels_transcription(clean_env, wav_bytes) -> None:
    runtime = FakeRuntime(block=True)
    app = create_app(Settings(models=["tiny.en"]), {"tiny.en": runtime})
    request = httpx.Request("POST", "http://testserver" + TRANSCRIBE, files=audio_files(wav_bytes))
    body = request.read()
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": TRANSCRIBE,
        "raw_path": TRANSCRIBE.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    async with app.router.lifespan_context(app):
        handling = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(runtime.entered.wait(), 5)
        gone.set()
        await asyncio.wait_for(handling, 5)
    assert runtime.cancelled
    assert sent[0]["status"] == 499
