"""Log-mel features against independent references: faster-whisper's extractor and HF's filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from app.audio.features import log_mel_spectrogram, pad_or_trim
from app.audio.mel import mel_filter_bank, mel_filters

DATA = Path(__file__).parent / "data"
CLIPS = ["jfk-inaugural-1961-excerpt.flac", "ljspeech-LJ001-0002.flac"]
# Observed max |ours - faster-whisper| on the fixtures: 1.4e-5 (80 bins), 1.7e-5 (128 bins);
# both sides are float32, so this is float32 rounding in the STFT and mel product.
MAX_ABS_DIFF = 1e-4


def load(name: str) -> np.ndarray:
    audio, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16_000
    return audio


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
    reference = fw_extractor()(audio, padding=padding)
    ours = log_mel_spectrogram(audio, padding=padding).numpy()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < MAX_ABS_DIFF


def test_float64_and_float32_paths_agree() -> None:
    audio = load(CLIPS[0])
    single = log_mel_spectrogram(audio)
    double = log_mel_spectrogram(audio.astype(np.float64))
    assert double.dtype == torch.float32  # output is float32 either way
    assert float((single - double).abs().max()) < MAX_ABS_DIFF


def test_tensor_numpy_and_batch_inputs_agree() -> None:
    a, b = load(CLIPS[1]), load(CLIPS[1])[::-1].copy()
    from_numpy = log_mel_spectrogram(a)
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(a)), from_numpy)
    batch = log_mel_spectrogram(np.stack([a, b]))
    assert batch.shape == (2, 80, from_numpy.shape[-1])
    torch.testing.assert_close(batch[0], from_numpy)
    torch.testing.assert_close(batch[1], log_mel_spectrogram(b))


def test_normalisation_uses_the_whole_input() -> None:
    # The -8 floor is relative to the loudest bin of the whole file, not per 30 s window.
    quiet = 1e-3 * np.random.default_rng(0).standard_normal(16_000).astype(np.float32)
    loud = np.concatenate([quiet, 100 * quiet])
    alone = log_mel_spectrogram(quiet)
    joined = log_mel_spectrogram(loud)[:, :50]
    assert float(joined.max()) < float(alone.max()) - 0.5


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_mels", [80, 128])
def test_cuda_matches_cpu(n_mels: int) -> None:
    audio = load(CLIPS[0])
    cpu = log_mel_spectrogram(audio, n_mels)
    gpu = log_mel_spectrogram(audio, n_mels, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert float((gpu.cpu() - cpu).abs().max()) < MAX_ABS_DIFF
    on_device = log_mel_spectrogram(torch.from_numpy(audio).cuda(), n_mels)
    assert on_device.device.type == "cuda"
