"""CUDA graphs for the decoder: one replay per step (or per K greedy steps) instead of hundreds
of kernel launches. Small models are launch-bound, so this is where their speed comes from.

Graphs are keyed by (batch bucket, kv-length bucket) and all captured at start-up, before any
window is active: capture runs the step on dummy inputs, which writes cache rows that no window
owns yet. Serving then only replays, so windows join and leave without re-capturing. Three kinds:
a single step (logits back to the host), a greedy chunk of K steps or of one step (token choice
on the device; the one-step graph runs a window's last < K tokens), and the prompt prefill of a
whole bucket of new windows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from app.engine.greedy import (
    DecodeStep,
    GreedyChunkState,
    GreedyStep,
    chunk_length,
    run_greedy_steps,
)

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_BUCKETS = (64, 128, 256, 448)
#: Largest batch whose prompt prefill is captured: each prefill graph keeps its logits
#: (B x prompt length x vocabulary, float32) allocated.
MAX_PREFILL_ROWS = 64
#: A token budget no window reaches: chunks that ignore the budgets (CudaGraphOptions.chunk_tail off)
NO_BUDGET = 1 << 30


def prompt_lengths(multilingual: bool) -> tuple[int, ...]:
    """Prompt lengths without previous text: [sot, language, task] (+ no-timestamps) for
    multilingual models, [sot] (+ no-timestamps) for English-only ones. One-token prompts go
    through the step graphs."""
    return (3, 4) if multilingual else (2,)


def bucket_for(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class GraphedDecoder:
    """The captured graphs of one runner's eager `decode` (device tensors, rows from 0) and
    `greedy_step`, and their replay."""

    def __init__(self, decode: DecodeStep, greedy_step: GreedyStep, *, device: torch.device, n_ctx: int,
                 n_vocab: int, max_rows: int, chunk_steps: int, eot: int, suppress_ids: tuple[int, ...],
                 batch_buckets: tuple[int, ...] | None = None, kv_buckets: tuple[int, ...] | None = None,
                 prefill_lengths: tuple[int, ...] = (), chunk_tail: bool = True) -> None:
        self.decode = decode
        self.greedy_step = greedy_step
        self.n_ctx = n_ctx
        self.max_rows = max_rows
        self.chunk_steps = chunk_steps
        self.eot = eot
        self.chunk_tail = chunk_tail
        batch = batch_buckets or BATCH_BUCKETS
        kv = kv_buckets or KV_BUCKETS
        self.batch_buckets = tuple(b for b in batch if b < max_rows) + (max_rows,)
        self.kv_buckets = tuple(k for k in kv if k < self.n_ctx) + (self.n_ctx,)
        self.step_tokens = torch.full((max_rows, 1), eot, dtype=torch.long, device=device)
        self.step_positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        # prompt prefills of rows [0, B): every row fed from position 0 (never written)
        self.prefill_lengths = prefill_lengths
        self.prefill_tokens = torch.full((max_rows, max(prefill_lengths, default=1)), eot, dtype=torch.long,
                                         device=device)
        self.prefill_positions = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.state = GreedyChunkState.allocate(max_rows, chunk_steps, n_vocab, eot, device)
        self.suppress = suppress_ids
        self.state.set_suppress(suppress_ids)
        self.pool = torch.cuda.graph_pool_handle()
        self.step_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        # (batch, kv, steps): a chunk of chunk_steps steps, and a one-step chunk that is replayed
        # for the last few tokens of a window, so a chunk never decodes steps past every row's limit
        self.chunk_graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    # ---- the captured bodies ---------------------------------------------------------------
    def _step_body(self, b: int, kv: int) -> Tensor:
        return self.decode(self.step_tokens[:b], self.step_positions[:b], 0, kv)[:, -1]

    def _prefill_body(self, b: int, t: int) -> Tensor:
        return self.decode(self.prefill_tokens[:b, :t], self.prefill_positions[:b], 0, t)

    def _chunk_body(self, b: int, kv: int, steps: int) -> None:
        run_greedy_steps(self.decode, self.greedy_step, self.state, b, kv, steps, self.eot)

    def _capture(self, body: Callable[[], Tensor | None],
                 reset: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, Tensor | None]:
        """Warm body up twice, then capture it; `reset` (outside the graph) runs before each."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                if reset is not None:
                    reset()
                body()
        torch.cuda.current_stream().wait_stream(stream)
        if reset is not None:
            reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            out = body()
        return graph, out

    def capture_all(self) -> None:
        started = time.perf_counter()
        for b in self.batch_buckets:
            for kv in self.kv_buckets:
                graph, out = self._capture(lambda b=b, kv=kv: self._step_body(b, kv))
                assert out is not None
                self.step_graphs[(b, kv)] = graph, out
                for steps in sorted({self.chunk_steps, 1}):
                    self.chunk_graphs[(b, kv, steps)] = self._capture(
                        lambda b=b, kv=kv, steps=steps: self._chunk_body(b, kv, steps),
                        reset=lambda b=b: self._reset_chunk_state(b))[0]
            for t in self.prefill_lengths if b <= MAX_PREFILL_ROWS else ():
                graph, out = self._capture(lambda b=b, t=t: self._prefill_body(b, t))
                assert out is not None
                self.prefill_graphs[(b, t)] = graph, out
        torch.cuda.synchronize()
        log.info("captured %d CUDA graphs in %.1f s",
                 len(self.step_graphs) + len(self.chunk_graphs) + len(self.prefill_graphs),
                 time.perf_counter() - started)

    def _reset_chunk_state(self, b: int) -> None:
        s = self.state
        s.tokens[:b] = self.eot
        s.positions[:b] = 0
        s.done[:b] = False
        s.sum_logprob[:b] = 0
        s.cursor.zero_()

    # ---- replay ------------------------------------------------------------------------------
    def step(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor | None:
        """Replay one decoder step for rows [0, B). None when no bucket fits (caller runs eagerly)."""
        n = tokens.shape[0]
        b = bucket_for(n, self.batch_buckets)
        kv = bucket_for(kv_len, self.kv_buckets)
        if b is None or kv is None or (b, kv) not in self.step_graphs:
            return None
        self.step_tokens[:n].copy_(tokens, non_blocking=True)
        self.step_positions[:n].copy_(positions, non_blocking=True)
        if b > n:  # padding rows: unowned cache rows, fed harmlessly at position 0
            self.step_tokens[n:b] = self.eot
            self.step_positions[n:b] = 0
        graph, out = self.step_graphs[(b, kv)]
        graph.replay()
        return out[:n]

    def prefill(self, tokens: Tensor, positions: Tensor) -> Tensor | None:
        """Replay the prompt prefill of rows [0, B) (tokens [B, T], every row from position 0);
        logits [B, T, V] (a copy: several groups of a batch may prefill before any is read).
        None when no graph was captured for exactly B rows and T tokens: rows past B may belong
        to other windows, so no padding rows are fed."""
        entry = self.prefill_graphs.get((tokens.shape[0], tokens.shape[1]))
        if entry is None or bool(positions.any()):
            return None
        graph, out = entry
        self.prefill_tokens[: tokens.shape[0], : tokens.shape[1]].copy_(tokens, non_blocking=True)
        graph.replay()
        return out.clone()

    def greedy_chunk(self, tokens: Tensor, positions: Tensor, done: Tensor, suppress: tuple[int, ...],
                     remaining: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """Greedy steps for rows [0, B) on the device, at most chunk_steps and no more than the
        largest of `remaining` (tokens each row may still emit; a row stops after its last one),
        never choosing a `suppress` id. Returns (tokens [B, steps], done [B], sum of log-probs [B])
        or None when no captured bucket fits. Fewer than chunk_steps steps replay the one-step graph
        that many times, without a host round trip in between."""
        if suppress != self.suppress:  # the graphs read the mask's buffer: no recapture
            self.state.set_suppress(suppress)
            self.suppress = suppress
        if not self.chunk_tail:
            remaining = [NO_BUDGET] * len(remaining)
        steps = chunk_length(remaining, self.chunk_steps)
        n = tokens.shape[0]
        b = bucket_for(n, self.batch_buckets)
        kv = bucket_for(int(positions.max()) + steps, self.kv_buckets)
        graph_steps = self.chunk_steps if steps == self.chunk_steps else 1
        if b is None or kv is None or (b, kv, graph_steps) not in self.chunk_graphs:
            return None
        s = self.state
        self._reset_chunk_state(b)
        s.tokens[:n].copy_(tokens, non_blocking=True)
        s.positions[:n].copy_(positions, non_blocking=True)
        s.done[:n].copy_(done, non_blocking=True)
        s.remaining[:n].copy_(torch.tensor(remaining), non_blocking=True)
        graph = self.chunk_graphs[(b, kv, graph_steps)]
        for _ in range(steps // graph_steps):
            graph.replay()
        return s.out[:n, :steps], s.done[:n], s.sum_logprob[:n]
