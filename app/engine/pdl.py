"""Programmatic dependent launch (PDL): a decode step's next kernel starts while this one drains.

A decode step of large-v3 is ~400 short kernels in a row (12 per layer). Inside a CUDA graph each
one still starts only after the previous one has finished, then spends its first microseconds
fetching its weights from memory with the GPU half idle. On Hopper and later, a kernel launched
with PDL (`launch_pdl`) may start as soon as every program of the kernel before it has called
`gdc_launch_dependents`; it then reads only what no earlier kernel writes (its weights, which it
pulls into L2) and calls `gdc_wait`, which returns once the earlier kernel has finished and its
writes are visible. Every PDL kernel here waits before it reads or writes any activation, so the
ordering stays transitive: a kernel two launches back has finished before the one in between could.

Measured end to end on an H200 (bench/gpu_ab.py pdl, tokens bit-identical): large-v3 at B=1
242 -> 224 ms per batch of 100 tokens, tiny.en at B=64 61 -> 58 ms, small at B=64 237 -> 232 ms.

Kernels take a `PDL` constexpr and open with `enter_after_previous(PDL)` (after any weight
prefetch); `launch_options(device)` gives the matching launch argument. Both are off where the GPU
or Triton lacks PDL, and on request (WHISPER_PDL=0).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

_SUPPORTED: dict[int, bool] = {}


def _triton_has_pdl() -> bool:
    if not HAVE_TRITON:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_TRITON_PDL = _triton_has_pdl()


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of compute capability >= 9.0,
    a Triton with PDL support, and WHISPER_PDL not set to 0."""
    if device.type != "cuda" or not _TRITON_PDL or os.environ.get("WHISPER_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SUPPORTED:
        _SUPPORTED[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _SUPPORTED[index]


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the `PDL` constexpr and Triton's `launch_pdl`."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


if HAVE_TRITON:
    if _TRITON_PDL:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        @triton.jit
        def enter_after_previous(PDL: tl.constexpr):
            """Wait until the previous kernel has finished (its writes visible), then let the next
            kernel launch: from here on this kernel may read and write activations."""
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
    else:

        @triton.jit
        def enter_after_previous(PDL: tl.constexpr):
            pass

    @triton.jit
    def prefetch_l2(ptrs, PDL: tl.constexpr):
        """Pull the 128-byte lines at ptrs into L2 (a hint: nothing is loaded into registers).
        Only under PDL, where it overlaps the previous kernel's tail."""
        if PDL:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def prefetch_weight_rows(w_ptr, rows, n, k, stride_wn, begin, end, BK: tl.constexpr, LINE: tl.constexpr,
                             PDL: tl.constexpr):
        """prefetch_l2 of weight rows `rows` (< n), columns [begin, end) (< k), one pointer per
        LINE-element line (LINE = 128 bytes / element size), in BK-wide steps."""
        if PDL:
            safe_rows = tl.minimum(rows, n - 1).to(tl.int64)
            for k0 in range(begin, end, BK):
                kk = tl.minimum(k0 + tl.arange(0, BK // LINE) * LINE, k - 1)
                prefetch_l2(w_ptr + safe_rows[:, None] * stride_wn + kk[None, :], PDL)


def line_elements(weight: torch.Tensor) -> int:
    """Elements of `weight` per 128-byte cache line (prefetch_weight_rows' LINE)."""
    return 128 // weight.element_size()
