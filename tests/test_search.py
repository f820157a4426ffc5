"""Search strategies on hand-crafted "models": a function from a token prefix to next-token logits.

Each toy model is a table of next-token probabilities by prefix; whatever a prefix does not list
gets a negligible probability, so log-probs (and so the expected scores) are known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor

from app.decoding.options import WindowOptions
from app.decoding.search import (
    BeamSearch,
    SamplingSearch,
    make_search,
    rows_needed,
    sample_rows,
    sequence_score,
)

V = 10
EOT = 9
EPS = 1e-9

Table = Mapping[tuple[int, ...], Mapping[int, float]]
Model = Callable[[list[int]], torch.Tensor]


def table_model(table: Table, default: Mapping[int, float] | None = None) -> Model:
    """Next-token logits (log-probs) for a prefix; unlisted prefixes use `default` (eot)."""

    def model(prefix: list[int]) -> torch.Tensor:
        probs = torch.full((V,), EPS, dtype=torch.float64)
        for token, p in table.get(tuple(prefix), default or {EOT: 1.0}).items():
            probs[token] = p
        return (probs / probs.sum()).log().float()

    return model


def lp(model: Model, sequence: list[int]) -> float:
    """Sum of the model's log-probs of `sequence` followed by eot (what the searches add up)."""
    total = 0.0
    for i, token in enumerate([*sequence, EOT]):
        total += torch.log_softmax(model(sequence[:i]), dim=-1)[token].item()
    return total


def run(search: SamplingSearch | BeamSearch, model: Model, max_steps: int = 50) -> int:
    """Drive a search like the decode loop does; returns the number of steps taken."""
    for step in range(1, max_steps + 1):
        logits = torch.stack([model(h) for h in search.row_histories()])
        if search.step(logits).finished:
            return step
    raise AssertionError("search did not finish")


def options(**kw: object) -> WindowOptions:
    return WindowOptions(**kw)  # type: ignore[arg-type]


# --- ranking ---------------------------------------------------------------------------------


def test_sequence_score_is_mean_logprob_without_length_penalty() -> None:
    assert sequence_score(-6.0, 3, None) == pytest.approx(-2.0)
    assert sequence_score(-1.5, 0, None) == pytest.approx(-1.5)  # empty: no division by zero


@pytest.mark.parametrize(("length", "alpha"), [(1, 1.0), (4, 0.6), (10, 2.0), (0, 1.0)])
def test_sequence_score_uses_the_gnmt_length_penalty(length: int, alpha: float) -> None:
    penalty = ((5 + length) / 6) ** alpha
    assert sequence_score(-3.0, length, alpha) == pytest.approx(-3.0 / penalty)


def test_length_penalty_changes_which_candidate_wins() -> None:
    short, long = (-1.0, 1), (-2.2, 4)
    # mean log-prob prefers the long one; a weak GNMT penalty prefers the short one
    assert sequence_score(*long, None) > sequence_score(*short, None)
    assert sequence_score(*short, 0.2) > sequence_score(*long, 0.2)


# --- greedy ------------------------------------------------------------------------------------


def test_greedy_follows_argmax_and_stops_at_eot() -> None:
    model = table_model({(): {3: 0.6, 4: 0.4}, (3,): {5: 0.7, EOT: 0.3}, (3, 5): {EOT: 0.8, 1: 0.2}})
    search = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=20)
    assert search.n_rows == 1 and search.is_greedy
    assert run(search, model) == 3
    best = search.best()
    assert best.tokens == [3, 5]  # eot is not part of the tokens ...
    assert best.sum_logprob == pytest.approx(math.log(0.6 * 0.7 * 0.8), abs=1e-5)  # ... its lp is


def test_greedy_stops_at_max_new_tokens() -> None:
    model = table_model({}, default={2: 0.9, EOT: 0.1})  # never chooses eot
    search = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=4)
    assert run(search, model) == 4
    assert search.best().tokens == [2, 2, 2, 2]
    assert search.best().sum_logprob == pytest.approx(4 * math.log(0.9), abs=1e-5)


def test_greedy_finished_row_keeps_emitting_eot() -> None:
    search = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=10)
    logits = torch.zeros(1, V)
    logits[0, EOT] = 5.0
    assert search.step(logits).finished
    logits = torch.zeros(1, V)
    logits[0, 1] = 5.0
    out = search.step(logits)
    assert out.next_tokens == [EOT] and out.finished and out.sources is None
    assert search.best().tokens == []


