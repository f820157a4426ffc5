"""Decoding: formats, downmix/resampling, error classes, sniffing and PCM helpers."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from app.audio.decode import decode_audio, pcm16_to_float, resample, sniff_media
from app.audio.pcm import float_to_pcm16
from app.audio.resample import StreamResampler
from app.audio.sniff import is_audio_or_video
from app.errors import AudioDecodeError, AudioTooLongError, UnsupportedMediaError

DATA = Path(__file__).parent / "data"
SR = 16_000


def sine(
    seconds: float, sample_rate: int = SR, freq: float = 440.0, amp: float = 0.3
) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(audio: np.ndarray, sample_rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * sample_rate / len(audio))


def encode_sf(audio: np.ndarray, fmt: str, subtype: str, sample_rate: int = SR) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def encode_av(audio: np.ndarray, sample_rate: int, container: str, codec: str) -> bytes:
    """Encode mono float audio with FFmpeg (PyAV converts to the codec's sample format)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate, layout="mono")
        for i in range(0, len(audio), 960):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(audio[None, i : i + 960]), format="fltp", layout="mono"
            )
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def video_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


# --- WAV variants --------------------------------------------------------------------------


def test_wav_int16_is_exact() -> None:
    pcm = (sine(0.5) * 32767).astype("<i2")
    audio = decode_audio(encode_sf(pcm, "WAV", "PCM_16"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    np.testing.assert_array_equal(audio, pcm.astype(np.float32) / 32768.0)


def test_wav_float_is_exact() -> None:
    x = sine(0.5)
    np.testing.assert_array_equal(decode_audio(encode_sf(x, "WAV", "FLOAT")), x)


def test_wav_stereo_is_averaged_to_mono() -> None:
    left, right = sine(0.5, freq=300.0), sine(0.5, freq=500.0, amp=0.1)
    audio = decode_audio(encode_sf(np.stack([left, right], axis=1), "WAV", "FLOAT"))
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-7)


def test_wav_44k_is_resampled_to_16k() -> None:
    audio = decode_audio(encode_sf(sine(2.0, 44_100, freq=1000.0), "WAV", "PCM_16", 44_100))
    assert abs(len(audio) - 2 * SR) <= 1
    assert dominant_hz(audio) == pytest.approx(1000.0, abs=1.0)
    assert np.abs(audio[SR // 2 : -SR // 2]).max() == pytest.approx(0.3, abs=0.01)


def test_other_target_rate() -> None:
    audio = decode_audio(encode_sf(sine(1.0), "WAV", "PCM_16"), sample_rate=24_000)
    assert len(audio) == 24_000


def test_non_finite_float_samples_are_zeroed() -> None:
    x = sine(0.1)
    x[10], x[20] = np.nan, np.inf
    audio = decode_audio(encode_sf(x, "WAV", "FLOAT"))
    assert np.isfinite(audio).all() and audio[10] == 0.0 and audio[20] == 1.0


def test_silent_audio_is_valid() -> None:
    audio = decode_audio(encode_sf(np.zeros(SR, np.float32), "WAV", "PCM_16"))
    assert len(audio) == SR and not audio.any()


# --- other formats -------------------------------------------------------------------------


def test_flac_fixture_matches_soundfile() -> None:
    path = DATA / "ljspeech-LJ001-0002.flac"
    expected, rate = sf.read(path, dtype="float32")
    assert rate == SR
    np.testing.assert_array_equal(decode_audio(path), expected)
    np.testing.assert_array_equal(decode_audio(str(path)), expected)
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(decode_audio(fh), expected)
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), expected)


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III"), ("FLAC", "PCM_24")],
)
def test_soundfile_formats(fmt: str, subtype: str) -> None:
    audio = decode_audio(encode_sf(sine(1.0, 48_000), fmt, subtype, 48_000))
    assert abs(len(audio) - SR) < 0.05 * SR  # codec priming/padding may add a little
    assert dominant_hz(audio) == pytest.approx(440.0, abs=2.0)


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [
        ("ipod", "aac", 44_100),  # .m4a
        ("mp4", "aac", 48_000),
        ("adts", "aac", 48_000),  # raw .aac
        ("webm", "libopus", 48_000),
        ("mp3", "libmp3lame", 22_050),
    ],
)
def test_ffmpeg_formats(container: str, codec: str, rate: int) -> None:
    data = encode_av(sine(1.0, rate), rate, container, codec)
    assert is_audio_or_video(sniff_media(data[:512]))
    audio = decode_audio(data)
    assert abs(len(audio) - SR) < 0.1 * SR  # AAC adds 1024 priming samples
    assert dominant_hz(audio) == pytest.approx(440.0, abs=2.0)


