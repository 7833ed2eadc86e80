"""Backend dispatch, in one place.

Every op has two implementations of the same function:

* ``triton``: a Triton kernel (``alignkit.kernels``). Compiled on CUDA tensors; on CPU tensors it
  runs under the Triton interpreter, which ``alignkit.kernels`` switches on by itself when no CUDA
  device is present (or that you switch on with ``TRITON_INTERPRET=1`` before importing triton).
* ``cpu``: a CPU implementation (numba or chunked torch).

``auto`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors. The choice can be forced
per call with ``backend=`` or process-wide with the ``ALIGNKIT_BACKEND`` environment variable
(``auto|triton|cpu``); the argument wins over the variable.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from . import kernels

BACKENDS = ("auto", "triton", "cpu")
ENV_VAR = "ALIGNKIT_BACKEND"

Backend = Literal["triton", "cpu"]

# Names of the ops that dispatch through `resolve`, for `alignkit info`; each ops module registers.
_REGISTERED_OPS: list[str] = []


def register_op(name: str) -> None:
    """Record that op ``name`` dispatches through :func:`resolve` (shown by ``alignkit info``)."""
    if name not in _REGISTERED_OPS:
        _REGISTERED_OPS.append(name)


def registered_ops() -> tuple[str, ...]:
    return tuple(_REGISTERED_OPS)


def requested(backend: str | None = None) -> str:
    """The requested backend name: ``backend`` if given, else ``$ALIGNKIT_BACKEND``, else auto."""
    if backend is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(
                f"environment variable {ENV_VAR} must be one of {', '.join(BACKENDS)}, got {value!r}"
            )
        return value
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    return backend.lower()


def resolve(backend: str | None, device: torch.device) -> Backend:
    """The implementation an op runs for tensors on ``device``.

    Raises ValueError for an unknown name and RuntimeError when ``triton`` is forced where it
    cannot run (triton not installed, or CPU tensors without the interpreter).
    """
    choice = requested(backend)
    if choice == "auto":
        return "triton" if device.type == "cuda" and kernels.HAS_TRITON else "cpu"
    if choice == "triton":
        if not kernels.HAS_TRITON:
            raise RuntimeError(
                "backend 'triton' was requested but triton is not installed "
                "(it is a Linux dependency of alignkit: pip install triton)"
            )
        if device.type != "cuda" and not kernels.interpreter_active():
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs the Triton interpreter, which is off in this "
                "process: set TRITON_INTERPRET=1 before triton is imported, or move the tensors to CUDA"
            )
    return choice  # type: ignore[return-value]


def describe() -> dict[str, dict[str, str]]:
    """For each registered op, the backend it uses for CPU and for CUDA tensors under the current
    ``ALIGNKIT_BACKEND`` (used by ``alignkit info``)."""
    out: dict[str, dict[str, str]] = {}
    for op in registered_ops():
        row = {}
        for device in ("cpu", "cuda"):
            try:
                row[device] = resolve(None, torch.device(device))
            except (RuntimeError, ValueError) as exc:
                row[device] = f"unavailable ({exc})"
        out[op] = row
    return out
