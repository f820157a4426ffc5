"""Search strategies over a window's rows: greedy / sampling (best-of-N) and beam search.

A strategy owns the rows of one window in the decode loop. Each step it receives the rule-masked
logits of its rows and returns the next token of every row, plus (beam search) which row each new
hypothesis continues, so the loop can reorder the self-attention caches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from app.decoding.options import WindowOptions


def sequence_score(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """openai-whisper's ranking: log-prob over length, or over the Google NMT length penalty."""
    if length_penalty is None:
        penalty = float(max(length, 1))
    else:
        penalty = ((5 + length) / 6) ** length_penalty
    return sum_logprob / penalty


def sample_rows(probs: Tensor, uniform: Tensor) -> Tensor:
    """One token per row of probs [rows, V], by inverting the cumulative distribution at the
    row's uniform draw in [0, 1) (uniform [rows, 1]).

    One draw per row: on a CPU, one random number per vocabulary entry (torch.multinomial, or an
    exponential race) cost ~8 ms per 5 x 51,864 rows against ~0.2 ms. And a draw picks the same
    token when the probabilities move a little (fp16 against fp32), unless it falls right at a
    boundary. `right=True` finds the first entry whose cumulative mass exceeds the draw, so an
    entry of zero probability (a suppressed token) is never chosen.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    draw = uniform.to(device=cdf.device, dtype=cdf.dtype) * total
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))  # stay below the total
    return torch.searchsorted(cdf, draw, right=True).squeeze(1)


#: every sampled window starts its own generator from this seed: a window decodes to the same text
#: on every run, device and batch composition (its draws depend only on its step and row)
SAMPLING_SEED = 0


@dataclass
class StepOutput:
    next_tokens: list[int]
    #: for each row j, the row index (within the window's rows) whose history it continues;
    #: None when no row changes history (greedy/sampling)
    sources: list[int] | None
    finished: bool


@dataclass
class Candidate:
    tokens: list[int]
    sum_logprob: float


class SamplingSearch:
    """Greedy (temperature 0, one row) or best-of-N sampling (temperature > 0, N rows)."""

    def __init__(self, options: WindowOptions, eot: int, max_new_tokens: int) -> None:
        self.temperature = options.temperature
        self.n_rows = options.best_of if options.temperature > 0 else 1
        self.length_penalty = options.length_penalty
        self.eot = eot
        self.max_new_tokens = max_new_tokens
        self.sequences: list[list[int]] = [[] for _ in range(self.n_rows)]
        self.sum_logprobs = [0.0] * self.n_rows
        self.done = [False] * self.n_rows
        self.generator = torch.Generator().manual_seed(SAMPLING_SEED) if self.temperature > 0 else None

    def row_histories(self) -> list[list[int]]:
        return self.sequences

    def step(self, logits: Tensor) -> StepOutput:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            uniform = torch.rand(self.n_rows, 1, generator=self.generator)  # on the CPU: same draws on any device
            tokens = sample_rows(torch.softmax(logits.float() / self.temperature, dim=-1), uniform)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        next_tokens = tokens.tolist()
        for r in range(self.n_rows):
            if self.done[r]:
                next_tokens[r] = self.eot
                continue
            self.sum_logprobs[r] += chosen[r]
            if next_tokens[r] == self.eot:
                self.done[r] = True
            else:
                self.sequences[r].append(next_tokens[r])
                if len(self.sequences[r]) >= self.max_new_tokens:
                    self.done[r] = True
        return StepOutput(next_tokens, None, all(self.done))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 and self.n_rows == 1

    def push_greedy(self, token: int, logprob: float) -> bool:
        """Record one greedy step computed in a batch with other windows; True when finished."""
        if self.done[0]:
            return True
        self.sum_logprobs[0] += logprob
        if token == self.eot:
            self.done[0] = True
        else:
            self.sequences[0].append(token)
            if len(self.sequences[0]) >= self.max_new_tokens:
                self.done[0] = True
        return self.done[0]

    def best(self, acceptable: Callable[[list[int]], bool] | None = None) -> Candidate:
        """The best-scoring row; among the `acceptable` rows when several were sampled and any is."""
        scores = [
            sequence_score(s, len(seq), self.length_penalty)
            for s, seq in zip(self.sum_logprobs, self.sequences, strict=True)
        ]
        rows = range(self.n_rows)
        if acceptable is not None and self.n_rows > 1:
            rows = [r for r in rows if acceptable(self.sequences[r])] or rows
        i = max(rows, key=scores.__getitem__)
        return Candidate(self.sequences[i], self.sum_logprobs[i])


@dataclass
class BeamSearch:
    """Beam search with openai-whisper's semantics (patience, max candidates, length ranking)."""

    options: WindowOptions
    eot: int
    max_new_tokens: int
    beams: list[Candidate] = field(init=False)
    finished: dict[tuple[int, ...], float] = field(init=False)

    def __post_init__(self) -> None:
        self.n_rows = self.options.beam_size
        self.max_candidates = max(1, round(self.options.beam_size * self.options.patience))
        self.beams = [Candidate([], 0.0) for _ in range(self.n_rows)]
        self.finished = {}
        self.first_step = True

    def row_histories(self) -> list[list[int]]:
        return [b.tokens for b in self.beams]

    def step(self, logits: Tensor) -> StepOutput:
        return self.step_from_top(*top_continuations(logits, self.n_rows + 1))

    def step_from_top(self, top_lp: list[list[float]], top_ids: list[list[int]]) -> StepOutput:
        """One step from each row's k + 1 likeliest continuations (log-probabilities, ids), which
        the decode loop computes for every beam window of a batch at once (top_continuations)."""
        k = self.n_rows
        # All rows start identical: on the first step only row 0's continuations are distinct.
        # Beams are distinct sequences, so (row, token) names each candidate sequence once:
        # no tuple of the whole history per candidate (~1 ms a step at 12 windows and 100 tokens).
        source_rows = [0] if self.first_step else range(k)
        self.first_step = False
        candidates = [(self.beams[r].sum_logprob + lp, r, tok)
                      for r in source_rows for lp, tok in zip(top_lp[r], top_ids[r], strict=True)]
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep row, then rank order
        new_beams: list[Candidate] = []
        sources: list[int] = []
        for score, r, tok in candidates:
            if tok == self.eot:
                if len(self.finished) < self.max_candidates:
                    self.finished[tuple(self.beams[r].tokens)] = score
            else:
                new_beams.append(Candidate([*self.beams[r].tokens, tok], score))
                sources.append(r)
            if len(new_beams) == k:
                break
        self.beams = new_beams
        out_of_room = len(new_beams[0].tokens) >= self.max_new_tokens if new_beams else True
        done = len(self.finished) >= self.max_candidates or out_of_room
        return StepOutput([b.tokens[-1] for b in new_beams], sources, done)

    def best(self) -> Candidate:
        candidates = dict(self.finished)
        if len(candidates) < self.max_candidates:  # ran out of room: rank the live beams too
            for b in self.beams:
                candidates.setdefault(tuple(b.tokens), b.sum_logprob)
        best = max(
            candidates.items(),
            key=lambda kv: sequence_score(kv[1], len(kv[0]), self.options.length_penalty),
        )
        return Candidate(list(best[0]), best[1])


Search = SamplingSearch | BeamSearch


def top_continuations(logits: Tensor, n: int) -> tuple[list[list[float]], list[list[int]]]:
    """The n likeliest tokens of each row of logits [R, V]: log-probabilities and ids, on the host
    (one device sync however many rows)."""
    top_lp, top_ids = torch.log_softmax(logits.float(), dim=-1).topk(n, dim=-1)
    return top_lp.tolist(), top_ids.tolist()


def make_search(options: WindowOptions, eot: int, max_new_tokens: int) -> Search:
    if options.temperature == 0 and options.beam_size > 1:
        return BeamSearch(options, eot, max_new_tokens)
    return SamplingSearch(options, eot, max_new_tokens)


def rows_needed(options: WindowOptions) -> int:
    if options.temperature == 0:
        return max(1, options.beam_size)
    return max(1, options.best_of)