# --- errors --------------------------------------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"")


def test_zero_length_audio() -> None:
    with pytest.raises(AudioDecodeError, match="no samples"):
        decode_audio(encode_sf(np.zeros(0, np.float32), "WAV", "PCM_16"))


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(4000),  # unknown bytes
        b"RIFF" + np.random.default_rng(1).bytes(4000),  # claims RIFF, is garbage
        b"OggS" + np.random.default_rng(2).bytes(4000),
        b"fLaC" + np.random.default_rng(3).bytes(4000),
        b"ID3\x04\x00\x00\x00\x00\x00\x10" + np.random.default_rng(4).bytes(4000),
    ],
    ids=["random", "riff", "ogg", "flac", "id3"],
)
def test_corrupt_bytes(data: bytes) -> None:
    with pytest.raises(AudioDecodeError, match="corrupt") as info:
        decode_audio(data)
    assert info.value.status_code == 400
    assert "<_io" not in info.value.message  # library reprs are cleaned out


def test_truncated_wav_returns_the_decodable_prefix() -> None:
    data = encode_sf(sine(2.0), "WAV", "PCM_16")
    audio = decode_audio(data[: 44 + 2 * SR])  # header + 1 s of samples
    assert len(audio) == SR


def test_streamed_wav_with_unknown_length() -> None:
    # Writers that stream (ffmpeg to a pipe) put 0xFFFFFFFF in the RIFF and data sizes.
    data = bytearray(encode_sf(sine(3.0), "WAV", "PCM_16"))
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    assert len(decode_audio(bytes(data), max_duration_s=5)) == 3 * SR
    with pytest.raises(AudioTooLongError):
        decode_audio(bytes(data), max_duration_s=2)


def test_truncated_wav_header_is_an_error() -> None:
    data = encode_sf(sine(2.0), "WAV", "PCM_16")
    with pytest.raises(AudioDecodeError):
        decode_audio(data[:30])


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS")]
)
def test_truncated_compressed_returns_a_prefix(fmt: str, subtype: str) -> None:
    # Some noise makes the bitstream dense (a pure tone packs seconds into one Ogg page).
    noise = 0.02 * np.random.default_rng(0).standard_normal(10 * SR).astype(np.float32)
    data = encode_sf(sine(10.0) + noise, fmt, subtype)
    audio = decode_audio(data[: len(data) // 2])
    assert 2 * SR < len(audio) < 8 * SR
    assert dominant_hz(audio) == pytest.approx(440.0, abs=2.0)


def test_flac_cut_inside_first_frame_is_an_error() -> None:
    data = encode_sf(sine(2.0), "FLAC", "PCM_16")
    with pytest.raises(AudioDecodeError, match="corrupt"):
        decode_audio(data[:100])


def test_container_without_audio_stream() -> None:
    with pytest.raises(AudioDecodeError, match="no audio stream"):
        decode_audio(video_only_mp4())


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64), "image/jpeg"),
        (b"GIF89a" + bytes(64), "image/gif"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        (b"PK\x03\x04" + bytes(64), "application/zip"),
        (b"hello, this is a text file\n", "text/plain"),
        (b'{"text": "not audio"}', "application/json"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "text/html"),
        ("UTF-16 text".encode("utf-16"), "text/plain"),
    ],
)
def test_non_audio_is_415(data: bytes, mime: str) -> None:
    assert sniff_media(data) == mime
    with pytest.raises(UnsupportedMediaError) as info:
        decode_audio(data)
    assert info.value.status_code == 415 and mime in info.value.message


