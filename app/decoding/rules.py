"""Whisper's logit rules, applied to a batch of rows: suppression and timestamp grammar.

One implementation, shared by greedy, sampling and beam search, and by every backend that steps
token by token. Mirrors openai-whisper's SuppressBlank / SuppressTokens / ApplyTimestampRules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from app.decoding.tokenizer import WhisperTokenizer


@dataclass
class RowRules:
    """What the rules need to know about one row."""

    sampled: list[int]  # tokens sampled so far in this window
    suppress: tuple[int, ...]  # always-suppressed ids
    suppress_begin: tuple[int, ...]  # ids suppressed at the first sampled position ((): off)
    timestamps: bool
    max_initial_timestamp_index: int | None


def apply_rules(logits: Tensor, rows: list[RowRules], tokenizer: WhisperTokenizer) -> None:
    """Mask logits [R, V] in place (-inf) according to each row's rules."""
    neg_inf = float("-inf")
    device = logits.device
    # Group rows by identical suppress list: one indexed write per distinct list (usually one).
    by_list: dict[tuple[int, ...], list[int]] = {}
    begin_rows: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        if row.suppress:
            by_list.setdefault(row.suppress, []).append(r)
        if row.suppress_begin and not row.sampled:
            begin_rows.setdefault(row.suppress_begin, []).append(r)
    for ids, rs in (*by_list.items(), *begin_rows.items()):
        logits[torch.tensor(rs, device=device)[:, None], torch.tensor(ids, device=device)[None, :]] = neg_inf

    ts_rows = [r for r, row in enumerate(rows) if row.timestamps]
    if not ts_rows:
        return
    tb = tokenizer.timestamp_begin
    eot = tokenizer.eot
    logits[ts_rows, tokenizer.no_timestamps] = neg_inf
    for r in ts_rows:
        row = rows[r]
        seq = row.sampled
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penultimate_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penultimate_ts:  # a pair closed: next must be text (or eot)
                logits[r, tb:] = neg_inf
            else:  # an open segment end: next must be a timestamp or eot
                logits[r, :eot] = neg_inf
        stamps = [t for t in seq if t >= tb]
        if stamps:
            # timestamps never decrease; a new segment cannot start before the last one ended
            floor = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
            logits[r, tb:floor] = neg_inf
        if not seq:
            logits[r, :tb] = neg_inf  # a window starts with a timestamp
            if row.max_initial_timestamp_index is not None:
                logits[r, tb + row.max_initial_timestamp_index + 1:] = neg_inf
    # If the timestamps together are likelier than any single text token, force a timestamp.
    idx = torch.tensor(ts_rows, device=device)
    logprobs = torch.log_softmax(logits[idx].float(), dim=-1)
    ts_mass = torch.logsumexp(logprobs[:, tb:], dim=-1)
    text_max = logprobs[:, :tb].max(dim=-1).values
    force = idx[ts_mass > text_max]
    if force.numel():
        logits[force, :tb] = neg_inf
