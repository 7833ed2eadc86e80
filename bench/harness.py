"""Shared benchmark helpers: peak memory, result annotations, optional peers.

Every benchmark case is parametrised over ``provider`` (alignkit vs plain PyTorch vs each peer
that is installed) and sets ``benchmark.group`` so the providers of one case sit side by side
in one run. ``record`` stores what the renderer (bench/render.py) needs in ``extra_info``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Extra memory at the peak of ``fn()`` over what was held before it ran, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` delta. CPU: the process RSS high-water mark
    (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the call, after
    ``malloc_trim`` returns freed heap pages, so earlier frees are not reused unseen.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    result = fn()
    peak = _proc_status_kib("VmHWM") - before
    del result
    return max(peak, 0) * 1024


def record(
    benchmark: Any,
    provider: str,
    *,
    peak_bytes: int | None = None,
    bytes_moved: int | None = None,
    flops: float | None = None,
    **extra: Any,
) -> None:
    """Annotate a benchmark for the renderer: GB/s and TFLOP/s are derived from the median."""
    benchmark.extra_info["provider"] = provider
    if peak_bytes is not None:
        benchmark.extra_info["peak_bytes"] = int(peak_bytes)
    if bytes_moved is not None:
        benchmark.extra_info["bytes_moved"] = int(bytes_moved)
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
    benchmark.extra_info.update(extra)


def require_peer(module_name: str) -> Any:
    """Import a peer library, or skip this case saying why it is unavailable."""
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # a broken install is reported like a missing one
        pytest.skip(f"peer {module_name} unavailable: {type(exc).__name__}: {exc}")


def sync(device: str | torch.device) -> None:
    """Wait for queued device work so a timed call measures the work, not the launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
