"""Recognise a file's type from its first bytes, so obvious non-audio gets a 415, not a 400.

Decoders (libsndfile, FFmpeg) are poor judges here: FFmpeg will happily "open" a PNG as a
one-frame video or a text file as ANSI art, and then the caller only learns that there is
no audio stream. Sniffing first gives the client the honest answer: wrong kind of file.
"""

from __future__ import annotations

from collections.abc import Callable

#: How many leading bytes `sniff_media` looks at; callers should pass at least this many.
SNIFF_BYTES: int = 512

# Formats recognised by a fixed prefix (RIFF and ISO BMFF have dedicated checks below).
_PREFIXES: tuple[tuple[bytes, str], ...] = (
    # --- audio / video ---
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"ID3", "audio/mpeg"),
    (b"FORM", "audio/aiff"),  # IFF: AIFF/AIFC (and 8SVX), all audio in practice
    (b".snd", "audio/basic"),
    (b"caff", "audio/x-caf"),
    (b"#!AMR", "audio/amr"),
    (b"MAC ", "audio/x-ape"),
    (b"wvpk", "audio/x-wavpack"),
    (b"TTA1", "audio/x-tta"),
    (b"MThd", "audio/midi"),  # MIDI has no waveform; the decoders reject it as no audio
    (b"\x1a\x45\xdf\xa3", "video/webm"),  # EBML: Matroska / WebM
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "video/x-ms-asf"),  # ASF: WMA / WMV
    (b"FLV\x01", "video/x-flv"),
    (b"\x00\x00\x01\xba", "video/mpeg"),  # MPEG program stream
    (b"NIST_1A", "audio/x-nist"),
    (b"riff\x2e\x91\xcf\x11", "audio/x-w64"),  # Sony Wave64
    (b"RF64", "audio/wav"),
    (b"BW64", "audio/wav"),
    # --- clearly not audio ---
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"8BPS", "image/vnd.adobe.photoshop"),
    (b"%PDF-", "application/pdf"),
    (b"%!PS", "application/postscript"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),  # empty archive
    (b"\x1f\x8b", "application/gzip"),
    (b"BZh", "application/x-bzip2"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"\x28\xb5\x2f\xfd", "application/zstd"),
    (b"\x7fELF", "application/x-elf"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),  # legacy MS Office
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (b"wOFF", "font/woff"),
    (b"wOF2", "font/woff2"),
    (b"\x00asm", "application/wasm"),
)

_RIFF_KINDS: dict[bytes, str] = {
    b"WAVE": "audio/wav",
    b"AVI ": "video/x-msvideo",
    b"WEBP": "image/webp",
    b"RMID": "audio/midi",
}

# ISO BMFF major brands that are audio-only; every other brand is treated as video/mp4,
# which is still something FFmpeg can pull an audio track out of.
_AUDIO_BRANDS: frozenset[bytes] = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
_IMAGE_BRANDS: frozenset[bytes] = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}
)

# Byte values that never appear in text (C0 controls other than \t \n \f \r and ESC).
_BINARY_BYTES: frozenset[int] = frozenset(set(range(0x00, 0x20)) - {0x09, 0x0A, 0x0C, 0x0D, 0x1B})


def _riff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and len(head) >= 12:
        # An unknown form type is more likely a damaged WAV than some other file type.
        return _RIFF_KINDS.get(head[8:12])
    return None


def _iso_bmff(head: bytes) -> str | None:
    if head[4:8] != b"ftyp" or len(head) < 12:
        return None
    brand = head[8:12]
    if brand in _AUDIO_BRANDS:
        return "audio/mp4"
    if brand in _IMAGE_BRANDS:
        return "image/heif"
    if brand.startswith(b"3g"):
        return "video/3gpp"
    if brand == b"qt  ":
        return "video/quicktime"
    return "video/mp4"


def _mpeg_audio_or_adts(head: bytes) -> str | None:
    # 11-bit frame sync. Layer bits 00 with sync means ADTS (AAC); anything else MPEG audio.
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio/aac" if (head[1] & 0x06) == 0 else "audio/mpeg"
    return None


def _mpeg_ts(head: bytes) -> str | None:
    # Transport stream: 0x47 sync byte every 188 bytes; one sync byte alone is just a "G".
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return "video/mp2t"
    return None


def _utf16_text(head: bytes) -> str | None:
    # A UTF-16 BOM (FF FE) also looks like an MPEG layer-I frame sync, so insist that what
    # follows decodes as printable UTF-16 before calling it text.
    if not head.startswith((b"\xff\xfe", b"\xfe\xff")) or len(head) < 4:
        return None
    encoding = "utf-16-le" if head[0] == 0xFF else "utf-16-be"
    body = head[2 : 2 + (len(head) - 2) // 2 * 2]
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError:
        return None
    return "text/plain" if _printable(text) else None


def _printable(text: str) -> bool:
    return all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


def _text(head: bytes) -> str | None:
    """Classify `head` as text if it is entirely printable UTF-8."""
    body = head.removeprefix(b"\xef\xbb\xbf")
    if not body or any(b in _BINARY_BYTES for b in body):
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The head may end in the middle of a multi-byte character; anything else is binary.
        if exc.start < len(body) - 3:
            return None
        text = body[: exc.start].decode("utf-8")
    stripped = text.lstrip().lower()
    if stripped.startswith(("{", "[")):
        return "application/json"
    if stripped.startswith(("<!doctype html", "<html", "<head", "<body")):
        return "text/html"
    if stripped.startswith("<?xml") or stripped.startswith("<svg"):
        return "application/xml"
    if stripped.startswith("webvtt"):
        return "text/vtt"
    return "text/plain"


_CHECKS: tuple[Callable[[bytes], str | None], ...] = (
    _utf16_text,
    _mpeg_audio_or_adts,
    _mpeg_ts,
    _text,
)


def sniff_media(head: bytes) -> str | None:
    """Best-guess MIME type of a file from its first bytes, or None when unrecognised.

    Pass at least `SNIFF_BYTES` bytes when the file has them. Audio and video containers come
    back as ``audio/*`` / ``video/*``; everything else recognised (images, documents,
    archives, executables, text) comes back under its own type. Use `is_audio_or_video` to
    decide whether to try decoding: an unrecognised head (None) should still be tried.
    """
    # Box/chunk-structured containers first: their leading size field can be any bytes.
    mime = _riff(head) or _iso_bmff(head)
    if mime is not None:
        return mime
    for prefix, prefix_mime in _PREFIXES:
        if head.startswith(prefix):
            return prefix_mime
    for check in _CHECKS:
        mime = check(head)
        if mime is not None:
            return mime
    return None


def is_audio_or_video(mime: str | None) -> bool:
    """True for media types a decoder may find audio in (and for unknown = None)."""
    return mime is None or mime.startswith(("audio/", "video/"))
