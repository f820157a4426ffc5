"""Streaming multipart/form-data reader that enforces the upload size limit as bytes arrive.

Starlette's `request.form()` reads the whole body before anyone can look at its size, so a
client could make us buffer gigabytes. Here the Content-Length is checked first, then every
chunk is counted as it arrives, and the request is refused (413) the moment it passes the
limit; the rest of the body is never read (the server then closes the connection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.api.errors import UploadTooLargeError
from app.constants import MIB
from app.errors import InvalidRequestError

#: Room for the multipart framing and the small text fields on top of the file limit.
FORM_OVERHEAD_BYTES = MIB
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


@dataclass
class UploadedFile:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class MultipartForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def get_all(self, name: str) -> list[str]:
        return self.fields.get(name, [])


def _too_large(limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(
        f"Maximum upload size is {limit / MIB:g} MB; the request body is larger.",
        param="file",
    )


def _check_content_length(request: Request, max_body: int, max_file_bytes: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return  # chunked: counted while streaming
    try:
        length = int(raw)
    except ValueError:
        raise InvalidRequestError("Invalid Content-Length header") from None
    if length > max_body:
        raise _too_large(max_file_bytes)


class _FormBuilder:
    """python-multipart callbacks that assemble parts and enforce per-part limits."""

    def __init__(self, file_fields: frozenset[str], max_file_bytes: int) -> None:
        self.form = MultipartForm()
        self.finished = False
        self._file_fields = file_fields
        self._max_file_bytes = max_file_bytes
        self._parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise InvalidRequestError(f"Too many form fields (more than {MAX_PARTS})")
        self._headers = {}
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise InvalidRequestError("Malformed multipart body: a part has no form-data name")
        self._name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        # `-F file=<clip.wav` in curl sends the audio without a filename: go by the field name too.
        self._is_file = self._filename is not None or self._name in self._file_fields

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if self._is_file:
            if len(self._data) > self._max_file_bytes:
                raise _too_large(self._max_file_bytes)
        elif len(self._data) > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"Form field '{self._name}' is too long", param=self._name)

    def _part_end(self) -> None:
        if self._is_file:
            content_type = self._headers.get(b"content-type")
            self.form.files[self._name] = UploadedFile(
                filename=self._filename,
                content_type=content_type.decode("latin-1") if content_type else None,
                data=bytes(self._data),
            )
        else:
            try:
                value = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(
                    f"Form field '{self._name}' is not UTF-8", param=self._name
                ) from None
            self.form.fields.setdefault(self._name, []).append(value)
        self._data = bytearray()

    def _end(self) -> None:
        self.finished = True


async def read_multipart_form(
    request: Request, *, max_file_bytes: int, file_fields: frozenset[str] = frozenset({"file"})
) -> MultipartForm:
    """Parse a multipart/form-data body, refusing it (413) as soon as it exceeds the limits.

    Raises starlette.requests.ClientDisconnect if the client goes away mid-upload.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "Expected a multipart/form-data body (send the audio as the 'file' field)",
            param="file",
        )
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    _check_content_length(request, max_body, max_file_bytes)

    builder = _FormBuilder(file_fields, max_file_bytes)
    received = 0
    try:
        parser = MultipartParser(boundary, builder.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise _too_large(max_file_bytes)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidRequestError(f"Malformed multipart body: {exc}") from None
    if not builder.finished:
        raise InvalidRequestError("Malformed multipart body: it ends before the closing boundary")
    return builder.form
