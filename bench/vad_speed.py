"""Silero VAD runtimes on this CPU: TorchScript and ONNX Runtime, per frame and batched.

python -m bench.vad_speed [--seconds 60] [--repeat 3]

Scores the same audio (a dev clip padded with white noise to --seconds) with one torch /
ONNX Runtime thread each way and prints the best wall time of --repeat runs and the largest
difference from the stock TorchScript model's probabilities:

- TorchScript, one 512-sample frame per call (the stock wrapper);
- TorchScript batched (app.audio.vad: encoder over blocks of frames, nn.LSTM over the block);
- ONNX Runtime `silero_vad.onnx`, one frame per call;
- ONNX Runtime `silero_vad_16k_sequence.onnx`, 512 frames per call.

Then, as realtime streams feed it (--append-ms pieces, 1-3 frames a call), milliseconds of CPU
per second of audio: StreamingVad (ONNX Runtime's sequence model) against the batched
TorchScript path called on each piece.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from app.audio import vad
from bench import common


def stock_per_frame(audio: np.ndarray) -> np.ndarray:
    model = torch.jit.load(str(vad._model_path())).eval()
    frames = audio.reshape(-1, vad.FRAME_SAMPLES)
    with torch.inference_mode():
        return np.array([model(torch.from_numpy(f)[None], 16000).item() for f in frames])


def onnx_runner(name: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.inter_op_num_threads = options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(vad._model_path().with_name(name)), options,
                                   providers=["CPUExecutionProvider"])
    sequence = "sequence" in name

    def run(audio: np.ndarray) -> np.ndarray:
        x = vad._frames(audio, 0, len(audio) // vad.FRAME_SAMPLES)
        probs = []
        if sequence:
            h = np.zeros((1, 1, 128), np.float32)
            c = h.copy()
            for i in range(0, len(x), 512):
                p, h, c = session.run(["speech_probs", "hn", "cn"],
                                      {"input": np.ascontiguousarray(x[i : i + 512]), "h": h, "c": c})
                probs.append(p.reshape(-1))
            return np.concatenate(probs)
        state = np.zeros((2, 1, 128), np.float32)
        sr = np.array(16000, dtype=np.int64)
        for row in x:
            p, state = session.run(None, {"input": row[None].copy(), "state": state, "sr": sr})
            probs.append(p.item())
        return np.array(probs)

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vad_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--append-ms", type=int, default=100)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = int(args.seconds * 16000) // vad.FRAME_SAMPLES * vad.FRAME_SAMPLES
    audio = (np.random.default_rng(0).uniform(-0.1, 0.1, n)).astype(np.float32)
    clip = common.load_audio(common.load_manifest(limit=1))[0][:n]
    audio[: len(clip)] = clip
    runs = {
        "TorchScript, one frame a call": stock_per_frame,
        "TorchScript, batched (app.audio.vad)": vad.speech_probabilities,
        "ONNX Runtime, one frame a call": onnx_runner("silero_vad.onnx"),
        "ONNX Runtime, sequence model": onnx_runner("silero_vad_16k_sequence.onnx"),
    }
    reference = stock_per_frame(audio)
    print(f"{common.cpu_model()}; {args.seconds:.0f} s of audio; others' CPU "
          f"{common.others_busy_pct(1.0):.0f} % before")
    print("| runtime | best wall s | max |prob - stock| |")
    print("|---|---|---|")
    for name, run in runs.items():
        best, probs = float("inf"), reference
        for _ in range(args.repeat):
            started = time.perf_counter()
            probs = run(audio)
            best = min(best, time.perf_counter() - started)
        print(f"| {name} | {best:.3f} | {np.abs(probs - reference).max():.1e} |", flush=True)
    stream(audio, args.append_ms)


def stream(audio: np.ndarray, append_ms: int) -> None:
    step = 16 * append_ms
    seconds = len(audio) / 16000

    def onnx_stream() -> None:
        detector = vad.StreamingVad()
        for i in range(0, len(audio), step):
            detector.push(audio[i : i + step])

    def torch_stream() -> None:
        model, state = vad.silero_model("cpu"), None
        pending = np.zeros(0, np.float32)
        context = np.zeros(vad.CONTEXT_SAMPLES, np.float32)
        for i in range(0, len(audio), step):
            pending = np.concatenate([pending, audio[i : i + step]])
            n = len(pending) // vad.FRAME_SAMPLES
            if n:
                block = np.concatenate([context, pending[: n * vad.FRAME_SAMPLES]])
                frames = np.lib.stride_tricks.sliding_window_view(block, 576)[:: vad.FRAME_SAMPLES]
                _, state = model(frames, state)
                context, pending = block[-vad.CONTEXT_SAMPLES :], pending[n * vad.FRAME_SAMPLES :]

    print(f"\n| streaming, {append_ms} ms appends | ms CPU per s of audio |\n|---|---|")
    for name, run in (("ONNX Runtime sequence model (StreamingVad)", onnx_stream),
                      ("TorchScript batched path", torch_stream)):
        started = time.process_time()
        run()
        print(f"| {name} | {1000 * (time.process_time() - started) / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