def test_push_greedy_matches_step() -> None:
    model = table_model({(): {3: 0.6, 4: 0.4}, (3,): {5: 0.7, EOT: 0.3}})
    stepped = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=20)
    run(stepped, model)
    pushed = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=20)
    done = False
    while not done:
        logprobs = torch.log_softmax(model(pushed.sequences[0]), dim=-1)
        token = int(logprobs.argmax())
        done = pushed.push_greedy(token, logprobs[token].item())
    assert pushed.best() == stepped.best()


# --- sampling (temperature > 0, best of N) ---------------------------------------------------------


def test_sampling_uses_best_of_rows() -> None:
    search = SamplingSearch(options(temperature=0.5, best_of=4), EOT, max_new_tokens=10)
    assert search.n_rows == 4 and not search.is_greedy
    assert len(search.row_histories()) == 4
    assert rows_needed(options(temperature=0.5, best_of=4)) == 4


def test_sampling_applies_the_temperature() -> None:
    n = 4000
    logits = torch.full((n, V), float("-inf"))
    logits[:, 1] = 0.0
    logits[:, 2] = -2.0  # p(2) = 0.119 at T=1, 0.45 at T=10, ~0 at T=0.1
    observed = {}
    for temperature in (0.1, 1.0, 10.0):
        search = SamplingSearch(options(temperature=temperature, best_of=n), EOT, max_new_tokens=5)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            tokens = torch.tensor(search.step(logits).next_tokens)
        observed[temperature] = (tokens == 2).float().mean().item()
        assert set(tokens.tolist()) <= {1, 2}
    expected = {t: 1 / (1 + math.exp(2.0 / t)) for t in observed}
    for t, freq in observed.items():
        assert freq == pytest.approx(expected[t], abs=0.03), t


def test_sampling_picks_the_best_length_normalised_row() -> None:
    # Each row is steered to a known sequence (at T=0.05 its planned token, p >= 0.7 against one
    # alternative, is drawn with certainty) while log-probs come from the untempered logits:
    # row 0 has the best raw sum (-0.46), row 2 the best mean (-1.00 / 4).
    plans = {0: [(1, 0.7)], 1: [(2, 0.7), (3, 0.75)], 2: [(4, 0.8), (5, 0.8), (6, 0.8), (7, 0.8)]}
    eot_p = 0.9

    search = SamplingSearch(options(temperature=0.05, best_of=3), EOT, max_new_tokens=10)
    for _ in range(5):
        logits = torch.full((3, V), math.log(EPS))
        for r, plan in plans.items():
            step = len(search.sequences[r])
            token, p = plan[step] if step < len(plan) else (EOT, eot_p)
            other = 0 if token != 0 else 8
            logits[r, token] = math.log(p)
            logits[r, other] = math.log(1 - p)
        if search.step(logits).finished:
            break
    sums = {r: sum(math.log(p) for _, p in plan) + math.log(eot_p) for r, plan in plans.items()}
    assert search.sequences == [[1], [2, 3], [4, 5, 6, 7]]
    assert search.sum_logprobs == pytest.approx([sums[0], sums[1], sums[2]], abs=1e-4)
    assert max(sums, key=sums.__getitem__) == 0  # raw sum would choose row 0 ...
    best = search.best()
    assert best.tokens == [4, 5, 6, 7]  # ... the mean over length chooses row 2
    assert best.sum_logprob == pytest.approx(sums[2], abs=1e-4)


def test_sampling_prefers_acceptable_rows_when_any_is() -> None:
    # the fallback's repetition check: a loop often has the best mean log-prob of the samples
    search = SamplingSearch(options(temperature=0.5, best_of=3), EOT, max_new_tokens=10)
    search.sequences = [[7, 7, 7, 7], [1, 2], [3, 4, 5]]
    search.sum_logprobs = [-0.4, -3.0, -2.4]  # means -0.1, -1.5, -0.8

    def no_repeats(tokens: list[int]) -> bool:
        return len(set(tokens)) == len(tokens)

    assert search.best().tokens == [7, 7, 7, 7]
    assert search.best(no_repeats).tokens == [3, 4, 5]  # the best of the acceptable rows
    assert search.best(no_repeats).sum_logprob == -2.4
    assert search.best(lambda tokens: False).tokens == [7, 7, 7, 7]  # none acceptable: all rows


def test_one_row_ignores_acceptability() -> None:
    search = SamplingSearch(options(temperature=0.0), EOT, max_new_tokens=10)
    search.sequences = [[7, 7, 7]]
    search.sum_logprobs = [-1.0]
    assert search.best(lambda tokens: pytest.fail("a single row needs no check")).tokens == [7, 7, 7]


# --- beam search -----------------------------------------------------------------------------------

