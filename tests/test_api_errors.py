"""Every error status the API returns, with the exact OpenAI body shape (fake runtime)."""

from __future__ import annotations

import pytest
from conftest import FakeRuntime, assert_openai_error, make_wav

from app.api.registry import Phase
from app.errors import QueueFullError, ShuttingDownError

URL = "/v1/audio/transcriptions"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 600


def audio_files(data: bytes, filename: str = "clip.wav") -> dict:
    return {"file": (filename, data, "audio/wav")}


# --- 400 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": "1.5"}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"timestamp_granularities[]": "sentence"}, "timestamp_granularities[]"),
        ({"language": "klingon"}, "language"),
        ({"language": "fr"}, "language"),  # tiny.en is English-only
        ({"stream": "maybe"}, "stream"),
    ],
)
async def test_bad_parameter_is_400(make_client, wav_bytes, fields, param) -> None:
    client = await make_client()
    response = await client.post(URL, files=audio_files(wav_bytes), data=fields)
    assert_openai_error(response, 400, param=param, error_type="invalid_request_error")


async def test_language_unknown_to_multilingual_model_is_400(make_client, wav_bytes) -> None:
    client = await make_client({"base": FakeRuntime("base", multilingual=True)})
    response = await client.post(URL, files=audio_files(wav_bytes), data={"language": "sw"})
    assert_openai_error(response, 400, param="language")


async def test_missing_file_is_400(make_client) -> None:
    client = await make_client()
    response = await client.post(URL, data={"model": "whisper-1"}, files={"other": ("x", b"1")})
    assert_openai_error(response, 400, param="file")


async def test_empty_file_is_400(make_client) -> None:
    client = await make_client()
    response = await client.post(URL, files=audio_files(b""))
    assert_openai_error(response, 400, param="file")


async def test_not_multipart_is_400(make_client) -> None:
    client = await make_client()
    response = await client.post(URL, json={"file": "clip.wav"})
    assert_openai_error(response, 400, param="file")


async def test_truncated_multipart_is_400(make_client, wav_bytes) -> None:
    client = await make_client()
    request = client.build_request("POST", URL, files=audio_files(wav_bytes))
    body = request.read()[:-40]  # cut the closing boundary off
    response = await client.post(
        URL, content=body, headers={"content-type": request.headers["content-type"]}
    )
    assert_openai_error(response, 400, param=None)


async def test_undecodable_audio_is_400(make_client) -> None:
    client = await make_client()
    # Says WAVE, then garbage where the fmt chunk should be.
    corrupt = b"RIFF\x24\x00\x00\x00WAVE" + bytes(range(256)) * 4
    response = await client.post(URL, files=audio_files(corrupt))
    assert_openai_error(response, 400, param="file", code="invalid_audio")


async def test_fastapi_validation_error_is_400_not_422(make_client) -> None:
    client = await make_client()

    @client.app.get("/_test/validation")
    async def needs_int(count: int) -> dict:
        return {"count": count}

    response = await client.get("/_test/validation", params={"count": "many"})
    assert_openai_error(response, 400, param="count", code="invalid_value")


