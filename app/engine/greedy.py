"""Greedy decoding on the device: the per-row state of a chunk of greedy steps, and one step's
token choice and bookkeeping in torch ops (app.engine.cuda.greedy_step is the same step in one
kernel).

A chunk runs several greedy steps without a host round trip: the CUDA graphs replay it
(app.engine.runners.cuda_graphs), and the CPU tests run the same body eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from app.engine.host_copy import device_tensor


@dataclass
class GreedyChunkState:
    """Device buffers of the greedy fast path (rows = cache rows, same indexing as the caches)."""

    tokens: Tensor  # [R] next token to feed
    positions: Tensor  # [R] position it is fed at
    done: Tensor  # [R] bool, row has emitted end-of-text or its last allowed token
    remaining: Tensor  # [R] tokens the row may still emit
    sum_logprob: Tensor  # [R] float32
    out: Tensor  # [R, K] tokens produced by the last chunk
    cursor: Tensor  # [1] column of `out` the next step writes
    suppress: Tensor  # [V] additive mask (0 / -inf)

    @classmethod
    def allocate(cls, rows: int, steps: int, n_vocab: int, eot: int, device: torch.device | str) -> GreedyChunkState:
        return cls(
            tokens=torch.full((rows,), eot, dtype=torch.long, device=device),
            positions=torch.zeros(rows, dtype=torch.long, device=device),
            done=torch.zeros(rows, dtype=torch.bool, device=device),
            remaining=torch.zeros(rows, dtype=torch.long, device=device),
            sum_logprob=torch.zeros(rows, dtype=torch.float32, device=device),
            out=torch.zeros(rows, steps, dtype=torch.long, device=device),
            cursor=torch.zeros(1, dtype=torch.long, device=device),
            suppress=torch.zeros(n_vocab, device=device),
        )

    def head(self, rows: int) -> GreedyChunkState:
        """Views of rows [0, rows), sharing the cursor and the suppress mask."""
        return replace(self, tokens=self.tokens[:rows], positions=self.positions[:rows], done=self.done[:rows],
                       remaining=self.remaining[:rows], sum_logprob=self.sum_logprob[:rows], out=self.out[:rows])

    def set_suppress(self, ids: tuple[int, ...]) -> None:
        """Change the suppressed ids in place (graphs read the buffer; no recapture)."""
        self.suppress.zero_()
        if ids:
            self.suppress[device_tensor(ids, self.suppress.device, torch.long)] = float("-inf")


#: (tokens [B, 1], positions [B], first row, self-attention positions read) -> logits [B, 1, V]
DecodeStep = Callable[[Tensor, Tensor, int, int], Tensor]
#: (logits [B, V], rows' state, end-of-text id) -> None: advances the rows by one token
GreedyStep = Callable[[Tensor, GreedyChunkState, int], None]


def greedy_step_reference(logits: Tensor, rows: GreedyChunkState, eot: int) -> None:
    """Advance B greedy rows by one token, in place.

    logits [B, V] float32; rows.suppress [V] additive (0 / -inf). For each row b: token = argmax of
    logits + suppress (eot once the row is done); out[b, cursor] = tokens[b] = token;
    positions[b] += 1; remaining[b] -= 1; sum_logprob[b] += the token's log-probability unless the
    row was done; done[b] |= token is eot or remaining[b] reached 0. `cursor` [1] is not advanced.
    """
    scores = logits + rows.suppress
    token = scores.argmax(dim=-1)
    token = torch.where(rows.done, torch.full_like(token, eot), token)
    chosen = torch.log_softmax(scores, dim=-1).gather(1, token[:, None]).squeeze(1)
    rows.sum_logprob += torch.where(rows.done, torch.zeros_like(chosen), chosen)
    rows.remaining -= 1
    rows.done |= (token == eot) | (rows.remaining <= 0)
    rows.out.index_copy_(1, rows.cursor, token[:, None])
    rows.tokens.copy_(token)
    rows.positions += 1


def chunk_length(remaining: list[int], chunk_steps: int) -> int:
    """Steps of a greedy chunk: at most chunk_steps, none past the largest remaining token budget."""
    return max(1, min(max(remaining), chunk_steps))


def run_greedy_steps(decode: DecodeStep, greedy_step: GreedyStep, state: GreedyChunkState, rows: int, kv: int,
                     steps: int, eot: int) -> None:
    """`steps` greedy steps of rows [0, rows) from `state`, reading self-attention cache positions
    [0, kv): the body of the chunk graphs (and, eagerly, of their CPU test)."""
    head = state.head(rows)
    for _ in range(steps):
        pos = head.positions.clamp(max=kv - 1)
        logits = decode(head.tokens[:, None], pos, 0, kv)[:, -1]
        greedy_step(logits, head, eot)
        state.cursor += 1
