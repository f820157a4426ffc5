"""apply_rules on hand-made logits: suppression, suppress_blank and Whisper's timestamp grammar.

A 21-token toy vocabulary keeps every expected mask readable:
text 0..9 | eot 10 | sot 11 | no_timestamps 12 | timestamps 13..20 (<|0.00|> .. <|0.14|>).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from app.decoding.rules import RowRules, apply_rules

EOT, SOT, NO_TS, TB, V = 10, 11, 12, 13, 21
TEXT = set(range(EOT))
BELOW_TB = set(range(TB))  # text + eot + the other specials
STAMPS = set(range(TB, V))
EVERYTHING = set(range(V))


@dataclass
class ToyTokenizer:
    eot: int = EOT
    no_timestamps: int = NO_TS
    timestamp_begin: int = TB


def ts(index: int) -> int:
    return TB + index


def row(sampled: list[int] | None = None, *, suppress: tuple[int, ...] = (),
        begin: tuple[int, ...] = (), timestamps: bool = True,
        max_initial: int | None = None) -> RowRules:
    return RowRules(sampled or [], suppress, begin, timestamps, max_initial)


def base_logits(n_rows: int) -> torch.Tensor:
    """Text token 7 and eot are by far the likeliest: no timestamp is ever forced."""
    logits = torch.zeros(n_rows, V)
    logits[:, 7] = 10.0
    logits[:, EOT] = 10.0
    return logits


ONE_MASK = [False]  # the way apply() masks, set per test by the fixture below


@pytest.fixture(autouse=True, params=[False, True], ids=["slices", "one-mask"])
def one_mask(request: pytest.FixtureRequest) -> bool:
    """Every test runs both ways of masking: per-row slices (CPU) and one mask for all rows (GPU)."""
    ONE_MASK[0] = request.param
    return request.param


def apply(rows: list[RowRules], logits: torch.Tensor | None = None) -> torch.Tensor:
    out = base_logits(len(rows)) if logits is None else logits.clone()
    apply_rules(out, rows, ToyTokenizer(), one_mask=ONE_MASK[0])  # type: ignore[arg-type]
    return out


def masked(out: torch.Tensor, r: int = 0) -> set[int]:
    return set(torch.nonzero(out[r] == float("-inf")).flatten().tolist())


def assert_untouched(before: torch.Tensor, after: torch.Tensor, r: int = 0) -> None:
    """Every position not masked keeps its original value (rules only ever write -inf)."""
    keep = after[r] != float("-inf")
    assert torch.equal(after[r][keep], before[r][keep])


# --- suppression -----------------------------------------------------------------------------


def test_suppress_tokens_masks_exactly_those_ids_per_row() -> None:
    rows = [row([1], suppress=(2, 5), timestamps=False),
            row([1], suppress=(7,), timestamps=False),
            row([1], timestamps=False)]
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    out = apply(rows, logits)
    assert masked(out, 0) == {2, 5}
    assert masked(out, 1) == {7}
    assert masked(out, 2) == set()
    for r in range(3):
        assert_untouched(logits, out, r)


def test_without_timestamps_no_timestamp_rule_applies() -> None:
    # no_timestamps itself, timestamps, and text are all left alone for a non-timestamp row,
    # even at the first position and with timestamps already in its history
    assert masked(apply([row([], timestamps=False)])) == set()
    assert masked(apply([row([ts(1), 3, ts(4)], timestamps=False)])) == set()


@pytest.mark.parametrize(
    ("sampled", "expected"),
    [([], {0, EOT}), ([4], set()), ([4, 5, 6], set())],
    ids=["first-position", "after-one-token", "later"],
)
def test_suppress_blank_only_before_anything_was_sampled(sampled: list[int], expected: set[int]) -> None:
    out = apply([row(sampled, begin=(0, EOT), timestamps=False)])
    assert masked(out) == expected


def test_suppress_blank_and_suppress_tokens_combine() -> None:
    out = apply([row([], suppress=(3,), begin=(0, EOT), timestamps=False),
                 row([8], suppress=(3,), begin=(0, EOT), timestamps=False)])
    assert masked(out, 0) == {0, 3, EOT}
    assert masked(out, 1) == {3}


# --- timestamp grammar -----------------------------------------------------------------------


def test_first_position_must_be_a_timestamp() -> None:
    out = apply([row([])])
    assert masked(out) == BELOW_TB  # text, eot, sot and no_timestamps
    assert out[0, TB:].eq(0).all()  # every timestamp kept, unchanged


@pytest.mark.parametrize("max_initial", [0, 2, 7])
def test_max_initial_timestamp_caps_the_first_timestamp(max_initial: int) -> None:
    out = apply([row([], max_initial=max_initial)])
    allowed = {ts(i) for i in range(max_initial + 1)}
    assert masked(out) == EVERYTHING - allowed


def test_max_initial_timestamp_applies_only_at_the_first_position() -> None:
    # after <|0.00|> text, a timestamp far beyond the initial cap is fine
    out = apply([row([ts(0), 4], max_initial=1)])
    assert masked(out) == {NO_TS, ts(0)}


def test_no_timestamps_token_is_always_masked_when_timestamps_are_on() -> None:
    for sampled in ([ts(0)], [ts(0), 4], [ts(0), 4, 5]):
        assert NO_TS in masked(apply([row(sampled)]))


def test_single_timestamp_is_followed_by_text() -> None:
    # <|0.04|> opens a segment: the next token is text (or eot), never another timestamp
    out = apply([row([ts(2)])])
    assert masked(out) == {NO_TS} | STAMPS


def test_open_segment_with_text_allows_text_and_later_timestamps() -> None:
    # <|0.02|> t4: text may continue; a closing timestamp must be > the opening one
    out = apply([row([ts(1), 4])])
    assert masked(out) == {NO_TS, ts(0), ts(1)}


def test_closing_timestamp_must_be_followed_by_timestamp_or_eot() -> None:
    # <|0.02|> t3 <|0.08|>: next is the next segment's start (>= 0.08) or eot, never text
    out = apply([row([ts(1), 3, ts(4)])])
    assert masked(out) == TEXT | {NO_TS} | {ts(i) for i in range(4)}
    assert out[0, EOT] == 10.0 and out[0, ts(4)] == 0.0  # eot and an equal timestamp stay


def test_last_two_timestamps_force_text() -> None:
    # <|0.02|> t3 <|0.08|><|0.08|>: a pair closed a segment and opened the next: text follows
    out = apply([row([ts(1), 3, ts(4), ts(4)])])
    assert masked(out) == {NO_TS} | STAMPS
    assert out[0, EOT] == 10.0


def test_timestamps_are_monotonic_with_a_strict_floor_after_text() -> None:
    # <|0.00|> t1 <|0.06|><|0.06|> t2: the closing timestamp must exceed 0.06
    out = apply([row([ts(0), 1, ts(3), ts(3), 2])])
    assert masked(out) == {NO_TS} | {ts(i) for i in range(4)}


def test_rules_are_per_row() -> None:
    rows = [row([]), row([ts(2)]), row([ts(1), 3, ts(4)]), row([5], timestamps=False),
            row([ts(0), 4], max_initial=0)]
    out = apply(rows)
    assert masked(out, 0) == BELOW_TB
    assert masked(out, 1) == {NO_TS} | STAMPS
    assert masked(out, 2) == TEXT | {NO_TS} | {ts(i) for i in range(4)}
    assert masked(out, 3) == set()
    assert masked(out, 4) == {NO_TS, ts(0)}


# --- "timestamps together likelier than any text token -> timestamp" --------------------------


def test_forces_a_timestamp_when_timestamp_mass_beats_every_text_token() -> None:
    logits = torch.zeros(1, V)
    logits[0, :TB] = -1.0  # each text token alone: e^-1 ...
    logits[0, TB:] = -2.0  # ... but 8 timestamps together: 8 e^-2 > e^-1
    out = apply([row([ts(0), 4])], logits)
    assert masked(out) == BELOW_TB | {ts(0)}
    assert_untouched(logits, out)


def test_no_forcing_when_one_text_token_dominates() -> None:
    logits = torch.full((1, V), -2.0)
    logits[0, 7] = 3.0
    out = apply([row([ts(0), 4])], logits)
    assert masked(out) == {NO_TS, ts(0)}


def test_forcing_counts_only_timestamps_still_allowed() -> None:
    # Masked timestamps (below the floor) carry huge logits; they must not count as mass.
    logits = torch.zeros(1, V)
    logits[0, TB : ts(6)] = 10.0
    logits[0, 7] = 1.0
    out = apply([row([ts(5), 2])], logits)  # floor: only <|0.12|>, <|0.14|> remain
    assert masked(out) == {NO_TS} | {ts(i) for i in range(6)}
    assert out[0, 7] == 1.0  # text was not forced out


def test_forcing_ignores_suppressed_text_tokens() -> None:
    # The likeliest text token is suppressed; against what remains, timestamps win.
    logits = torch.full((1, V), -3.0)
    logits[0, 5] = 5.0
    logits[0, TB:] = 0.0
    out = apply([row([ts(0), 4], suppress=(5,))], logits)
    assert masked(out) == BELOW_TB | {ts(0)}


def test_forcing_is_decided_per_row() -> None:
    logits = torch.full((2, V), -2.0)
    logits[0, TB:] = 0.0  # row 0: timestamps dominate
    logits[1, 3] = 4.0  # row 1: a text token dominates
    out = apply([row([ts(0), 4]), row([ts(0), 4])], logits)
    assert masked(out, 0) == BELOW_TB | {ts(0)}
    assert masked(out, 1) == {NO_TS, ts(0)}


def test_after_a_closed_pair_text_is_never_forced_out() -> None:
    # Timestamps are all masked after a pair, so their mass is -inf: nothing is forced.
    logits = torch.zeros(1, V)
    logits[0, TB:] = 20.0
    out = apply([row([ts(0), 4, ts(2), ts(2)])], logits)
    assert masked(out) == {NO_TS} | STAMPS
    assert torch.equal(out[0, : EOT + 1], logits[0, : EOT + 1])  # text and eot untouched


def test_both_ways_of_masking_agree_on_random_histories(one_mask: bool) -> None:
    gen = torch.Generator().manual_seed(int(one_mask))
    rows = []
    for _ in range(40):
        n = int(torch.randint(0, 6, (1,), generator=gen))
        sampled = torch.randint(0, V, (n,), generator=gen).tolist()
        sampled = [t for t in sampled if t not in (EOT, SOT, NO_TS)]
        max_initial = None if torch.rand(1, generator=gen) < 0.5 else int(torch.randint(0, 8, (1,), generator=gen))
        rows.append(row(sampled, suppress=(2,), begin=(0,), timestamps=bool(torch.rand(1, generator=gen) < 0.8),
                        max_initial=max_initial))
    logits = torch.randn(len(rows), V, generator=gen) * 3
    slices, single = logits.clone(), logits.clone()
    apply_rules(slices, rows, ToyTokenizer(), one_mask=False)  # type: ignore[arg-type]
    apply_rules(single, rows, ToyTokenizer(), one_mask=True)  # type: ignore[arg-type]
    assert torch.equal(slices, single)
    assert slices.isinf().any()