# --- 401 --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic c2VjcmV0"},
        {"Authorization": "Bearer "},
    ],
)
async def test_bad_or_missing_api_key_is_401(make_client, wav_bytes, headers) -> None:
    client = await make_client(api_key="secret")
    for response in (
        await client.post(URL, files=audio_files(wav_bytes), headers=headers),
        await client.get("/v1/models", headers=headers),
    ):
        assert_openai_error(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_good_api_key_passes_and_probes_stay_open(make_client, wav_bytes) -> None:
    client = await make_client(api_key="secret")
    ok = await client.post(
        URL, files=audio_files(wav_bytes), headers={"Authorization": "Bearer secret"}
    )
    assert ok.status_code == 200, ok.text
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status_code == 200, path


# --- 404 / 405 --------------------------------------------------------------------------------


async def test_unknown_model_is_404(make_client, wav_bytes) -> None:
    client = await make_client()
    response = await client.post(URL, files=audio_files(wav_bytes), data={"model": "large-v9"})
    assert_openai_error(
        response, 404, param="model", code="model_not_found", error_type="invalid_request_error"
    )


async def test_unknown_path_is_404(make_client) -> None:
    client = await make_client()
    assert_openai_error(await client.get("/v1/nothing"), 404, code="not_found")


async def test_wrong_method_is_405(make_client) -> None:
    client = await make_client()
    assert_openai_error(await client.get(URL), 405, code="method_not_allowed")


# --- 413 --------------------------------------------------------------------------------------


async def test_content_length_over_limit_is_413_before_reading(make_client) -> None:
    client = await make_client(max_upload_mb=0.01)
    big = make_wav(seconds=60)  # ~1.9 MB against a ~10 kB limit (+1 MiB form overhead)
    response = await client.post(URL, files=audio_files(big))
    assert_openai_error(response, 413, param="file", code="upload_too_large")


async def test_chunked_upload_over_limit_is_413_while_streaming(make_client, wav_bytes) -> None:
    client = await make_client(max_upload_mb=0.5)
    boundary = "testboundary"
    chunk = b"\x00" * 64 * 1024
    total_chunks = 200  # 12.5 MiB if anyone read it all
    sent = 0

    async def body():
        nonlocal sent
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        for _ in range(total_chunks):
            sent += 1
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    response = await client.post(
        URL, content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert "content-length" not in response.request.headers  # really chunked
    assert_openai_error(response, 413, param="file", code="upload_too_large")
    # Refused at ~0.5 MB: the server stopped pulling the body long before its end.
    assert sent < 20


async def test_audio_longer_than_limit_is_413(make_client) -> None:
    client = await make_client(max_audio_seconds=0.5)
    response = await client.post(URL, files=audio_files(make_wav(seconds=2.0)))
    assert_openai_error(response, 413, param="file", code="audio_too_long")


# --- 415 --------------------------------------------------------------------------------------


async def test_unsupported_media_is_415(make_client) -> None:
    client = await make_client()
    response = await client.post(URL, files={"file": ("picture.png", PNG, "image/png")})
    assert_openai_error(response, 415, param="file", code="unsupported_media_type")


# --- 503 --------------------------------------------------------------------------------------


async def test_queue_full_is_503_with_retry_after(make_client, wav_bytes) -> None:
    runtime = FakeRuntime(error=QueueFullError("Queue is full", retry_after_s=2.5))
    client = await make_client({"tiny.en": runtime})
    response = await client.post(URL, files=audio_files(wav_bytes))
    assert_openai_error(response, 503, code="queue_full", error_type="server_error")
    assert response.headers["retry-after"] == "3"


async def test_runtime_shutting_down_is_503(make_client, wav_bytes) -> None:
    client = await make_client({"tiny.en": FakeRuntime(error=ShuttingDownError("stopping"))})
    response = await client.post(URL, files=audio_files(wav_bytes))
    assert_openai_error(response, 503, code="shutting_down")
    assert int(response.headers["retry-after"]) >= 1


async def test_draining_service_is_503(make_client, wav_bytes) -> None:
    runtime = FakeRuntime()
    client = await make_client({"tiny.en": runtime})
    client.app.state.registry.phase = Phase.DRAINING
    response = await client.post(URL, files=audio_files(wav_bytes))
    assert_openai_error(response, 503, code="shutting_down")
    assert "retry-after" in response.headers
    assert runtime.calls == []


# --- 500 --------------------------------------------------------------------------------------


async def test_unexpected_error_is_500_server_error(make_client, wav_bytes, caplog) -> None:
    runtime = FakeRuntime(error=RuntimeError("CUDA exploded: secret internals"))
    client = await make_client({"tiny.en": runtime}, raise_app_exceptions=False)
    response = await client.post(URL, files=audio_files(wav_bytes))
    error = assert_openai_error(response, 500, error_type="server_error")
    assert "secret internals" not in error["message"]


async def test_error_counter_counts_by_code(make_client, wav_bytes) -> None:
    from app.metrics import ERRORS

    client = await make_client()
    before = ERRORS.labels(type="model_not_found")._value.get()
    await client.post(URL, files=audio_files(wav_bytes), data={"model": "nope"})
    assert ERRORS.labels(type="model_not_found")._value.get() == before + 1
