"""GPU memory gauges, refreshed when /metrics is scraped.

NVML (nvidia-ml-py) sees the whole device, including other processes and the CUDA context, so
it is preferred. Without NVML (no driver library in the container, non-NVIDIA build) the
torch caching allocator's reserved bytes are the next best thing. On a CPU-only host nothing
is reported, rather than zeros that would look like an idle GPU.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from app.metrics import GPU_MEMORY_TOTAL, GPU_MEMORY_USED

log = logging.getLogger(__name__)

_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised
_nvml_tried = False


def _init_nvml() -> Any:
    global _nvml, _nvml_tried
    if _nvml_tried:
        return _nvml
    _nvml_tried = True
    try:
        import pynvml

        pynvml.nvmlInit()
        _nvml = pynvml
    except Exception as exc:  # library missing, no driver, no device: all mean "no NVML"
        log.debug("NVML unavailable (%s); falling back to the torch allocator", exc)
        _nvml = None
    return _nvml


def _read_nvml(nvml: Any) -> list[tuple[str, int, int]]:
    readings = []
    for index in range(nvml.nvmlDeviceGetCount()):
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        readings.append((str(index), int(info.used), int(info.total)))
    return readings


def _read_torch() -> list[tuple[str, int, int]]:
    # Only if the runtime already imported torch: a scrape must not pay for importing it.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    readings = []
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        readings.append((str(index), int(torch.cuda.memory_reserved(index)), int(total)))
    return readings


def read_gpu_memory() -> list[tuple[str, int, int]]:
    """(gpu label, used bytes, total bytes) per device; empty on a CPU-only host."""
    with _lock:
        nvml = _init_nvml()
        if nvml is not None:
            try:
                return _read_nvml(nvml)
            except Exception as exc:
                log.warning("NVML query failed (%s); using the torch allocator", exc)
        return _read_torch()


def refresh_gpu_memory() -> None:
    for gpu, used, total in read_gpu_memory():
        GPU_MEMORY_USED.labels(gpu=gpu).set(used)
        GPU_MEMORY_TOTAL.labels(gpu=gpu).set(total)
