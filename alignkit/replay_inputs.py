"""Conversion and validation of replay-buffer inputs that need no buffer state.

Fields arrive as NumPy arrays, CPU torch tensors (viewed zero-copy through ``Tensor.numpy()``) or
lists; ids, lengths, priorities and options are checked here before they reach the C++ core.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .replay_schema import _NUMPY_DTYPE_TO_TORCH


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _as_array(value: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous NumPy view (zero-copy when possible) of a field, with its exact dtype."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"field {name!r} must be a CPU tensor, got device {value.device}")
        if value.dtype != _NUMPY_DTYPE_TO_TORCH[dtype]:
            raise TypeError(
                f"field {name!r} must have dtype {_NUMPY_DTYPE_TO_TORCH[dtype]}, got {value.dtype}"
            )
        return np.ascontiguousarray(value.detach().resolve_conj().resolve_neg().numpy())
    if isinstance(value, np.ndarray):
        if value.dtype != dtype:
            raise TypeError(f"field {name!r} must have dtype {dtype.name}, got {value.dtype}")
        return np.ascontiguousarray(value)
    if isinstance(value, (list, tuple, int, float, bool, np.generic)):
        try:
            raw = np.asarray(value)
        except ValueError as exc:
            raise ValueError(f"field {name!r} is not a rectangular array: {exc}") from None
        if raw.dtype == object:
            raw = _object_numbers(raw, name, dtype)
        integers = raw.dtype.kind in "iu" and dtype.kind in "iu"  # range-checked below
        if raw.dtype.kind not in "biuf" or not (
            integers or np.can_cast(raw.dtype, dtype, casting="same_kind")
        ):
            raise TypeError(f"field {name!r} must hold {dtype.name} values, got {raw.dtype}")
        return _checked_cast(raw, name, dtype)
    raise TypeError(
        f"field {name!r} must be a NumPy array, a CPU torch tensor or a list, got {type(value).__name__}"
    )


def _object_numbers(raw: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    """An object array from a list (Python ints beyond 64 bits) as numbers, or as it was."""
    flat = raw.reshape(-1).tolist()
    if not flat or not all(isinstance(v, (int, float)) for v in flat):
        return raw
    if dtype.kind in "iub":
        bad = next(v for v in flat if not isinstance(v, int) or not -(2**63) <= v < 2**64)
        raise ValueError(f"field {name!r} value {bad!r} does not fit in {dtype.name}")
    try:
        return raw.astype(np.float64)
    except OverflowError:
        raise ValueError(f"field {name!r} has a value too large for {dtype.name}") from None


def _checked_cast(raw: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    """raw (from a list or scalar) cast to dtype, rejecting values that would wrap or overflow."""
    if raw.size and dtype.kind in "iu" and raw.dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = raw.min(), raw.max()
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(
                f"field {name!r} value {int(bad)} does not fit in {dtype.name} [{info.min}, {info.max}]"
            )
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(raw, dtype=dtype)
    if raw.size and dtype.kind == "f":
        overflow = np.isinf(out) & np.isfinite(raw)
        if overflow.any():
            bad = raw.reshape(-1)[overflow.reshape(-1)][0]
            info = np.finfo(dtype)
            raise ValueError(
                f"field {name!r} value {bad.item()!r} is out of range for {dtype.name} "
                f"(finite values must lie within +-{float(info.max):g})"
            )
    return out


def _int_array(value: Any, name: str) -> np.ndarray:
    a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _ids_array(ids: Any) -> np.ndarray:
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    a = _int_array(ids, "ids")
    if a.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {a.shape}")
    return a


def _priorities_array(value: Any, name: str, n: int | None = None) -> np.ndarray:
    a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
    if n is not None and a.size != n:
        raise ValueError(f"{name} must have {n} values, got {a.size}")
    if a.size and not (np.isfinite(a).all() and (a > 0).all()):
        bad = a[~(np.isfinite(a) & (a > 0))][0]
        raise ValueError(f"{name} must be finite and > 0, got {bad}")
    return a


def _padded_starts(
    lengths: Any, mask: Any, padding_side: str, B: int, T: int
) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths, (B,) int64 each, of the sequences in padded (B, T) fields, from
    either ``lengths`` (with ``padding_side``) or a ``mask`` with one run of nonzero entries per row."""
    if lengths is not None:
        lens = _int_array(lengths, "lengths")
        if lens.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {lens.shape}")
        if B and (lens.min() < 1 or lens.max() > T):
            raise ValueError(
                f"lengths must lie in [1, {T}] (T of the padded fields), got {lens.min()}..{lens.max()}"
            )
        starts = np.zeros(B, np.int64) if padding_side == "right" else (T - lens)
    else:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape != (B, T):
            raise ValueError(f"mask must have the shape of the padded fields {(B, T)}, got {m.shape}")
        m = m.astype(bool)
        lens = m.sum(axis=1).astype(np.int64)
        if B and lens.min() == 0:
            raise ValueError(f"mask row {int(np.argmin(lens))} is empty (sequences need at least one token)")
        starts = np.argmax(m, axis=1).astype(np.int64)
        last = T - 1 - np.argmax(m[:, ::-1], axis=1)
        bad = np.nonzero(last - starts + 1 != lens)[0]
        if bad.size:
            raise ValueError(f"mask row {int(bad[0])} is not one contiguous run of ones")
    return starts, lens


def _packed_starts(cu_seqlens: Any, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths of packed sequences from ``cu_seqlens`` (B + 1,) over N tokens."""
    cu = _int_array(cu_seqlens, "cu_seqlens")
    if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or cu[-1] != N:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at N={N}, got {cu.tolist()[:8]}...")
    lens = np.diff(cu)
    if lens.size and lens.min() <= 0:
        raise ValueError("cu_seqlens must be strictly increasing (sequences need at least one token)")
    return np.ascontiguousarray(cu[:-1]), np.ascontiguousarray(lens)


def _timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(f"timeout must be a number >= 0 or None, got {timeout!r}")
    return float(timeout)


def _check_pin_memory(pin_memory: bool) -> None:
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (pinned host memory is for fast copies to a GPU)")
