"""Probe: can TensorRT for RTX build and run a Whisper encoder on this GPU?

Exports the service's own `AudioEncoder` (random weights of a real model's shape, fp16) to ONNX,
builds an engine with the TensorRT API (`tensorrt_rtx`, or `tensorrt` where that is installed),
runs it, and prints a table: build time, max relative error against the torch encoder on the
same input, and the time of one encoder batch for both.

    python -m bench.tensorrt_probe --shapes tiny.en,large-v3 --batches 1,16

Needs a CUDA GPU and a TensorRT Python module; with `--export-only` it only writes and checks
the ONNX file (CPU is enough).
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from app.engine.cuda.row_gemm import choose_tiles
from app.engine.model import AudioEncoder
from app.engine.options import EngineOptions
from app.engine.runners.cuda import CudaOps
from bench.gpu import dims_for

#: module names tried in order: full TensorRT where installed, else TensorRT for RTX
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")


def import_tensorrt() -> ModuleType:
    errors = []
    for name in TENSORRT_MODULES:
        try:
            return importlib.import_module(name)
        except Exception as exc:  # ImportError, or a stub package failing on import
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise ImportError("no TensorRT module: " + "; ".join(errors))


def random_encoder(shape: str) -> AudioEncoder:
    """The service's encoder with random weights of `shape`, fp32 on the CPU (export runs there)."""
    torch.manual_seed(0)
    encoder = AudioEncoder(dims_for(shape), int8=False)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.normal_(0, 0.02)
        encoder.positional_embedding.normal_(0, 0.02)
    return encoder.eval()


def export_onnx(encoder: AudioEncoder, path: Path, n_mels: int) -> None:
    """log-mel [B, n_mels, 3000] -> encoder output [B, 1500, d], fp16, dynamic batch.

    Traced with the encoder's default operators: ONNX sees the plain torch ops (the arithmetic of
    the fused kernels, app.engine.cuda.norms), on whichever device the encoder is."""
    device = next(encoder.parameters()).device
    mel = torch.zeros(1, n_mels, 3000, dtype=torch.float16, device=device)
    torch.onnx.export(encoder, (mel,), str(path), input_names=["mel"],
                      output_names=["audio_features"],
                      dynamic_axes={"mel": {0: "batch"}, "audio_features": {0: "batch"}},
                      opset_version=17, dynamo=False, external_data=True)


def service_ops() -> CudaOps:
    """The operators a CUDA engine's encoder runs with (fused input stage and add + LayerNorm)."""
    kernels = EngineOptions(device="cuda", compute_dtype="float16").resolve().kernels
    return CudaOps(row_weights=None, fused_norms=kernels.fused_norms, fused_input=kernels.fused_encoder_input,
                   tiles=choose_tiles, pdl=kernels.pdl)


def build_engine(trt: ModuleType, onnx_path: Path, n_mels: int, max_batch: int) -> tuple[bytes, float]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
            trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("ONNX parse failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("mel", (1, n_mels, 3000), (max_batch, n_mels, 3000), (max_batch, n_mels, 3000))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError("build_serialized_network returned None (see the builder log above)")
    return bytes(serialized), seconds


class TrtEncoder:
    def __init__(self, trt: ModuleType, plan: bytes) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("deserialize_cuda_engine returned None")
        self.context = self.engine.create_execution_context()

    def __call__(self, mel: torch.Tensor, out: torch.Tensor) -> None:
        self.context.set_input_shape("mel", tuple(mel.shape))
        self.context.set_tensor_address("mel", mel.data_ptr())
        self.context.set_tensor_address("audio_features", out.data_ptr())
        stream = torch.cuda.current_stream().cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("execute_async_v3 failed")


def cuda_time(fn, repeats: int = 10) -> float:
    """Median milliseconds of `fn` after two warm-ups, timed with CUDA events."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def probe_shape(trt: ModuleType | None, shape: str, batches: list[int], workdir: Path) -> list[str]:
    dims = dims_for(shape)
    encoder = random_encoder(shape).half()
    if trt is not None:
        encoder = encoder.cuda()
    onnx_path = workdir / f"{shape}-encoder.onnx"
    start = time.perf_counter()
    export_onnx(encoder, onnx_path, dims.n_mels)
    export_s = time.perf_counter() - start
    rows = [f"{shape}: ONNX export {export_s:.1f} s"]
    if trt is None:
        return rows
    plan, build_s = build_engine(trt, onnx_path, dims.n_mels, max(batches))
    rows.append(f"{shape}: engine built in {build_s:.1f} s, {len(plan) / 2**20:.1f} MiB")
    trt_encoder = TrtEncoder(trt, plan)
    ops = service_ops()

    def torch_encoder(mel: torch.Tensor) -> torch.Tensor:  # fp16 on the GPU, with the service's fused kernels
        return encoder.encode(mel, ops)

    for batch in batches:
        mel = torch.randn(batch, dims.n_mels, 3000, device="cuda", dtype=torch.float16)
        out = torch.empty(batch, 1500, dims.n_audio_state, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            ref = torch_encoder(mel)
            trt_encoder(mel, out)
            torch.cuda.synchronize()
            rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            torch_ms = cuda_time(lambda mel=mel: torch_encoder(mel))
            trt_ms = cuda_time(lambda mel=mel, out=out: trt_encoder(mel, out))
        rows.append(f"| {shape} | {batch} | {torch_ms:.2f} | {trt_ms:.2f} | {rel:.2e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny.en,large-v3")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args()
    trt = None
    if not args.export_only:
        trt = import_tensorrt()
        print(f"TensorRT module: {trt.__name__} {getattr(trt, '__version__', '?')}")
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    batches = [int(b) for b in args.batches.split(",")]
    print("| shape | batch | torch encoder ms | TensorRT encoder ms | max rel. error |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            try:
                for row in probe_shape(trt, shape, batches, Path(tmp)):
                    print(row, flush=True)
            except Exception:
                print(f"{shape}: FAILED")
                traceback.print_exc()


if __name__ == "__main__":
    main()
