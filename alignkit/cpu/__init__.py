"""CPU implementations (numba / chunked torch): the twins of the Triton kernels in alignkit.kernels.

The numba kernels have plain-torch twins for small inputs (losses_torch.py, advantages_torch.py):
the first numba call loads numba and LLVM, about 120 MiB of resident memory (measured: 408 -> 526
MiB RSS for one small policy loss), a quarter of what a small CPU training run otherwise holds,
while a batch of a few thousand tokens costs microseconds either way. :func:`use_torch_twin`
decides; the tests run every CPU case through both (tests/conftest.py ``cpu_twin``).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

# Row-parallel (prange) kernels pay a fork/join of numba's thread pool per call; measured on an idle
# 2-core machine, GAE at 64x512 (32k elements) already ran 1.9x faster in parallel, 64x4096 1.95x.
PARALLEL_MIN_ELEMENTS = 1 << 15

# Below these sizes the torch twins run (numba above: one vectorised pass, no temporaries). The
# scans' twins loop over time steps in Python, hence their own cap.
TORCH_TWIN_MAX_ELEMENTS = 1 << 16
TORCH_TWIN_MAX_STEPS = 256


def use_torch_twin(elements: int, steps: int = 0) -> bool:
    """Whether a CPU pass over ``elements`` values (a scan: over ``steps`` time steps) runs the
    plain-torch twin instead of the numba kernel."""
    return elements < TORCH_TWIN_MAX_ELEMENTS and steps <= TORCH_TWIN_MAX_STEPS


# numba's fallback "workqueue" threading layer aborts the process when two threads launch parallel
# kernels at once: alignkit launches them one at a time.
_PARALLEL_LOCK = threading.Lock()


class LazyModule:
    """Stands for module ``name`` and imports it on first attribute access (then a sys.modules
    lookup; the import lock makes a first use from two threads safe): the numba kernels' modules
    load numba (~60 MiB, a quarter second) only when a CPU op first runs, so ``import alignkit``
    stays light on GPU machines and for rollout-only use."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


def run_rows(serial: Callable, parallel: Callable, n_elements: int, *args) -> None:
    """Run a numba row kernel: its ``prange`` twin for large inputs on several threads, else serial."""
    import numba  # loaded already: the caller is a numba kernel module

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
