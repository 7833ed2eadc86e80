"""Triton kernels and their host launchers (shipped as ``alignkit.kernels``).

Import side effect, on purpose: when no CUDA device is present and ``TRITON_INTERPRET`` is unset,
this sets ``TRITON_INTERPRET=1`` before triton is imported, so every kernel also runs on CPU tensors
through the Triton interpreter (slow; meant for tests and ``backend="triton"`` debugging).

``ALIGNKIT_PIN_CONFIG=1`` makes every autotuned kernel use one config, the first of its list
(:func:`pinned_configs`): no autotuning sweep, one compile per kernel and shape. Tests and the
first-GPU-run correctness pass (bench/gpu.sh) set it; benchmarks leave it unset and autotune.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Whether triton is installed, without importing it: on CPU-only runs triton stays unloaded (~65 MiB)
# until a kernel module is imported. Triton ships for Linux only; the CPU implementations still work.
HAS_TRITON = importlib.util.find_spec("triton") is not None


PIN_CONFIG_ENV_VAR = "ALIGNKIT_PIN_CONFIG"


def config_pinned() -> bool:
    """Whether ``$ALIGNKIT_PIN_CONFIG`` asks autotuned kernels for one config (1/true/on)."""
    return os.environ.get(PIN_CONFIG_ENV_VAR, "0").strip().lower() in ("1", "true", "on")


def pinned_configs(configs: list) -> list:
    """An autotune config list as the kernels should use it: the first config alone when
    :func:`config_pinned` (so a kernel module lists its safest, fastest-to-compile config first),
    else the whole list. Read when the autotuner is built: set the variable before the first launch."""
    if not configs:
        raise ValueError("configs must hold at least one autotune config, got an empty list")
    return list(configs[:1]) if config_pinned() else list(configs)


def interpreter_active() -> bool:
    """Whether Triton kernels defined in this process run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s CUDA device current around a launch (Triton launches on the current
    device: tensors on cuda:1 while cuda:0 is current would be read from the wrong GPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def mask_view(mask: torch.Tensor) -> torch.Tensor:
    """A mask as kernels load it: bool storage viewed as uint8 (no copy), other dtypes as given."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def triton_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype of a torch accumulation dtype (fp64 or fp32)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32
