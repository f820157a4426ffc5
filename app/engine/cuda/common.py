"""What the Triton kernels of app.engine.cuda share: whether Triton is installed, programmatic
dependent launch, int8 widening and the two GELU forms.

Programmatic dependent launch (PDL): a decode step's next kernel starts while this one drains.
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
prefetch); `launch_args(pdl)` gives the matching launch arguments. Whether an engine launches with
PDL is decided once, when it loads (app.engine.options: the GPU, Triton and WHISPER_PDL).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


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


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can launch with PDL: a CUDA device of compute capability >= 9.0
    and a Triton with PDL support."""
    if device.type != "cuda" or not _TRITON_PDL:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 9


_WITH_PDL = {"PDL": True, "launch_pdl": True}
_WITHOUT_PDL = {"PDL": False}


def launch_args(pdl: bool) -> dict[str, bool]:
    """Keyword arguments for a kernel launch: the `PDL` constexpr and Triton's `launch_pdl`."""
    return _WITH_PDL if pdl else _WITHOUT_PDL


def line_elements(weight: torch.Tensor) -> int:
    """Elements of `weight` per 128-byte cache line (prefetch_weight_rows' LINE)."""
    return 128 // weight.element_size()


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

    @triton.jit
    def int8_to_fp16(x):
        """Exact int8 -> fp16 by bit assembly, four values per few instructions: a byte u = x + 128
        placed under the exponent of 1024.0 reads as 1024 + u, and one packed subtraction of 1152
        leaves x. The plain conversion runs at a quarter of the FMA rate on the GPU and was what
        bounded the int8 decode kernels, not their bytes."""
        return tl.inline_asm_elementwise(
            "{\n"
            ".reg .b32 u, bias;\n"
            "xor.b32 u, $2, 0x80808080;\n"
            "prmt.b32 $0, u, 0x64646464, 0x4140;\n"
            "prmt.b32 $1, u, 0x64646464, 0x4342;\n"
            "mov.b32 bias, 0x64806480;\n"
            "sub.f16x2 $0, $0, bias;\n"
            "sub.f16x2 $1, $1, bias;\n"
            "}", "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def load_widened(ptrs, mask, dtype: tl.constexpr, FAST_INT8: tl.constexpr):
        """A K/V or weight tile in `dtype`: int8 through int8_to_fp16 (exact) when FAST_INT8, else
        a plain conversion."""
        x = tl.load(ptrs, mask=mask, other=0)
        if FAST_INT8:
            return int8_to_fp16(x).to(dtype)
        return x.to(dtype)

    @triton.jit
    def gelu_erf(x):
        """torch's F.gelu (erf form), float32."""
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def tanh_approx(x):
        """The GPU's tanh instruction (relative error ~2^-11), float32."""
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def gelu_tanh(x):
        """GELU in its tanh form, as torch's F.gelu(approximate="tanh"), in float32."""
        return 0.5 * x * (1.0 + tanh_approx(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
