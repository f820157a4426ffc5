"""Log-mel features against independent references: faster-whisper's extractor and HF's filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import cuda_only

from app.audio.features import log_mel_spectrogram, pad_or_trim
from app.audio.mel import mel_filter_bank, mel_filters

DATA = Path(__file__).parent / "data"
CLIPS = ["jfk-inaugural-1961-excerpt.flac", "ljspeech-LJ001-0002.flac"]
# Observed max |ours - faster-whisper| on the fixtures: 1.4e-5 (80 bins), 1.7e-5 (128 bins);
# both sides are float32, so this is float32 rounding in the STFT and mel product.
MAX_ABS_DIFF = 1e-4


def load(name: str) -> np.ndarray:
    sf = pytest.importorskip("soundfile")  # imported here so the CUDA test runs without it
    audio, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16_000
    return audio


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def speechlike(seconds: float) -> np.ndarray:
    """Noise bursts and harmonic tones with gaps: a wide dynamic range, like speech."""
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * 16_000)) / 16_000
    envelope = (np.sin(2 * np.pi * 1.3 * t) > 0.2).astype(np.float32)
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 2100), 1))
    noise = rng.standard_normal(t.size) * 0.05
    return ((0.2 * voiced + noise) * envelope + 1e-4 * rng.standard_normal(t.size)).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def fw_extractor() -> type:
    fw = pytest.importorskip("faster_whisper.feature_extractor")
    return fw.FeatureExtractor


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filters_match_transformers(n_mels: int) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T
    ours = mel_filter_bank(n_mels)
    assert ours.shape == reference.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filters_match_faster_whisper(fw_extractor: type, n_mels: int) -> None:
    reference = fw_extractor.get_mel_filters(16_000, 400, n_mels=n_mels)
    np.testing.assert_allclose(mel_filter_bank(n_mels), reference, rtol=0, atol=1e-10)


def test_filters_are_cached_per_device_and_dtype() -> None:
    assert mel_filters(80) is mel_filters(80, "cpu")
    assert mel_filters(80).dtype == torch.float32
    assert mel_filters(80, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("clip", CLIPS)
def test_matches_faster_whisper(fw_extractor: type, clip: str, n_mels: int) -> None:
    audio = load(clip)
    reference = fw_extractor(feature_size=n_mels)(audio)
    ours = log_mel_spectrogram(audio, n_mels)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == reference.shape == (n_mels, (len(audio) + 160) // 160)
    diff = float(np.abs(ours.numpy() - reference).max())
    assert diff < MAX_ABS_DIFF, f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("length", [1, 7, 199, 200, 401, 16_000])
@pytest.mark.parametrize("padding", [0, 160])
def test_short_and_unpadded_inputs_match(fw_extractor: type, length: int, padding: int) -> None:
    # numpy's reflect padding keeps reflecting when the pad exceeds the signal; ours must too.
    audio = np.random.default_rng(length).standard_normal(length).astype(np.float32) * 0.1
    ours = log_mel_spectrogram(audio, padding=padding).numpy()
    if length + padding < 160:
        assert ours.shape == (80, 0)  # faster-whisper fails on this (max of an empty array)
        return
    reference = fw_extractor()(audio, padding=padding)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < MAX_ABS_DIFF


def test_float64_and_float32_paths_agree() -> None:
    audio = load(CLIPS[0])
    single = log_mel_spectrogram(audio)
    double = log_mel_spectrogram(audio.astype(np.float64))
    assert double.dtype == torch.float32  # output is float32 either way
    assert max_diff(single, double) < MAX_ABS_DIFF


def test_tensor_numpy_and_batch_inputs_agree() -> None:
    a = load(CLIPS[1])
    b = a[::-1].copy()
    from_numpy = log_mel_spectrogram(a)
    assert max_diff(log_mel_spectrogram(torch.from_numpy(a)), from_numpy) == 0.0
    batch = log_mel_spectrogram(np.stack([a, b]))
    assert batch.shape == (2, 80, from_numpy.shape[-1])
    assert max_diff(batch[0], from_numpy) < 1e-5
    assert max_diff(batch[1], log_mel_spectrogram(b)) < 1e-5


def test_normalisation_uses_the_whole_input() -> None:
    # The floor is 8 log10 units below the loudest bin of the whole input (not per 30 s
    # window): next to a part 10^4 times louder in amplitude, a quiet part sits on the floor.
    quiet = 1e-4 * np.random.default_rng(0).standard_normal(16_000).astype(np.float32)
    alone = log_mel_spectrogram(quiet)
    joined = log_mel_spectrogram(np.concatenate([quiet, 1e4 * quiet]))
    floor = float(joined.max()) - 2.0  # (max - 8 + 4) / 4 = normalised max - 2
    assert torch.allclose(joined[:, 5:95], torch.full((80, 90), floor))
    assert float(alone.std()) > 0.05  # on its own it is not clamped


def test_silence_and_empty() -> None:
    silence = log_mel_spectrogram(np.zeros(16_000, np.float32))
    assert torch.all(silence == (-10.0 + 4.0) / 4.0)  # log10(1e-10) floor, normalised
    assert log_mel_spectrogram(np.zeros(0, np.float32), padding=0).shape == (80, 0)
    with pytest.raises(ValueError):
        log_mel_spectrogram(np.zeros((1, 1, 10), np.float32))


def test_pad_or_trim() -> None:
    mel = torch.ones(80, 10)
    padded = pad_or_trim(mel)
    assert padded.shape == (80, 3000) and float(padded[:, 10:].abs().sum()) == 0.0
    assert pad_or_trim(torch.ones(80, 3500)).shape == (80, 3000)
    assert pad_or_trim(mel, 10) is mel
    array = pad_or_trim(np.ones((2, 80, 5), np.float32), 8)
    assert isinstance(array, np.ndarray) and array.shape == (2, 80, 8) and array[..., 5:].sum() == 0


@cuda_only
@pytest.mark.parametrize("n_mels", [80, 128])
def test_cuda_matches_cpu(n_mels: int) -> None:
    audio = speechlike(65.0)
    cpu = log_mel_spectrogram(audio, n_mels)
    gpu = log_mel_spectrogram(audio, n_mels, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert gpu.shape == cpu.shape
    assert max_diff(gpu.cpu(), cpu) < MAX_ABS_DIFF
    on_device = log_mel_spectrogram(torch.from_numpy(audio).cuda(), n_mels)
    assert on_device.device.type == "cuda"
    assert max_diff(on_device.cpu(), cpu) < MAX_ABS_DIFF
    double = log_mel_spectrogram(audio.astype(np.float64), n_mels, device="cuda")
    assert max_diff(double.cpu(), cpu) < MAX_ABS_DIFF
    padded = pad_or_trim(gpu[:, :1000])
    assert padded.device.type == "cuda" and padded.shape == (n_mels, 3000)


@pytest.mark.parametrize("padding", [0, 160, 480])
def test_long_inputs_are_transformed_block_by_block_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, padding: int
) -> None:
    from app.audio import features

    rng = np.random.default_rng(5)
    audio = (0.1 * rng.standard_normal(16_000 * 7 + 123)).astype(np.float32)
    audio[:16_000] = 0.0  # a quiet start: the floor comes from the whole input
    whole = features.log_mel_spectrogram(audio, 80, padding=padding)
    monkeypatch.setattr(features, "BLOCK_FRAMES", 300)  # 3.75 blocks, reflected at both ends
    blocked = features.log_mel_spectrogram(audio, 80, padding=padding)
    assert blocked.shape == whole.shape
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)