def test_sniff_audio_types() -> None:
    assert sniff_media(encode_sf(sine(0.1), "WAV", "PCM_16")) == "audio/wav"
    assert sniff_media(encode_sf(sine(0.1), "FLAC", "PCM_16")) == "audio/flac"
    assert sniff_media(encode_sf(sine(0.1), "OGG", "VORBIS")) == "audio/ogg"
    assert sniff_media(b"\x1a\x45\xdf\xa3rest") == "video/webm"
    assert sniff_media(b"\x00\x00\x00\x20ftypM4A \x00\x00") == "audio/mp4"
    assert sniff_media(b"\x00\x00\x00\x18ftypisom\x00\x00") == "video/mp4"
    assert sniff_media(b"\x00\x00\x00\x18ftypheic\x00\x00") == "image/heif"
    assert sniff_media(b"\xff\xfb\x90\x64" + bytes(32)) == "audio/mpeg"
    assert sniff_media(b"\xff\xf1\x50\x80" + bytes(32)) == "audio/aac"
    assert sniff_media(b"\x01\x02\x03\x04") is None
    assert is_audio_or_video(None) and not is_audio_or_video("image/png")


def test_too_long_from_header() -> None:
    data = encode_sf(np.zeros(40 * SR, np.float32), "WAV", "PCM_16")
    with pytest.raises(AudioTooLongError) as info:
        decode_audio(data, max_duration_s=30)
    assert info.value.status_code == 413 and "40.0 s" in info.value.message


def test_too_long_found_while_decoding() -> None:
    # WebM/Opus written by FFmpeg to a non-seekable buffer has no duration in its header,
    # so only the decoded sample count can catch it.
    data = encode_av(sine(3.0, 48_000), 48_000, "webm", "libopus")
    with pytest.raises(AudioTooLongError):
        decode_audio(data, max_duration_s=2.0)


def test_exactly_at_limit_is_accepted() -> None:
    data = encode_sf(np.zeros(30 * SR, np.float32), "WAV", "PCM_16")
    assert len(decode_audio(data, max_duration_s=30)) == 30 * SR


def test_missing_path_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="Cannot read"):
        decode_audio(tmp_path / "missing.wav")


# --- PCM and resampling helpers -------------------------------------------------------------


def test_pcm16_roundtrip() -> None:
    data = np.array([0, 1, -1, 32767, -32768], dtype="<i2").tobytes()
    np.testing.assert_array_equal(
        pcm16_to_float(data), np.array([0, 1, -1, 32767, -32768], np.float32) / 32768
    )
    assert float_to_pcm16(pcm16_to_float(data)) == data
    with pytest.raises(AudioDecodeError, match="even"):
        pcm16_to_float(b"\x00\x01\x02")


def test_resample_24k_pcm_to_16k() -> None:
    audio = pcm16_to_float(float_to_pcm16(sine(1.0, 24_000, freq=800.0)))
    out = resample(audio, 24_000, SR)
    assert out.dtype == np.float32 and len(out) == SR
    assert dominant_hz(out) == pytest.approx(800.0, abs=1.0)
    assert resample(audio, 24_000, 24_000) is not None
    with pytest.raises(ValueError):
        resample(audio, 0, SR)


def test_stream_resampler_matches_whole_signal() -> None:
    audio = sine(1.0, 24_000, freq=800.0)
    stream = StreamResampler(24_000, SR)
    pieces = [stream.process(audio[i : i + 480]) for i in range(0, len(audio), 480)]
    streamed = np.concatenate([*pieces, stream.flush()])
    whole = resample(audio, 24_000, SR)
    assert abs(len(streamed) - len(whole)) <= 1
    n = min(len(streamed), len(whole))
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-3
