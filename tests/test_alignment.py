"""Word alignment: DTW, median filter, punctuation merging, and find_alignment on synthetic attention.

Everything but the last test runs without a model: a fake cross_attention callable returns
attention maps where each token attends to a known block of frames, so the expected word times
are known exactly.
"""

from __future__ import annotations

import string
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.decoding.alignment import (
    SegmentWords,
    WordTiming,
    add_word_timestamps,
    dtw,
    find_alignment,
    median_filter,
    merge_punctuations,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- reference implementations (plain loops, written for clarity not speed) ------------------


def reference_dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's DTW as a cell-by-cell double loop, including its tie-breaking."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.int64)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = float(x[i - 1, j - 1]) + float(c)
            trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    arr = np.array(path[::-1])
    return arr[:, 0], arr[:, 1]


def naive_median_filter(x: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    out = np.empty_like(x)
    length = x.shape[-1]
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        for t in range(length):
            window = []
            for k in range(t - pad, t + pad + 1):
                # reflect padding without repeating the edge sample (numpy "reflect")
                if k < 0:
                    k = -k
                elif k >= length:
                    k = 2 * (length - 1) - k
                window.append(row[k])
            out[idx + (t,)] = sorted(window)[pad]
    return out


# --- dtw -------------------------------------------------------------------------------------


def test_dtw_clear_diagonal() -> None:
    # off-path cells cost more than on-path ones, so no detour ties with the diagonal
    text, times = dtw(1 - 2 * np.eye(5))
    np.testing.assert_array_equal(text, np.arange(5))
    np.testing.assert_array_equal(times, np.arange(5))


def test_dtw_follows_blocks_in_a_wide_matrix() -> None:
    # 3 tokens over 9 frames: token 0 in frames 0-1, token 1 in 2-5, token 2 in 6-8.
    cost = np.ones((3, 9))
    cost[0, 0:2] = cost[1, 2:6] = cost[2, 6:9] = -1
    text, times = dtw(cost)
    np.testing.assert_array_equal(text, [0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(times, np.arange(9))


def test_dtw_tall_matrix_moves_up() -> None:
    # More tokens than frames: the path must stack tokens onto frames.
    cost = np.ones((4, 2))
    cost[:2, 0] = cost[2:, 1] = -1
    text, times = dtw(cost)
    np.testing.assert_array_equal(text, [0, 1, 2, 3])
    np.testing.assert_array_equal(times, [0, 0, 1, 1])


def test_dtw_plateau_breaks_ties_like_whisper() -> None:
    # A flat matrix: every predecessor ties, and Whisper then prefers the left step, so the
    # path runs up the first column and along the last row.
    text, times = dtw(np.zeros((2, 3)))
    np.testing.assert_array_equal(text, [0, 1, 1, 1])
    np.testing.assert_array_equal(times, [0, 0, 1, 2])

    # A plateau between two clear anchors: frames 1-2 cost the same for both tokens, so every
    # switch point ties; the tie rule hands the plateau to the earlier token.
    cost = np.array([[-1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, -1.0]])
    text, times = dtw(cost)
    np.testing.assert_array_equal(text, [0, 0, 0, 1])
    np.testing.assert_array_equal(times, [0, 1, 2, 3])


def test_dtw_single_row_and_column() -> None:
    text, times = dtw(np.array([[3.0, 1.0, 2.0]]))
    np.testing.assert_array_equal(text, [0, 0, 0])
    np.testing.assert_array_equal(times, [0, 1, 2])
    text, times = dtw(np.array([[3.0], [1.0], [2.0]]))
    np.testing.assert_array_equal(text, [0, 1, 2])
    np.testing.assert_array_equal(times, [0, 0, 0])
    text, times = dtw(np.zeros((0, 4)))
    assert text.size == times.size == 0


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (12, 40), (30, 30)])
@pytest.mark.parametrize("integer_costs", [False, True])
def test_dtw_matches_reference_loop(shape: tuple[int, int], integer_costs: bool) -> None:
    rng = np.random.default_rng(sum(shape) + integer_costs)
    for _ in range(5):
        # small integers create many exact ties, the part most likely to diverge
        x = (
            rng.integers(-2, 3, size=shape).astype(float)
            if integer_costs
            else rng.standard_normal(shape)
        )
        text, times = dtw(x)
        ref_text, ref_times = reference_dtw(x)
        np.testing.assert_array_equal(text, ref_text)
        np.testing.assert_array_equal(times, ref_times)
        # a valid path: from (0, 0) to the end, unit monotonic steps
        assert (text[0], times[0]) == (0, 0)
        assert (text[-1], times[-1]) == (shape[0] - 1, shape[1] - 1)
        steps = np.stack([np.diff(text), np.diff(times)])
        assert set(map(tuple, steps.T)) <= {(1, 1), (1, 0), (0, 1)}


def test_dtw_is_fast_enough_for_a_full_window() -> None:
    x = np.random.default_rng(0).standard_normal((225, 1500)).astype(np.float32)
    began = time.perf_counter()
    text, times = dtw(x)
    elapsed = time.perf_counter() - began
    assert text[-1] == 224 and times[-1] == 1499
    assert elapsed < 2.0, f"dtw took {elapsed:.2f}s on 225 x 1500"


# --- median filter ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 3, 7])
@pytest.mark.parametrize("shape", [(20,), (3, 15), (2, 4, 9), (2, 5)])
def test_median_filter_matches_naive(width: int, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(width).standard_normal(shape).astype(np.float32)
    expected = naive_median_filter(x, width)
    np.testing.assert_array_equal(median_filter(x, width), expected)
    # the torch path gives the same numbers
    got = median_filter(torch.from_numpy(x), width)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_median_filter_short_input_is_returned_unchanged() -> None:
    x = np.array([[1.0, 5.0, 2.0]])
    np.testing.assert_array_equal(median_filter(x, 7), x)


def test_median_filter_rejects_even_width() -> None:
    with pytest.raises(ValueError):
        median_filter(np.zeros(10), 4)


# --- merge_punctuations ----------------------------------------------------------------------

PREPEND = "\"'“¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"


def timings(*words: str) -> list[WordTiming]:
    return [WordTiming(w, [i], float(i), float(i) + 0.5, 0.9) for i, w in enumerate(words)]


def test_merge_punctuations_trailing_joins_previous_word() -> None:
    t = timings(" Hello", ",", " world", ".", "!")
    merge_punctuations(t, PREPEND, APPEND)
    assert [w.word for w in t] == [" Hello,", "", " world.!", "", ""]
    assert [w.tokens for w in t] == [[0, 1], [], [2, 3, 4], [], []]
    # the receiving word keeps its own times
    assert (t[2].start, t[2].end) == (2.0, 2.5)


def test_merge_punctuations_leading_joins_following_word() -> None:
    t = timings(" He", " said", ' "', " (", "Hi", '"', ".")
    merge_punctuations(t, PREPEND, APPEND)
    assert [w.word for w in t] == [" He", " said", "", "", ' " (Hi".', "", ""]
    assert t[4].tokens == [2, 3, 4, 5, 6]
    assert (t[4].start, t[4].end) == (4.0, 4.5)


def test_merge_punctuations_respects_spaces() -> None:
    # a word ending in a space does not take the mark; a mark without a leading space is not
    # a leading mark
    t = timings(" end ", ".", "(", "x")
    merge_punctuations(t, PREPEND, APPEND)
    assert [w.word for w in t] == [" end ", ".", "(", "x"]


# --- find_alignment with a fake model --------------------------------------------------------

EOT = 100
NO_TIMESTAMPS = 103
SOT = 101
VOCAB = {1: " The", 2: " qu", 3: "ick", 4: " brown", 5: " fox", 6: ".", 7: " Jumps", 8: " over"}
N_VOCAB = 120  # ids >= EOT are specials / timestamps


class FakeTokenizer:
    """Splits like WhisperTokenizer._split_by_spaces over a tiny vocabulary."""

    eot = EOT
    no_timestamps = NO_TIMESTAMPS

    def split_to_words(self, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for token in tokens:
            text = VOCAB.get(token, "")
            if (
                token >= EOT
                or text.startswith(" ")
                or text.strip() in string.punctuation
                or not words
            ):
                words.append(text)
                word_tokens.append([token])
            else:
                words[-1] += text
                word_tokens[-1].append(token)
        return words, word_tokens


def fake_cross_attention(
    n_sot: int, blocks: list[tuple[int, int]], n_heads: int = 2, seed: int = 0
) -> tuple[object, dict[str, object]]:
    """A callable whose query row n_sot + k attends to frames blocks[k] = [a, b).

    blocks cover the text tokens and then the eot prediction. Rows of sot tokens and of the eot
    input attend uniformly. Text rows also put most of their mass on the padding beyond the
    content (frames >= blocks[-1][1]) to check that it is sliced away and renormalised.
    """
    rng = np.random.default_rng(seed)
    seen: dict[str, object] = {}

    def call(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seen["tokens"] = list(tokens)
        t = len(tokens)
        content = blocks[-1][1]
        scores = np.zeros((n_heads, t, 1500))
        for k, (a, b) in enumerate(blocks):
            scores[:, n_sot + k, a:b] = 6.0
            scores[:, n_sot + k, content:] = 9.0
        scores += 0.01 * rng.standard_normal(scores.shape)
        weights = torch.from_numpy(scores).float().softmax(dim=-1)
        logits = torch.from_numpy(rng.standard_normal((t, N_VOCAB)) * 3).float()
        logits[:, EOT:] += 50.0  # huge special/timestamp logits must not dilute text probs
        seen["logits"] = logits
        return weights, logits

    return call, seen


def expected_probability(logits: torch.Tensor, row: int, token: int) -> float:
    return float(logits[row, :EOT].softmax(dim=-1)[token])


def test_find_alignment_recovers_known_positions_and_probabilities() -> None:
    sot = [SOT]
    text = [1, 2, 3, 4, 5, 6]  # " The", " qu"+"ick", " brown", " fox", "."
    # frames (20 ms each): one block per text token, then the eot prediction
    blocks = [(0, 25), (25, 40), (40, 55), (55, 100), (100, 150), (150, 160), (160, 200)]
    call, seen = fake_cross_attention(len(sot), blocks)
    words = find_alignment(call, FakeTokenizer(), text, sot, num_frames=400)

    assert seen["tokens"] == [SOT, NO_TIMESTAMPS, *text, EOT]
    assert [w.word for w in words] == [" The", " quick", " brown", " fox", "."]
    assert [w.tokens for w in words] == [[1], [2, 3], [4], [5], [6]]
    starts = [0, 25, 55, 100, 150]
    ends = [25, 55, 100, 150, 160]
    assert [w.start for w in words] == pytest.approx([s / 50 for s in starts])
    assert [w.end for w in words] == pytest.approx([e / 50 for e in ends])

    logits = seen["logits"]
    assert isinstance(logits, torch.Tensor)
    token_probs = [expected_probability(logits, len(sot) + i, tok) for i, tok in enumerate(text)]
    expected = [
        token_probs[0],
        (token_probs[1] + token_probs[2]) / 2,
        token_probs[3],
        token_probs[4],
        token_probs[5],
    ]
    assert [w.probability for w in words] == pytest.approx(expected, rel=1e-5)


def test_find_alignment_multilingual_sot_and_edge_cases() -> None:
    sot = [SOT, 110, 111]  # sot, language, task: rows shift by len(sot_sequence)
    blocks = [(0, 30), (30, 80), (80, 90)]
    call, _ = fake_cross_attention(len(sot), blocks, n_heads=3, seed=1)
    words = find_alignment(call, FakeTokenizer(), [7, 8], sot, num_frames=180)
    assert [(w.word, w.start, w.end) for w in words] == [(" Jumps", 0.0, 0.6), (" over", 0.6, 1.6)]

    assert find_alignment(call, FakeTokenizer(), [], sot, num_frames=180) == []
    with pytest.raises(ValueError):
        find_alignment(call, FakeTokenizer(), [7, EOT + 3], sot, num_frames=180)


# --- add_word_timestamps ---------------------------------------------------------------------


def test_add_word_timestamps_splits_segments_and_offsets_times() -> None:
    sot = [SOT]
    # segment 1: " The quick." ; segment 2: " brown fox" (timestamp tokens mixed in are dropped)
    seg1 = [EOT + 10, 1, 2, 3, 6, EOT + 20]
    seg2 = [4, 5]
    blocks = [(0, 20), (20, 30), (30, 40), (40, 50), (50, 70), (70, 85), (85, 100)]
    call, _ = fake_cross_attention(len(sot), blocks)
    segments, last = add_word_timestamps(
        [seg1, seg2],
        [(10.0, 11.0), (11.0, 12.0)],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=sot,
        time_offset=10.0,
        num_frames=200,
        last_speech_timestamp=9.9,
    )
    assert all(isinstance(s, SegmentWords) for s in segments)
    first, second = segments
    assert [w.word for w in first.words] == [" The", " quick."]
    assert [w.word for w in second.words] == [" brown", " fox"]
    # token order: The[0,20) qu[20,30) ick[30,40) .[40,50) brown[50,70) fox[70,85) eot[85,..)
    assert [(w.start, w.end) for w in first.words] == [(10.0, 10.4), (10.4, 10.8)]
    assert [(w.start, w.end) for w in second.words] == [(11.0, 11.4), (11.4, 11.7)]
    # segment bounds move to their first / last word, and the last speech ends with segment 2
    assert (first.start, first.end) == (10.0, 10.8)
    assert (second.start, second.end) == (11.0, 11.7)
    assert last == 11.7


def test_add_word_timestamps_caps_long_first_word_after_pause() -> None:
    sot = [SOT]
    text = [1, 4, 5, 8]  # " The brown fox over"
    # DTW always starts " The" at frame 0: make it absorb a 2 s pause, other words 0.3 s
    blocks = [(0, 100), (100, 115), (115, 130), (130, 145), (145, 150)]
    call, _ = fake_cross_attention(len(sot), blocks)
    (segment,), last = add_word_timestamps(
        [text],
        [(1.0, 3.0)],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=sot,
        time_offset=0.0,
        num_frames=300,
        last_speech_timestamp=0.0,
    )
    # median duration 0.3 -> max 0.6: " The" is cut to end - 0.6
    first = segment.words[0]
    assert (first.start, first.end) == (1.4, 2.0)
    assert segment.start == 1.4  # the segment start follows its first word
    assert segment.end == 2.9 and last == 2.9


def test_add_word_timestamps_prefers_segment_end_over_a_too_long_last_word() -> None:
    sot = [SOT]
    text = [1, 4, 5, 8]
    blocks = [(0, 15), (15, 30), (30, 45), (45, 150), (150, 160)]  # " over" lasts 2.1 s
    call, _ = fake_cross_attention(len(sot), blocks)
    (segment,), last = add_word_timestamps(
        [text],
        [(0.0, 1.5)],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=sot,
        time_offset=0.0,
        num_frames=320,
        last_speech_timestamp=0.0,
    )
    assert segment.words[-1].start == 0.9
    assert segment.words[-1].end == 1.5  # max(start + median, segment end)
    assert (segment.start, segment.end) == (0.0, 1.5)
    assert last == 1.5


def test_add_word_timestamps_caps_word_after_sentence_end() -> None:
    sot = [SOT]
    text = [1, 6, 7, 8]  # " The", ".", " Jumps", " over"
    blocks = [(0, 15), (15, 30), (30, 130), (130, 145), (145, 150)]  # " Jumps" spans a pause
    call, _ = fake_cross_attention(len(sot), blocks)
    (segment,), _ = add_word_timestamps(
        [text],
        [(0.0, 2.9)],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=sot,
        time_offset=0.0,
        num_frames=300,
        last_speech_timestamp=0.0,
    )
    words = {w.word: (w.start, w.end) for w in segment.words}
    assert words[" The."] == (0.0, 0.3)
    assert words[" Jumps"] == (2.0, 2.6)  # end - 2 * median (0.3)


def test_add_word_timestamps_empty_inputs() -> None:
    call, _ = fake_cross_attention(1, [(0, 10)])
    assert add_word_timestamps(
        [],
        [],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=[SOT],
        time_offset=0.0,
        num_frames=100,
        last_speech_timestamp=4.0,
    ) == ([], 4.0)
    segments, last = add_word_timestamps(
        [[EOT + 1]],
        [(1.0, 2.0)],
        cross_attention=call,
        tokenizer=FakeTokenizer(),
        sot_sequence=[SOT],
        time_offset=0.0,
        num_frames=100,
        last_speech_timestamp=4.0,
    )
    assert segments == [SegmentWords(1.0, 2.0, [])] and last == 4.0


# --- the real engine -------------------------------------------------------------------------

ENGINE_DIR = REPO_ROOT / "engines" / "tiny.en"
CLIP_NAME = "jfk-inaugural-1961-excerpt.flac"
CLIP_TEXT = (
    "And so, my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


def _find_clip() -> Path | None:
    for base in (
        REPO_ROOT / "tests" / "data",
        REPO_ROOT.parent / "shared" / "data" / "speech" / "dev" / "audio",
    ):
        if (base / CLIP_NAME).is_file():
            return base / CLIP_NAME
    return None


@pytest.mark.slow
def test_real_engine_word_times_are_plausible() -> None:
    if not (ENGINE_DIR / "config.json").is_file():
        pytest.skip(f"no engine at {ENGINE_DIR}")
    clip = _find_clip()
    if clip is None:
        pytest.skip(f"{CLIP_NAME} not found")
    features_mod = pytest.importorskip("app.audio.features")
    from app.audio.decode import decode_audio
    from app.decoding.tokenizer import WhisperTokenizer
    from app.engine.options import EngineOptions
    from app.engine.torch_engine import load_engine

    engine = load_engine(ENGINE_DIR, EngineOptions(device="cpu", max_rows=4))
    tokenizer = WhisperTokenizer.from_engine(engine.engine_dir, engine.config)
    audio = decode_audio(clip)
    duration = len(audio) / 16000
    mel = features_mod.log_mel_spectrogram(
        torch.from_numpy(np.asarray(audio)), n_mels=engine.config.dims.n_mels
    )
    num_frames = min(len(audio) // 160, 3000)  # mel frames of real audio, not padding
    mel = features_mod.pad_or_trim(mel, 3000)
    features = engine.runner.encode(mel[None].to(engine.device, engine.dtype))

    def cross_attention(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return engine.runner.cross_attention_weights(
            torch.tensor([tokens], device=engine.device), features, engine.config.alignment_heads
        )

    text_tokens = tokenizer.encode(" " + CLIP_TEXT)
    sot = tokenizer.sot_sequence(None, "transcribe")
    words = find_alignment(cross_attention, tokenizer, text_tokens, sot, num_frames)
    assert "".join(w.word for w in words) == " " + CLIP_TEXT
    starts = [w.start for w in words]
    ends = [w.end for w in words]
    assert all(s <= e for s, e in zip(starts, ends, strict=True))
    assert starts == sorted(starts) and ends == sorted(ends)
    assert ends[-1] <= duration + 0.02
    assert words[0].start < 1.5
    assert all(0.0 <= w.probability <= 1.0 for w in words)

    segments, last = add_word_timestamps(
        [text_tokens],
        [(0.0, duration)],
        cross_attention=cross_attention,
        tokenizer=tokenizer,
        sot_sequence=sot,
        time_offset=0.0,
        num_frames=num_frames,
        last_speech_timestamp=0.0,
    )
    merged = segments[0].words
    assert "".join(w.word for w in merged) == " " + CLIP_TEXT
    assert merged[0].word == " And" and merged[1].word == " so,"
    assert merged[0].start < 1.5 and merged[-1].end <= duration + 0.02
    assert (
        0.0 <= segments[0].start <= segments[0].end <= duration + 0.02 and last == segments[0].end
    )
