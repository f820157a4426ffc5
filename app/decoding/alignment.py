"""Word-level timestamps: align decoded text to audio through cross-attention, as Whisper does.

Whisper's "alignment heads" attend to the audio frames a token is spoken in. For one 30 s window
we run the decoder once over the whole text, take those heads' attention maps, clean them up
(normalise, median filter, average) and find the monotonic token -> frame path with dynamic time
warping. A word starts at the first frame of its first token and ends where the next word starts.

After the one decoder pass the attention cleanup runs where the weights are (GPU or CPU) and the
DTW runs in numpy on the host: the matrix is at most about 225 tokens x 750 audio frames, so an
anti-diagonal-vectorised DTW takes tens of milliseconds and needs no numba, Triton or scipy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import Tensor

from app.constants import TOKENS_PER_SECOND
from app.decoding.results import Word

#: Whisper's defaults for which punctuation joins the following / the previous word.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MEDIAN_FILTER_WIDTH = 7
#: Whisper caps the median word duration used by its heuristics at 0.7 s.
MAX_MEDIAN_WORD_DURATION = 0.7
SENTENCE_END_MARKS = ".。!！?？"

#: tokens -> (weights [heads, T, n_audio_ctx] softmaxed over audio, logits [T, V]); the caller
#: binds the window's audio features and the engine's alignment heads.
CrossAttentionFn = Callable[[list[int]], tuple[Tensor, Tensor]]

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

# DTW step codes stored in the trace matrix
_DIAGONAL, _UP, _LEFT = 0, 1, 2


class AlignmentTokenizer(Protocol):
    """The part of WhisperTokenizer alignment needs (tests pass a small fake)."""

    eot: int
    no_timestamps: int

    def split_to_words(
        self, tokens: list[int], language: str
    ) -> tuple[list[str], list[list[int]]]: ...


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float  # seconds from the start of the window
    end: float
    probability: float


@dataclass
class SegmentWords:
    """Words of one segment, and the segment's bounds after Whisper's word-based adjustment."""

    start: float
    end: float
    words: list[Word]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whisper's DTW: the cheapest monotonic path from (0, 0) to (N-1, M-1) through `cost` [N, M].

    Steps are diagonal, up (next text row, same frame) or left (same row, next frame). Ties are
    broken exactly as Whisper does (diagonal or up only when strictly cheaper than both others,
    otherwise left) so paths match the reference on plateaus too. Returns (text_indices,
    time_indices), one entry per path cell, in order.
    """
    x = np.asarray(cost, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"dtw expects a 2-D cost matrix, got shape {x.shape}")
    n, m = x.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()

    # Cell (i, j) of the accumulated cost (1-based, with a +inf border row/column and a 0 at
    # (0, 0)) needs (i-1, j-1), (i-1, j) and (i, j-1): all on earlier anti-diagonals. So we
    # store the matrices diagonal-major, skew[d, i] = cell (i, d - i), and compute a whole
    # anti-diagonal per step with plain slices: N + M numpy steps instead of N * M Python ones.
    # Cells outside the matrix hold +inf and stay +inf, which keeps every step full-width.
    n_diag = n + m + 1
    rows, cols = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    skew_cost = np.full((n_diag, n + 1), np.inf)
    skew_cost[rows + cols, rows] = x
    # float32 accumulation like Whisper, so near-ties resolve the same way
    acc = np.full((n_diag, n + 1), np.inf, dtype=np.float32)
    acc[0, 0] = 0.0
    trace = np.full((n_diag, n + 1), _LEFT, dtype=np.int8)
    for d in range(2, n_diag):
        c0 = acc[d - 2, :n]  # diagonal predecessor (i-1, j-1) of cells i = 1..n
        c1 = acc[d - 1, :n]  # up: (i-1, j)
        c2 = acc[d - 1, 1:]  # left: (i, j-1)
        # Whisper's tie rule: a step wins only when strictly cheaper than both others, and
        # everything else (ties included) goes left.
        diagonal = (c0 < c1) & (c0 < c2)
        up = (c1 < c0) & (c1 < c2)
        acc[d, 1:] = skew_cost[d, 1:] + np.where(diagonal, c0, np.where(up, c1, c2))
        trace[d, 1:] = np.where(diagonal, _DIAGONAL, np.where(up, _UP, _LEFT))

    # On the border only one move is possible: the first row can only go left (already the
    # fill value), the first column only up.
    trace[:, 0] = _LEFT
    trace[np.arange(1, n + 1), np.arange(1, n + 1)] = _UP  # cells (i, 0), i >= 1

    # The backtrace is inherently sequential but only N + M long.
    steps = trace.tolist()
    path: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = steps[i + j][i]
        if step == _DIAGONAL:
            i -= 1
            j -= 1
        elif step == _UP:
            i -= 1
        else:
            j -= 1
    result = np.array(path[::-1], dtype=np.int64)
    return result[:, 0].copy(), result[:, 1].copy()