#: greedy takes 1 (p .55) then faces a three-way split; beam search finds 2 6 (p .45 x .99)
GREEDY_TRAP: Table = {
    (): {1: 0.55, 2: 0.45},
    (1,): {3: 0.34, 4: 0.33, 5: 0.33},
    (2,): {6: 0.99, 3: 0.01},
}


def test_beam_search_finds_the_sequence_greedy_misses() -> None:
    model = table_model(GREEDY_TRAP)
    greedy = SamplingSearch(options(beam_size=1), EOT, max_new_tokens=10)
    run(greedy, model)
    assert greedy.best().tokens == [1, 3]

    beam = BeamSearch(options(beam_size=2), EOT, max_new_tokens=10)
    run(beam, model)
    best = beam.best()
    assert best.tokens == [2, 6]
    assert best.sum_logprob == pytest.approx(lp(model, [2, 6]), abs=1e-4)
    assert lp(model, [2, 6]) > lp(model, [1, 3])


def test_beam_search_reports_which_row_each_hypothesis_continues() -> None:
    model = table_model(GREEDY_TRAP)
    beam = BeamSearch(options(beam_size=2), EOT, max_new_tokens=10)
    first = beam.step(torch.stack([model(h) for h in beam.row_histories()]))
    # both rows start identical: only row 0's continuations count, no duplicates
    assert first.next_tokens == [1, 2] and first.sources == [0, 0]
    assert beam.row_histories() == [[1], [2]]
    second = beam.step(torch.stack([model(h) for h in beam.row_histories()]))
    # best two live continuations: 2 6 (row 1) then 1 3 (row 0)
    assert beam.row_histories() == [[2, 6], [1, 3]]
    assert second.sources == [1, 0] and second.next_tokens == [6, 3]


#: short candidates finish first; the best one (by mean log-prob) finishes last
LATE_BLOOMER: Table = {
    (): {1: 0.5, 2: 0.3, 3: 0.2},
    (1,): {EOT: 0.6, 4: 0.4},
    (2,): {EOT: 0.7, 5: 0.3},
    (1, 4): {6: 0.99, EOT: 0.01},
    (2, 5): {EOT: 0.9, 7: 0.1},
    (1, 4, 6): {EOT: 0.99, 8: 0.01},
}


def test_patience_keeps_searching_for_more_finished_candidates() -> None:
    model = table_model(LATE_BLOOMER)
    impatient = BeamSearch(options(beam_size=2, patience=1.0), EOT, max_new_tokens=10)
    assert impatient.max_candidates == 2
    assert run(impatient, model) == 2
    assert set(impatient.finished) == {(1,), (2,)}
    assert impatient.best().tokens == [1]

    patient = BeamSearch(options(beam_size=2, patience=2.0), EOT, max_new_tokens=10)
    assert patient.max_candidates == 4
    assert run(patient, model) == 4
    assert len(patient.finished) == 4
    assert {(1,), (2,), (2, 5), (1, 4, 6)} <= set(patient.finished)
    best = patient.best()
    assert best.tokens == [1, 4, 6]
    assert best.sum_logprob == pytest.approx(lp(model, [1, 4, 6]), abs=1e-4)


@pytest.mark.parametrize(("beam_size", "patience", "expected"), [(5, 1.0, 5), (5, 2.0, 10), (3, 0.5, 2), (1, 0.1, 1)])
def test_max_candidates_is_beam_size_times_patience(beam_size: int, patience: float, expected: int) -> None:
    beam = BeamSearch(options(beam_size=beam_size, patience=patience), EOT, max_new_tokens=10)
    assert beam.max_candidates == expected
    assert beam.n_rows == beam_size == rows_needed(options(beam_size=beam_size))


def test_beam_search_out_of_room_ranks_the_live_beams() -> None:
    # eot is never likely: the search stops at max_new_tokens and ranks unfinished beams
    model = table_model({}, default={1: 0.5, 2: 0.3, 3: 0.2})
    beam = BeamSearch(options(beam_size=3), EOT, max_new_tokens=3)
    assert run(beam, model) == 3
    assert beam.finished == {}
    best = beam.best()
    assert best.tokens == [1, 1, 1]
    assert best.sum_logprob == pytest.approx(3 * math.log(0.5), abs=1e-4)


def test_beam_search_ranks_finished_candidates_with_the_length_penalty() -> None:
    # (1,) finishes with lp -1.20 (len 1); (1, 4, 6) with -1.63 (len 3).
    model = table_model(LATE_BLOOMER)
    scores = {}
    for penalty in (None, 0.0):
        beam = BeamSearch(options(beam_size=2, patience=2.0, length_penalty=penalty), EOT, 10)
        run(beam, model)
        scores[penalty] = beam.best().tokens
    assert scores[None] == [1, 4, 6]  # mean log-prob favours the long, confident one
    assert scores[0.0] == [1]  # penalty exponent 0: raw sum, favours the short one


