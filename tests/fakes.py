"""Small test doubles shared by the decoding, decode-loop, long-form and engine-load tests.

- `FakeBpe` stands in for a `tokenizers.Tokenizer`: text token i spells " t{i}", so scripted
  token lists have predictable text (and compression ratios) without a tokenizer file.
- `tiny_dims` / `tiny_config` / `random_model` / `random_engine`: a random Whisper of the real
  vocabulary with tiny layers, cheap enough to run the whole decode loop on CPU in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from app.decoding.search import rows_needed
from app.decoding.tokenizer import WhisperTokenizer
from app.decoding.window import WindowResult, WindowTask
from app.engine.config import EngineConfig, ModelDims
from app.engine.convert.tokenizer_info import expected_special_tokens
from app.engine.cuda.fp8 import fp8_supported
from app.engine.model import WhisperModel
from app.engine.options import EngineOptions
from app.engine.torch_engine import TorchEngine
from app.scheduler.rows import RowPlan
from app.scheduler.scheduler import SchedulerOptions

#: tests of the GPU paths; they skip where no CUDA device is present
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: tests of the fp8 paths' kernels and GEMMs
fp8_cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported(torch.device("cuda"))),
                                   reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")

ENGLISH_VOCAB = 51864
#: special ids of an English-only vocabulary (eot 50256 ... timestamp_begin 50363)
SPECIAL = expected_special_tokens(ENGLISH_VOCAB)

_WORD = re.compile(r"t(\d+)")


@dataclass
class _Encoding:
    ids: list[int]


class FakeBpe:
    """Token i <-> " t{i}"; encode() understands exactly the words decode() writes."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f" t{i}" for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        ids = []
        for word in text.split():
            match = _WORD.fullmatch(word)
            if match is None:
                raise ValueError(f"FakeBpe only encodes words like 't12', got {word!r}")
            ids.append(int(match.group(1)))
        return _Encoding(ids)


def fake_tokenizer() -> WhisperTokenizer:
    """A real WhisperTokenizer (special-token logic included) over FakeBpe's text."""
    return WhisperTokenizer(FakeBpe(), SPECIAL, multilingual=False)  # type: ignore[arg-type]


def tiny_dims(n_audio_ctx: int = 1500) -> ModelDims:
    """2 heads of 32, 2 + 2 layers, the real English vocabulary.

    A shorter audio context (mel frames = 2 x n_audio_ctx) makes the encoder far cheaper; the
    decode loop never depends on its length.
    """
    return ModelDims(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=2,
                     n_audio_layer=2, n_text_state=64, n_text_head=2, n_text_layer=2,
                     n_vocab=ENGLISH_VOCAB, ffn_dim=256)


def tiny_config(name: str = "tiny-random", **overrides: object) -> EngineConfig:
    """An engine config for tiny_dims(), built the way bench/gpu.py's config_for builds one,
    with Whisper-like suppression lists (a few text ids and the non-timestamp specials)."""
    s = SPECIAL
    suppress = [1, 2, 7, 8, 9, s.translate, s.transcribe, s.sot_lm, s.sot_prev, s.sot, s.no_speech]
    fields: dict[str, object] = dict(
        name=name, dims=tiny_dims(), multilingual=False, dtype="float32",
        special_tokens=SPECIAL, suppress_tokens=suppress, suppress_tokens_begin=[220, s.eot],
        alignment_heads=[(1, 0)], weights_sha256="0" * 64,
    )
    fields.update(overrides)
    return EngineConfig(**fields)  # type: ignore[arg-type]


def random_model(seed: int = 0, dims: ModelDims | None = None) -> WhisperModel:
    """Random weights, positional embeddings included (they are zeros until loaded).

    The decoder's linears get a large gain: with default init the tied output projection makes
    every row repeat one token whatever the audio; with it, tokens depend on audio, position and
    history, so a row mix-up in the decode loop changes the output.
    """
    with torch.random.fork_rng(), torch.no_grad():  # leave the global RNG as it was
        torch.manual_seed(seed)
        model = WhisperModel(dims or tiny_dims())
        model.encoder.positional_embedding.normal_(0, 0.5)
        model.decoder.positional_embedding.normal_(0, 1.0)
        model.decoder.token_embedding.weight.normal_(0, 1.0)
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 3.0 / module.in_features**0.5)
    return model.float().eval()


def random_engine(model: WhisperModel, max_rows: int = 16, *, int8_cross_kv: bool = False,
                  config: EngineConfig | None = None) -> TorchEngine:
    """A CPU engine over `model` (float32)."""
    return TorchEngine(config or tiny_config(), model,
                       EngineOptions(device="cpu", max_rows=max_rows, int8_cross_kv=int8_cross_kv))


def random_mel(seed: int, n_mels: int = 80, frames: int = 3000) -> torch.Tensor:
    return torch.randn(n_mels, frames, generator=torch.Generator().manual_seed(seed))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads, then restore the previous count.

    These tests move small tensors: on busy CI cores one thread is several times faster than
    two threads spinning at OpenMP barriers.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: Scheduler options for tests: windows are admitted at once, without a batch-gathering pause.
NO_WAIT = SchedulerOptions(batch_wait_ms=0)


@dataclass
class FakeLoop:
    """Stands in for DecodeLoop under the scheduler: `rows` rows, every admitted window finishes
    on the next step. `fault` is the fault-injection seam: called with the windows about to be
    admitted or stepped, it may raise what an engine would."""

    rows: int = 1
    fault: Callable[[str, list[WindowTask]], None] = lambda phase, tasks: None
    active: list[SimpleNamespace] = field(default_factory=list)
    admitted: list[WindowTask] = field(default_factory=list)
    cancelled: list[WindowTask] = field(default_factory=list)
    most_active: int = 0

    def rows_in_use(self) -> int:
        return sum(rows_needed(w.task.options) for w in self.active)

    def plan(self) -> RowPlan:
        used = self.rows_in_use()
        return RowPlan([r < used for r in range(self.rows)])

    def admit(self, tasks: list[WindowTask], plan: RowPlan | None = None
              ) -> list[tuple[WindowTask, WindowResult]]:
        self.fault("admit", [w.task for w in self.active] + tasks)
        self.admitted.extend(tasks)
        self.active.extend(SimpleNamespace(task=t) for t in tasks)
        self.most_active = max(self.most_active, len(self.active))
        return []

    def step(self) -> list[tuple[WindowTask, WindowResult]]:
        self.fault("step", [w.task for w in self.active])
        done = [(w.task, WindowResult(list(w.task.previous_tokens), -1.0, -0.5, 0.1, 0.0, "en"))
                for w in self.active]
        self.active = []
        return done

    def cancel(self, task: WindowTask) -> None:
        self.cancelled.append(task)
        self.active = [w for w in self.active if w.task is not task]

    def reset(self) -> None:
        self.active = []