def median_filter(x: ArrayT, width: int) -> ArrayT:
    """Median over a sliding window of odd `width` along the last axis, reflect-padded.

    Takes a numpy array or a torch tensor (then it runs on the tensor's device, so on a GPU
    server the cleanup happens before the small matrix is copied to the host). Like Whisper, an
    input too short to reflect-pad (last axis <= width // 2) comes back as is.
    """
    if width <= 0 or width % 2 == 0:
        raise ValueError(f"median filter width must be a positive odd number, got {width}")
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    if isinstance(x, Tensor):
        # F.pad's reflect mode wants a batch dimension; flatten leading axes into it.
        flat = x.reshape(-1, 1, x.shape[-1])
        padded = F.pad(flat, (pad, pad), mode="reflect")
        # sort over the small window axis; torch.median is slower (pytorch issue 51450)
        windows = padded.unfold(-1, width, 1)
        return windows.sort(dim=-1).values[..., pad].reshape(x.shape)
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = sliding_window_view(padded, width, axis=-1)
    # partition (a selection) is cheaper than a full sort or np.median's extra checks
    return np.partition(windows, pad, axis=-1)[..., pad]


def find_alignment(
    cross_attention: CrossAttentionFn,
    tokenizer: AlignmentTokenizer,
    text_tokens: list[int],
    sot_sequence: list[int],
    num_frames: int,
    *,
    language: str = "en",
    median_filter_width: int = MEDIAN_FILTER_WIDTH,
) -> list[WordTiming]:
    """Align `text_tokens` (no special or timestamp tokens) to one window's audio.

    `num_frames` is the number of mel frames of real audio in the window (<= 3000); attention
    to the padding beyond it is ignored. Times are seconds from the window start.
    """
    if not text_tokens:
        return []
    if any(t >= tokenizer.eot or t < 0 for t in text_tokens):
        raise ValueError("find_alignment takes text tokens only (special/timestamp tokens removed)")

    tokens = [*sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]
    weights, logits = cross_attention(tokens)
    if weights.ndim != 3 or weights.shape[1] != len(tokens) or logits.shape[0] != len(tokens):
        raise ValueError(
            f"cross_attention returned weights {tuple(weights.shape)} / logits "
            f"{tuple(logits.shape)} for {len(tokens)} tokens"
        )
    n_sot = len(sot_sequence)
    n_text = len(text_tokens)

    # Position n_sot (the no_timestamps token) predicts text_tokens[0], and so on. Whisper
    # takes the softmax over text tokens only (ids < eot), so specials don't dilute it.
    with torch.no_grad():
        sampled = logits[n_sot : n_sot + n_text, : tokenizer.eot].float()
        probs = sampled.softmax(dim=-1)
        rows = torch.arange(n_text, device=probs.device)
        picked = probs[rows, torch.tensor(text_tokens, device=probs.device)]
        text_token_probs = picked.cpu().numpy().astype(np.float64)

        # One audio token per two mel frames. Keep at least one so a near-empty window still
        # yields (zero-length) words instead of failing.
        n_audio = max(1, min(num_frames // 2, weights.shape[-1]))
        w = weights[:, :, :n_audio].float()
        # Whisper applies softmax to the scores of the content frames only; renormalising the
        # slice of the full-window softmax is the same distribution (exp(s) / sum over slice).
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        std, mean = torch.std_mean(w, dim=-2, keepdim=True, correction=0)
        # A frame every token attends to equally carries no information: its centred column is
        # all zeros, so dividing by 1 keeps it zero instead of producing NaNs that break DTW.
        std = torch.where(std > 0, std, torch.ones_like(std))
        w = (w - mean) / std
        # On a GPU the filter runs there and only the small averaged matrix is copied back; on
        # the CPU numpy's partition is about twice as fast as torch's sort.
        if w.device.type == "cpu":
            matrix = median_filter(w.numpy(), median_filter_width).mean(axis=0)
        else:
            matrix = median_filter(w, median_filter_width).mean(dim=0).cpu().numpy()
    # Rows of the queries predicting each text token and then eot: inputs no_timestamps ..
    # last text token (the eot input row predicts nothing we need).
    matrix = matrix[n_sot : n_sot + n_text + 1]

    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_words(text_tokens + [tokenizer.eot], language)
    if len(word_tokens) <= 1:
        return []  # only the eot "word": nothing to time
    # index of each word's first token among the DTW rows; the last entry is eot's row
    boundaries = np.concatenate([[0], np.cumsum([len(t) for t in word_tokens[:-1]])])

    # The path visits every row; the frame where it first enters a row is that token's start.
    enters_row = np.diff(text_indices, prepend=-1) != 0
    jump_times = time_indices[enters_row] / TOKENS_PER_SECOND
    starts = jump_times[boundaries[:-1]]
    ends = jump_times[boundaries[1:]]
    return [
        WordTiming(
            word=word,
            tokens=list(toks),
            start=float(start),
            end=float(end),
            probability=float(np.mean(text_token_probs[i:j])),
        )
        # zip stops before the trailing eot word, which has no boundary after it
        for word, toks, start, end, i, j in zip(
            words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:], strict=False
        )
    ]


def merge_punctuations(timings: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach punctuation to words in place, Whisper's way.

    A leading mark (a space then e.g. an opening quote) joins the word after it; a trailing
    mark (e.g. a comma, a closing quote) joins the word before it unless that word ends in a
    space. The emptied entries stay, with word "" and no tokens, so token counts per segment
    still add up; the receiving word keeps its own times.
    """
    # Right to left, so a run of leading marks all end up on the word that follows them.
    target = len(timings) - 1
    for i in range(len(timings) - 2, -1, -1):
        mark, following = timings[i], timings[target]
        if mark.word.startswith(" ") and mark.word.strip() in prepended:
            following.word = mark.word + following.word
            following.tokens = mark.tokens + following.tokens
            mark.word, mark.tokens = "", []
        else:
            target = i

    # Left to right, so a run of trailing marks all end up on the word that precedes them.
    target = 0
    for j in range(1, len(timings)):
        previous, mark = timings[target], timings[j]
        if not previous.word.endswith(" ") and mark.word in appended:
            previous.word = previous.word + mark.word
            previous.tokens = previous.tokens + mark.tokens
            mark.word, mark.tokens = "", []
        else:
            target = j


def _median_and_max_duration(alignment: list[WordTiming]) -> tuple[float, float]:
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = float(np.median(durations)) if len(durations) > 0 else 0.0
    median = min(MAX_MEDIAN_WORD_DURATION, median)
    return median, 2 * median


def add_word_timestamps(
    segment_tokens: Sequence[Sequence[int]],
    segment_times: Sequence[tuple[float, float]],
    *,
    cross_attention: CrossAttentionFn,
    tokenizer: AlignmentTokenizer,
    sot_sequence: list[int],
    time_offset: float,
    num_frames: int,
    last_speech_timestamp: float,
    language: str = "en",
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    median_filter_width: int = MEDIAN_FILTER_WIDTH,
) -> tuple[list[SegmentWords], float]:
    """Word timestamps for the segments of ONE window, with Whisper's clean-up heuristics.

    segment_tokens: each segment's tokens (any token >= eot, i.e. timestamps, is dropped).
    segment_times: each segment's absolute (start, end) in seconds.
    time_offset: absolute start of the window (s); num_frames: mel frames of audio in it.
    last_speech_timestamp: absolute end of the previous speech (0.0 at the start of a file).

    Returns, per segment, its absolute words and its possibly moved (start, end), and the new
    last_speech_timestamp to pass for the next window. Word times are rounded to 10 ms.
    """
    if len(segment_tokens) != len(segment_times):
        raise ValueError("segment_tokens and segment_times must have the same length")
    if not segment_tokens:
        return [], last_speech_timestamp

    per_segment = [[t for t in toks if t < tokenizer.eot] for toks in segment_tokens]
    text_tokens = list(itertools.chain.from_iterable(per_segment))
    alignment = find_alignment(
        cross_attention,
        tokenizer,
        text_tokens,
        sot_sequence,
        num_frames,
        language=language,
        median_filter_width=median_filter_width,
    )
    median_duration, max_duration = _median_and_max_duration(alignment)

    # Attention tends to smear a sentence end over the following pause: cap the mark itself,
    # or the word right after it, at twice the median word duration (Whisper's heuristic).
    if median_duration > 0:
        for i in range(1, len(alignment)):
            timing = alignment[i]
            if timing.end - timing.start > max_duration:
                if timing.word in SENTENCE_END_MARKS:
                    timing.end = timing.start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    timing.start = timing.end - max_duration

    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    results: list[SegmentWords] = []
    word_index = 0
    for toks, (seg_start, seg_end) in zip(per_segment, segment_times, strict=True):
        # Hand out alignment entries until this segment's tokens are used up; merged-away
        # punctuation entries (word "") still count their (moved) tokens as Whisper does.
        consumed = 0
        words: list[Word] = []
        while word_index < len(alignment) and consumed < len(toks):
            timing = alignment[word_index]
            if timing.word:
                words.append(
                    Word(
                        word=timing.word,
                        start=round(time_offset + timing.start, 2),
                        end=round(time_offset + timing.end, 2),
                        probability=timing.probability,
                    )
                )
            consumed += len(timing.tokens)
            word_index += 1

        if words:
            seg_start, seg_end = _fit_segment_words(
                words, seg_start, seg_end, last_speech_timestamp, median_duration, max_duration
            )
            last_speech_timestamp = seg_end
        results.append(SegmentWords(start=seg_start, end=seg_end, words=words))
    return results, last_speech_timestamp


def _fit_segment_words(
    words: list[Word],
    seg_start: float,
    seg_end: float,
    last_speech_timestamp: float,
    median_duration: float,
    max_duration: float,
) -> tuple[float, float]:
    """Whisper's per-segment fixes; edits `words` in place and returns the new segment bounds."""
    first = words[0]
    # DTW starts its path at the window start, so the first word after a pause tends to absorb
    # the silence before it: cap it (and the second word) at max_duration.
    if first.end - last_speech_timestamp > median_duration * 4 and (
        first.end - first.start > max_duration
        or (len(words) > 1 and words[1].end - first.start > max_duration * 2)
    ):
        if len(words) > 1 and words[1].end - words[1].start > max_duration:
            boundary = max(words[1].end / 2, words[1].end - max_duration)
            first.end = words[1].start = boundary
        first.start = max(0.0, first.end - max_duration)

    # Keep the segment's own start when the first word starts well before it (too long a
    # word); otherwise the segment starts with its first word.
    start_from_word = not (seg_start < first.end and seg_start - 0.5 > first.start)
    if not start_from_word:
        first.start = max(0.0, min(first.end - median_duration, seg_start))

    last = words[-1]
    end_from_word = not (seg_end > last.start and seg_end + 0.5 < last.end)
    if not end_from_word:
        last.end = max(last.start + median_duration, seg_end)

    # Round after the heuristics so a segment bound taken from a word equals that word's time.
    for word in words:
        word.start = round(word.start, 2)
        word.end = round(word.end, 2)
    if start_from_word:
        seg_start = first.start
    if end_from_word:
        seg_end = last.end
    return seg_start, seg_end