def test_make_search_picks_the_strategy() -> None:
    assert isinstance(make_search(options(beam_size=5), EOT, 10), BeamSearch)
    greedy = make_search(options(beam_size=1), EOT, 10)
    assert isinstance(greedy, SamplingSearch) and greedy.is_greedy
    sampled = make_search(options(temperature=0.4, beam_size=5, best_of=3), EOT, 10)
    assert isinstance(sampled, SamplingSearch) and sampled.n_rows == 3
    assert rows_needed(options(temperature=0.4, beam_size=5, best_of=3)) == 3
    assert rows_needed(options(beam_size=5)) == 5


def test_sample_rows_never_draws_a_zero_probability_entry() -> None:
    # mass only on entries 2 and 4; the first, middle and last entries have none
    probs = torch.tensor([[0.0, 0.0, 0.25, 0.0, 0.75, 0.0]])
    for extreme, expected in ((0.0, 2), (0.2499, 2), (0.2501, 4), (1.0 - 2**-24, 4), (1.0, 4)):
        assert sample_rows(probs, torch.tensor([[extreme]])).tolist() == [expected], extreme
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = sample_rows(probs.expand(20000, -1), torch.rand(20000, 1))
    assert set(draws.tolist()) == {2, 4}
    assert (draws == 4).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_sampling_is_reproducible_and_stable_under_small_changes() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, V) * 3

    def run(logits: Tensor) -> list[list[int]]:
        search = SamplingSearch(options(temperature=0.8, best_of=5), EOT, max_new_tokens=40)
        for _ in range(40):
            torch.rand(7)  # other users of the global generator do not change a window's draws
            if search.step(logits).finished:
                break
        return search.sequences

    first = run(logits)
    assert run(logits) == first
    assert len({tuple(s) for s in first}) > 1  # the five rows are different draws
    # fp16-sized noise on the logits: the same tokens (a draw moves only at a boundary)
    noisy = logits + torch.randn_like(logits) * 1e-3
    same = sum(a == b for s, t in zip(first, run(noisy), strict=True) for a, b in zip(s, t, strict=False))
    assert same >= 0.95 * sum(len(s) for s in first)


def _reference_beam_step(search: BeamSearch, top_lp: list[list[float]], top_ids: list[list[int]],
                         first: bool) -> tuple[list[list[int]], list[float], list[int], dict[tuple[int, ...], float]]:
    """openai-whisper's beam step: candidates keyed by their whole token sequence."""
    k = search.n_rows
    scored: dict[tuple[int, ...], tuple[float, int]] = {}
    for r in ([0] if first else range(k)):
        base = search.beams[r]
        for lp, tok in zip(top_lp[r], top_ids[r], strict=True):
            seq = (*base.tokens, tok)
            score = base.sum_logprob + lp
            if seq not in scored or scored[seq][0] < score:
                scored[seq] = (score, r)
    beams, scores, sources = [], [], []
    finished = dict(search.finished)
    for seq, (score, r) in sorted(scored.items(), key=lambda kv: kv[1][0], reverse=True):
        if seq[-1] == search.eot:
            if len(finished) < search.max_candidates:
                finished[seq[:-1]] = score
        else:
            beams.append(list(seq))
            scores.append(score)
            sources.append(r)
        if len(beams) == k:
            break
    return beams, scores, sources, finished


def test_beam_step_equals_the_sequence_keyed_reference_on_random_steps() -> None:
    """Beams are distinct sequences, so naming candidates by (row, token) instead of by their
    whole history changes nothing: ties, eot candidates and patience included."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        search = BeamSearch(WindowOptions(beam_size=4, patience=1.5), eot=0, max_new_tokens=50)
        first = True
        for _ in range(12):
            k = search.n_rows
            # few distinct token ids and rounded log-probs: duplicates across rows and exact ties
            top_ids = [torch.randperm(8, generator=gen)[: k + 1].tolist() for _ in range(k)]
            top_lp = [sorted((torch.randint(-6, 0, (k + 1,), generator=gen) / 2).tolist(), reverse=True)
                      for _ in range(k)]
            expected = _reference_beam_step(search, top_lp, top_ids, first)
            out = search.step_from_top(top_lp, top_ids)
            first = False
            assert [b.tokens for b in search.beams] == expected[0], trial
            assert [b.sum_logprob for b in search.beams] == expected[1]
            assert out.sources == expected[2]
            assert search.finished == expected[3]
            if out.finished or len(search.beams) < k:
                break
