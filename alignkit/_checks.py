"""Input validation and dtype rules shared by the public ops, in one place: every message names the
argument and what it got. Wrong types raise TypeError, wrong values ValueError.

Validation mode. Shape, dtype and device checks always run (they read only metadata). Checks of
tensor *values* (a mask holds only 0 and 1, a mask selects enough elements to whiten, packed
``cu_seqlens`` offsets are increasing) must read the data on the host: free on CPU, but on CUDA a
device sync that stalls the CPU on every call and makes the op impossible to capture in a CUDA
graph. :func:`set_validation` (or the environment variable ``ALIGNKIT_VALIDATION``) picks:

* ``"auto"`` (default): value checks on CPU tensors, none on CUDA tensors (sync-free hot paths);
* ``"full"``: value checks everywhere (debugging on a GPU: each check is one device sync);
* ``"shapes"``: no value checks anywhere (shape, dtype and device checks only).

Without value checks, bad values are not reported: a mask holding 2 counts twice, too small a mask
whitens to NaN, and ``cu_seqlens`` offsets outside [0, N] read out of bounds.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------- validation mode

VALIDATION_MODES = ("auto", "full", "shapes")
VALIDATION_ENV_VAR = "ALIGNKIT_VALIDATION"

_validation: str | None = None  # set_validation's choice; None: the environment variable decides


def set_validation(mode: str | None) -> str | None:
    """Choose which tensor values alignkit's ops check (module docstring above): ``"auto"`` (value
    checks on CPU tensors only, the default), ``"full"`` or ``"shapes"``; ``None`` goes back to
    ``$ALIGNKIT_VALIDATION``. Process-wide; returns the previous setting (restore it with another
    call)."""
    global _validation
    if mode is not None and (not isinstance(mode, str) or mode not in VALIDATION_MODES):
        raise ValueError(f"mode must be one of {', '.join(VALIDATION_MODES)} or None, got {mode!r}")
    previous, _validation = _validation, mode
    return previous


def validation_mode() -> str:
    """The validation mode in force: :func:`set_validation`'s, else ``$ALIGNKIT_VALIDATION``, else
    ``"auto"``."""
    if _validation is not None:
        return _validation
    value = os.environ.get(VALIDATION_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in VALIDATION_MODES:
        raise ValueError(
            f"environment variable {VALIDATION_ENV_VAR} must be one of {', '.join(VALIDATION_MODES)}, "
            f"got {value!r}"
        )
    return value


def checks_values(t: torch.Tensor) -> bool:
    """Whether the value checks of the validation mode run for data on ``t``'s device (in ``auto``:
    on CPU only, where reading a value costs no device sync)."""
    mode = validation_mode()
    return mode == "full" or (mode == "auto" and t.device.type == "cpu")


# ----------------------------------------------------------------------------- tensors


def tensor(x: object, name: str) -> torch.Tensor:
    """``x`` itself when it is a tensor with storage (not on the meta device)."""
    if not isinstance(x, torch.Tensor):
        got = "None" if x is None else type(x).__name__
        raise TypeError(f"{name} must be a torch.Tensor, got {got}")
    if x.device.type == "meta":
        raise ValueError(f"{name} must hold data (a CPU or CUDA tensor), got a tensor on the meta device")
    return x


def float_tensor(x: object, name: str, ndim: int | None = None) -> torch.Tensor:
    x = tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def same_shape(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def same_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def float_like(x: object, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A float tensor of ``ref``'s shape and device."""
    x = float_tensor(x, name)
    same_shape(x, name, ref, ref_name)
    same_device(x, name, ref, ref_name)
    return x


def mask(m: object, name: str, ref: torch.Tensor, ref_name: str, check_values: bool = True) -> torch.Tensor:
    """A 0/1 mask of ``ref``'s shape and device (bool, integer or float dtype).

    ``check_values`` asks for :func:`zero_one` (one reduction; skipped where the validation mode
    skips value checks)."""
    m = tensor(m, name)
    same_shape(m, name, ref, ref_name)
    same_device(m, name, ref, ref_name)
    if m.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {m.dtype}")
    if check_values:
        zero_one(m, name)
    return m


