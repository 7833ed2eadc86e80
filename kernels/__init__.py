"""Triton kernels and their host launchers (shipped as ``alignkit.kernels``).

Import side effect, on purpose: when no CUDA device is present and ``TRITON_INTERPRET`` is unset,
this sets ``TRITON_INTERPRET=1`` before triton is imported, so every kernel also runs on CPU tensors
through the Triton interpreter (slow; meant for tests and ``backend="triton"`` debugging).
"""

from __future__ import annotations

import contextlib
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton ships for Linux only; the CPU implementations still work
    HAS_TRITON = False


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
