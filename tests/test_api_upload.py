"""The streaming multipart reader on its own."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from app.api.errors import UploadTooLargeError
from app.api.upload import FORM_OVERHEAD_BYTES, MAX_FIELD_BYTES, read_multipart_form
from app.errors import InvalidRequestError

BOUNDARY = "xXxBoundaryxXx"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def make_request(body: bytes, *, chunk: int = 7, content_length: bool = True) -> Request:
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))

    async def receive() -> dict:
        data = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": data, "more_body": bool(chunks)}

    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


async def test_fields_files_and_repeats() -> None:
    body = (
        part("model", b"whisper-1")
        + part("timestamp_granularities[]", b"word")
        + part("timestamp_granularities[]", b"segment")
        + part("prompt", "caf\u00e9".encode())
        + part("file", b"RIFF....", filename="clip.wav")
        + f"--{BOUNDARY}--\r\n".encode()
    )
    form = await read_multipart_form(make_request(body), max_file_bytes=1024)
    assert form.get("model") == "whisper-1"
    assert form.get_all("timestamp_granularities[]") == ["word", "segment"]
    assert form.get("prompt") == "caf\u00e9"
    assert form.get("missing") is None
    assert form.files["file"].data == b"RIFF...."
    assert form.files["file"].filename == "clip.wav"


@pytest.mark.parametrize("content_length", [True, False])
async def test_file_over_limit(content_length: bool) -> None:
    body = part("file", b"\x00" * 2048, filename="a.wav") + f"--{BOUNDARY}--\r\n".encode()
    with pytest.raises(UploadTooLargeError):
        await read_multipart_form(
            make_request(body, content_length=content_length), max_file_bytes=1024
        )


async def test_declared_length_over_limit_reads_nothing() -> None:
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", str(1024 + FORM_OVERHEAD_BYTES + 1).encode()),
    ]
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    with pytest.raises(UploadTooLargeError):
        await read_multipart_form(request, max_file_bytes=1024)
    assert calls == 0


async def test_long_text_field_is_refused() -> None:
    body = part("prompt", b"a" * (MAX_FIELD_BYTES + 1)) + f"--{BOUNDARY}--\r\n".encode()
    with pytest.raises(InvalidRequestError) as info:
        await read_multipart_form(make_request(body, chunk=4096), max_file_bytes=1024)
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        part("model", b"x"),  # no closing boundary
        b"not multipart at all",
        part("model", b"\xff\xfe") + f"--{BOUNDARY}--\r\n".encode(),  # not UTF-8
    ],
)
async def test_malformed(body: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        await read_multipart_form(make_request(body), max_file_bytes=1024)
