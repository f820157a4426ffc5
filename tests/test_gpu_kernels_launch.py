"""Cross-attention K/V writes (app.engine.kernels.write_kv_into) and programmatic dependent launch
(app.engine.pdl). The kernels run on CUDA devices only; on the CPU the engine keeps torch's path."""

from __future__ import annotations

import pytest
import torch

from app.engine import pdl
from app.engine.kernels import can_write_kv, write_kv_into

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_tensors_take_the_torch_path() -> None:
    assert not can_write_kv(torch.randn(2, 3, 8).half(), quantize=False)
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}


def test_pdl_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPER_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_copies_head_major_into_the_given_rows(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, t, heads, dh = 3, 700, 6, 64
    kv = torch.randn(b, t, 2 * heads * dh, device="cuda", dtype=dtype)
    rows = [4, 1, 6]
    k = torch.zeros(8, heads, 1500, dh, device="cuda", dtype=dtype)
    v = torch.zeros_like(k)
    write_kv_into(kv, heads, torch.tensor(rows, device="cuda"), k, v)
    split = kv.view(b, t, 2, heads, dh).permute(2, 0, 3, 1, 4)
    index = torch.tensor(rows, device="cuda")
    assert torch.equal(k[index, :, :t], split[0])
    assert torch.equal(v[index, :, :t], split[1])
    others = [r for r in range(8) if r not in rows]
    assert k[others].count_nonzero() == 0 and k[:, :, t:].count_nonzero() == 0