def zero_one(m: torch.Tensor, name: str) -> None:
    """Raise unless every element of ``m`` is 0 or 1: one reduction and a host read, skipped where
    the validation mode skips value checks (by default on CUDA, where the read is a device sync)."""
    if m.dtype != torch.bool and checks_values(m) and bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1")


def integer_tensor(x: object, name: str) -> torch.Tensor:
    x = tensor(x, name)
    if x.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def cu_seqlens(value: Any, total: int, name: str = "cu_seqlens") -> torch.Tensor:
    """Offsets of sequences packed end to end, as a CPU int64 tensor (one device-to-host copy when
    given on CUDA). The one contract of alignkit: 1-D integers (tensor, NumPy array or list), at
    least 2 entries, ``[0] == 0``, ``[-1] == total``, strictly increasing (every sequence holds at
    least one token)."""
    if isinstance(value, torch.Tensor):
        value = tensor(value, name)
        if value.dtype not in INTEGER_DTYPES:
            raise TypeError(f"{name} must hold integers, got {value.dtype}")
        host = value.detach().to("cpu", torch.int64)
    elif isinstance(value, (np.ndarray, list, tuple)):
        arr = np.asarray(value)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
            raise ValueError(f"{name} holds an offset beyond int64, got {int(arr.max())}")
        host = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    else:
        got = "None" if value is None else type(value).__name__
        raise TypeError(f"{name} must be a 1-D integer tensor, NumPy array or list, got {got}")
    if host.dim() != 1 or host.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 offsets, got shape {tuple(host.shape)}")
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    if int(host[-1]) != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {int(host[-1])}")
    steps = host[1:] - host[:-1]
    if bool((steps <= 0).any()):
        at = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(
            f"{name} must be strictly increasing (every sequence holds at least one token), got "
            f"{int(host[at])} then {int(host[at + 1])} at index {at}"
        )
    return host


def cu_seqlens_unread(value: Any, device: torch.device, name: str = "cu_seqlens") -> torch.Tensor | None:
    """``value`` itself, checked for dtype and shape only, when it is a tensor on ``device`` whose
    values the validation mode does not check (by default: on CUDA); else None, and the caller
    validates it with :func:`cu_seqlens` (a host read: a device sync for a CUDA tensor). A kernel
    can then take the offsets where they are, with no device-to-host copy."""
    if not isinstance(value, torch.Tensor) or value.device != device or checks_values(value):
        return None
    value = tensor(value, name)
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integers, got {value.dtype}")
    if value.dim() != 1 or value.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 offsets, got shape {tuple(value.shape)}")
    return value.detach()


# ----------------------------------------------------------------------------- dtypes


def accumulation_dtype(*tensors: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The one accumulation rule: fp64 when any given tensor (or dtype) is fp64, else fp32
    (fp16 / bf16 / fp32 inputs accumulate in fp32)."""
    for t in tensors:
        dtype = t if isinstance(t, torch.dtype) else getattr(t, "dtype", None)
        if dtype == torch.float64:
            return torch.float64
    return torch.float32


# ----------------------------------------------------------------------------- scalars


def _number(value: object, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return float(value)


def finite(value: object, name: str) -> float:
    value = _number(value, name, "a float")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def non_negative(value: object, name: str) -> float:
    value = _number(value, name, "a non-negative float")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value}")
    return value


def unit_interval(value: object, name: str) -> float:
    value = _number(value, name, "a float in [0, 1]")
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def positive(value: object, name: str) -> float:
    value = _number(value, name, "a positive float")
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def eps(value: object, name: str = "eps") -> float:
    """A non-negative finite epsilon (TypeError for a non-number)."""
    return non_negative(value, name)


def integer(value: object, name: str) -> int:
    """A Python or NumPy integer (bools and integral floats such as 1.5 or 2.0 are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def positive_int(value: object, name: str) -> int:
    value = integer(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def non_negative_int(value: object, name: str) -> int:
    value = integer(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


def chunk_size(value: object, name: str = "chunk_size") -> int | None:
    """None (the op's default) or a positive int."""
    return None if value is None else positive_int(value, name)


def ignore_index(value: object, name: str = "ignore_index") -> int:
    return integer(value, name)


def flag(value: object, name: str) -> bool:
    """A bool (NumPy bools too); 0/1 ints and other truthy objects are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def choice(value: object, name: str, options) -> str:
    """``value`` when it is one of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value
