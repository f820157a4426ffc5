"""The model's own forward (app.engine.model: the whole sequence at once, torch's operators)
against the reference runner's cached decoding of the same tokens."""

from __future__ import annotations

import torch
from fakes import random_engine, random_mel, random_model, tiny_dims


def test_whole_sequence_forward_matches_cached_decoding() -> None:
    dims = tiny_dims(n_audio_ctx=100)
    model = random_model(seed=5, dims=dims)
    mel = random_mel(9, frames=200)[None]
    tokens = torch.tensor([[50257, 50362, 300, 301, 302]])
    with torch.inference_mode():
        expected = model(mel, tokens)
        engine = random_engine(model, max_rows=1)  # packed GEMMs on the CPU: the last bits differ
        engine.encode_into_rows(mel, [0])
        prefill = engine.decode(tokens[:, :2], torch.tensor([0]), 0, 2, cross_runs=[(0, 1, 1, 100)])
        steps = [engine.decode(tokens[:, t : t + 1], torch.tensor([t]), 0, t + 1, cross_runs=[(0, 1, 1, 100)])
                 for t in range(2, 5)]
    got = torch.cat([prefill, *steps], dim=1)
    assert got.shape == expected.shape == (1, 5, dims.n_vocab) and expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
