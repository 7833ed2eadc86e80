"""CPU implementations (numba / chunked torch): the twins of the Triton kernels in alignkit.kernels."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numba

# Row-parallel (prange) kernels pay a fork/join of numba's thread pool per call; measured on an idle
# 2-core machine, GAE at 64x512 (32k elements) already ran 1.9x faster in parallel, 64x4096 1.95x.
PARALLEL_MIN_ELEMENTS = 1 << 15

# numba's fallback "workqueue" threading layer aborts the process when two threads launch parallel
# kernels at once: alignkit launches them one at a time.
_PARALLEL_LOCK = threading.Lock()


def run_rows(serial: Callable, parallel: Callable, n_elements: int, *args) -> None:
    """Run a numba row kernel: its ``prange`` twin for large inputs on several threads, else serial."""
    if n_elements >= PARALLEL_MIN_ELEMENTS and numba.config.NUMBA_NUM_THREADS > 1:
        with _PARALLEL_LOCK:
            parallel(*args)
    else:
        serial(*args)


def to_numpy(t, dtype):
    """``t`` as a C-contiguous NumPy array of torch dtype ``dtype`` on the CPU (None stays None;
    zero-copy when it already is one)."""
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def mask_to_numpy(mask, dtype):
    """A 0/1 mask as NumPy for the numba kernels: bool and uint8 masks as they are (no copy), others
    in ``dtype``."""
    import torch

    mask = mask.detach().to("cpu")
    if mask.dtype in (torch.bool, torch.uint8, dtype):
        return mask.contiguous().numpy()
    return mask.to(dtype).contiguous().numpy()
