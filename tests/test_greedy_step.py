"""One greedy step's bookkeeping: the torch reference (app.engine.greedy) on the CPU against a
row-by-row reading of its contract, and the Triton kernel (app.engine.cuda.greedy_step) against the
reference on the GPU."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from fakes import cuda_only

from app.engine.cuda.greedy_step import greedy_step
from app.engine.greedy import GreedyChunkState, greedy_step_reference
from app.engine.options import EngineOptions

EOT = 7


def make_state(rows: int, vocab: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab, device=device) * 4
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins
    logits[1, EOT] = logits[1].max() + 1  # picks end-of-text
    suppress = torch.zeros(vocab, device=device)
    suppress[[3, 11]] = float("-inf")
    logits[2, 11] = logits[2].max() + 5  # the largest logit, but suppressed
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    done[3] = True
    remaining = torch.full((rows,), 10, dtype=torch.long, device=device)
    remaining[4] = 1  # its last allowed token
    return dict(logits=logits, suppress=suppress, tokens=torch.zeros(rows, dtype=torch.long, device=device),
                positions=torch.arange(rows, device=device) + 3, done=done, remaining=remaining,
                sum_logprob=torch.full((rows,), -1.5, device=device),
                out=torch.full((rows, 4), -1, dtype=torch.long, device=device),
                cursor=torch.tensor([2], device=device))


def run(step: Callable[[torch.Tensor, GreedyChunkState, int], None],
        state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    rows = GreedyChunkState(**{k: v for k, v in state.items() if k != "logits"})
    step(state["logits"], rows, EOT)
    return state


def test_reference_follows_the_contract_row_by_row() -> None:
    before = make_state(6, 50)
    after = run(greedy_step_reference, before)
    for row in range(6):
        scores = (before["logits"][row] + before["suppress"]).tolist()
        best = max(scores)
        token = EOT if before["done"][row] else scores.index(best)  # first index of the maximum
        logprob = scores[token] - math.log(sum(math.exp(s - best) for s in scores)) - best
        assert after["tokens"][row] == token and after["out"][row, 2] == token
        assert after["out"][row, [0, 1, 3]].tolist() == [-1, -1, -1]
        assert after["positions"][row] == before["positions"][row] + 1
        assert after["remaining"][row] == before["remaining"][row] - 1
        expected_sum = -1.5 + (0.0 if before["done"][row] else logprob)
        assert after["sum_logprob"][row].item() == pytest.approx(expected_sum, abs=1e-4)
        expected_done = bool(before["done"][row]) or token == EOT or before["remaining"][row] <= 1
        assert bool(after["done"][row]) == expected_done
    assert after["tokens"][:5].tolist() == [5, EOT, after["tokens"][2].item(), EOT, after["tokens"][4].item()]
    assert after["tokens"][2] != 11  # suppressed
    assert after["cursor"].item() == 2  # the caller advances it


def test_cpu_engines_take_the_reference() -> None:
    assert not EngineOptions(device="cpu").resolve().kernels.greedy_step_kernel


@cuda_only
@pytest.mark.parametrize(("rows", "vocab"), [(6, 50), (64, 51866), (5, 1500)])
@pytest.mark.parametrize("chunks", [8, 1])
def test_kernel_equals_the_reference(rows: int, vocab: int, chunks: int) -> None:
    state = make_state(rows, vocab, "cuda")
    got = run(lambda logits, rows, eot: greedy_step(logits, rows, eot, chunks=chunks), state)
    expected = run(greedy_step_reference, state)
    for key in ("tokens", "out", "positions", "remaining", "done", "cursor"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["sum_logprob"], expected["sum_logprob"], rtol=0, atol=1e-4)


@cuda_only
def test_kernel_keeps_the_first_index_of_a_tie_across_vocabulary_chunks() -> None:
    state = make_state(6, 51866, "cuda")
    top = state["logits"].max() + 1
    state["logits"][5, 40000] = state["logits"][5, 100] = top  # different chunks, the later one first in memory order
    state["logits"][4, 51865] = top  # the very last entry
    got, expected = run(greedy_step, state), run(greedy_step_reference, state)
    assert got["tokens"][5] == 100 and got["tokens"][4] == 51865
    for key in ("tokens", "out", "done"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["sum_logprob"], expected["sum_logprob"], rtol=0, atol=1e-4)
