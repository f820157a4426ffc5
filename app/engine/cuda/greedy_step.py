"""One greedy decoding step's bookkeeping on the GPU, in one Triton kernel.

After the logits of a graphed greedy step, torch needed about fifteen kernels: add the suppress
mask, log-softmax, argmax, gather the chosen log-prob, then update each row's done flag, token
budget, position, output column and sum of log-probs. On an H200 they took ~45 us per step, as
long as a whole decode step of tiny.en's four layers does in its GEMMs. Here programs scan the
logits once (running maximum, its first index, and the sum of exponentials, rescaled when
the maximum grows) and write every update.

The chosen token is the first index of the largest suppressed logit, as torch.argmax picks; its
log-probability is max - logsumexp = -log(sum(exp(logit - max))). Each row's vocabulary is
scanned in CHUNKS parts by as many programs, and the last of them to finish combines their results.
app.engine.greedy.greedy_step_reference is the same step in torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.engine.cuda.common import HAVE_TRITON, launch_args
from app.engine.cuda.workspace import WORKSPACE
from app.engine.greedy import GreedyChunkState

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from app.engine.cuda.common import enter_after_previous

    @triton.jit
    def _greedy_step(logits_ptr, suppress_ptr, tokens_ptr, positions_ptr, done_ptr, remaining_ptr,
                     sum_ptr, out_ptr, cursor_ptr, top_ptr, first_ptr, exp_sum_ptr, count_ptr,
                     n_vocab, chunk, stride_l, stride_o, eot,
                     CHUNKS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # program (row, vocabulary chunk): the chunk's maximum, its first index and the sum of
        # exp(logit - maximum); the chunk's program that arrives last combines the row's CHUNKS
        # partials in a fixed order and advances the row
        row = tl.program_id(0)
        part = tl.program_id(1)
        enter_after_previous(PDL)
        offs = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: largest logit seen
        best_at = tl.zeros([BLOCK], dtype=tl.int32)  # its first index
        total = tl.zeros([BLOCK], dtype=tl.float32)  # sum of exp(logit - best) per lane
        base = logits_ptr + row.to(tl.int64) * stride_l
        begin = part * chunk
        end = tl.minimum(begin + chunk, n_vocab)
        for v0 in range(begin, end, BLOCK):
            v = v0 + offs
            x = tl.load(base + v, mask=v < end, other=float("-inf")).to(tl.float32)
            x += tl.load(suppress_ptr + v, mask=v < end, other=0.0)
            grow = x > best  # strictly greater: a lane keeps its first index of a tie
            new_best = tl.maximum(best, x)
            # rescale the lane's sum to the new maximum (a -inf lane has nothing to rescale)
            total = tl.where(new_best == float("-inf"), 0.0,
                             total * tl.exp(best - new_best) + tl.exp(x - new_best))
            best_at = tl.where(grow, v, best_at)
            best = new_best
        top = tl.max(best, axis=0)
        slot = row * CHUNKS + part
        tl.store(top_ptr + slot, top)
        # the first index among the lanes that hold the maximum
        tl.store(first_ptr + slot, tl.min(tl.where(best == top, best_at, n_vocab), axis=0))
        tl.store(exp_sum_ptr + slot, tl.sum(tl.where(best == float("-inf"), 0.0, total * tl.exp(best - top)), axis=0))
        # release: the partials are visible before the count; acquire for the last arrival
        if tl.atomic_add(count_ptr + row, 1, sem="acq_rel") == CHUNKS - 1:
            parts = row * CHUNKS + tl.arange(0, CHUNKS)
            tops = tl.load(top_ptr + parts, cache_modifier=".cg")
            top = tl.max(tops, axis=0)
            # chunks are in vocabulary order: the smallest first index among the maxima
            token = tl.min(tl.where(tops == top, tl.load(first_ptr + parts, cache_modifier=".cg"), n_vocab), axis=0)
            sums = tl.load(exp_sum_ptr + parts, cache_modifier=".cg")
            chosen = -tl.log(tl.sum(tl.where(tops == float("-inf"), 0.0, sums * tl.exp(tops - top)), axis=0))
            tl.atomic_xchg(count_ptr + row, 0)
            done = tl.load(done_ptr + row) != 0
            token = tl.where(done, eot, token)
            tl.store(sum_ptr + row, tl.load(sum_ptr + row) + tl.where(done, 0.0, chosen))
            remaining = tl.load(remaining_ptr + row) - 1
            tl.store(remaining_ptr + row, remaining)
            tl.store(done_ptr + row, (done | (token == eot) | (remaining <= 0)).to(tl.int8))
            tl.store(out_ptr + row.to(tl.int64) * stride_o + tl.load(cursor_ptr), token.to(tl.int64))
            tl.store(tokens_ptr + row, token.to(tl.int64))
            tl.store(positions_ptr + row, tl.load(positions_ptr + row) + 1)


#: Vocabulary chunks per row, each scanned by its own program: one program per row scanned 51,864
#: logits in ~50 dependent steps (34 us a step for 64 rows on an H200)
CHUNKS = 8
BLOCK = 1024


def greedy_step(logits: Tensor, rows: GreedyChunkState, eot: int, *, chunks: int = CHUNKS, pdl: bool = False) -> None:
    """app.engine.greedy.greedy_step_reference in one kernel: logits [B, V] float32 on the GPU (last
    dimension contiguous), `rows` the B rows' state; each row's vocabulary scanned in `chunks` parts."""
    b, n_vocab = logits.shape
    device = logits.device
    top = WORKSPACE.get("greedy.top", device, b * chunks, torch.float32)
    first = WORKSPACE.get("greedy.first", device, b * chunks, torch.int32)
    exp_sum = WORKSPACE.get("greedy.exp_sum", device, b * chunks, torch.float32)
    counters = WORKSPACE.get("greedy.counters", device, b, torch.int32, zeroed=True)
    chunk = triton.cdiv(triton.cdiv(n_vocab, chunks), BLOCK) * BLOCK
    _greedy_step[(b, chunks)](
        logits_ptr=logits, suppress_ptr=rows.suppress, tokens_ptr=rows.tokens, positions_ptr=rows.positions,
        done_ptr=rows.done.view(torch.int8), remaining_ptr=rows.remaining, sum_ptr=rows.sum_logprob, out_ptr=rows.out,
        cursor_ptr=rows.cursor, top_ptr=top, first_ptr=first, exp_sum_ptr=exp_sum, count_ptr=counters,
        n_vocab=n_vocab, chunk=chunk, stride_l=logits.stride(0), stride_o=rows.out.stride(0), eot=eot,
        CHUNKS=chunks, BLOCK=BLOCK, num_warps=4, **launch_args(pdl))
