"""Plot RTFx against batch size from a `bench/gpu.py --json` result: one panel per model shape.

    python bench/plot_gpu.py bench/results/2026-11-22-gpu-bench-h200.json docs/gpu-rtfx-h200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# one colour per implementation in every panel
COLORS = {"ours fp16": "tab:blue", "ours fp16 + int8 cross-K/V": "tab:cyan", "ours fp16 + fp8 encoder": "tab:purple",
          "ours int8 cross-K/V + fp8 encoder": "tab:red", "HF transformers": "tab:orange", "openai-whisper": "tab:green"}

def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(source.read_text())
    rows = [r for r in data["rows"] if r["rtfx"]]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows if r["shape"] == shape):
            points = sorted((r["B"], r["rtfx"]) for r in rows if r["shape"] == shape and r["impl"] == impl)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl,
                    color=COLORS.get(impl))
        ax.set(title=shape, xscale="log", yscale="log", xlabel="batch size (windows)", ylabel="RTFx")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['gpu']}: RTFx vs batch size (fp16 unless named, N=100 tokens, random weights)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
