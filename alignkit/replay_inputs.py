"""Conversion and validation of replay-buffer inputs that need no buffer state.

Fields arrive as NumPy arrays, CPU torch tensors (viewed zero-copy through ``Tensor.numpy()``) or
lists; ids, lengths, priorities and options are checked here, with messages that name the
argument, before they reach the C++ core (whose integers are int64: larger values are refused
here rather than overflowing in the bindings).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import _checks
from .replay_schema import LAYOUTS, NUMPY_DTYPE_TO_TORCH, pad_bytes

INT64_MAX = 2**63 - 1
MAX_CAPACITY_TOKENS = 2**40  # = kMaxCapacityTokens in csrc/core/replay_buffer.h
PADDING_SIDES = ("right", "left")


# ----------------------------------------------------------------------------- scalars


def int64_value(value: Any, name: str, *, low: int = -(2**63)) -> int:
    """An int (not a bool or float) in [low, 2**63 - 1], the range the core's int64 holds."""
    value = _checks.integer(value, name)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be at most 2**63 - 1 (int64), got {value}")
    return value


def positive_int64(value: Any, name: str) -> int:
    """A positive int that fits in int64."""
    return int64_value(_checks.positive_int(value, name), name, low=1)


def capacity_tokens_value(value: Any) -> int:
    """``capacity_tokens``: a positive int, at most :data:`MAX_CAPACITY_TOKENS` (2**40). The rings
    are allocated for the tokens stored, so a large capacity reserves nothing up front."""
    value = _checks.positive_int(value, "capacity_tokens")
    if value > MAX_CAPACITY_TOKENS:
        raise ValueError(f"capacity_tokens must be at most 2**40 ({MAX_CAPACITY_TOKENS}), got {value}")
    return value


def seed_value(seed: Any) -> int:
    """A seed: an int in [0, 2**64)."""
    seed = _checks.integer(seed, "seed")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    return seed


def priority_value(priority: Any) -> float:
    """One priority: a positive finite number (a one-element tensor is read with ``.item()``)."""
    if isinstance(priority, torch.Tensor):
        priority = _checks.tensor(priority, "priority")
        if priority.numel() != 1 or priority.is_complex() or priority.dtype == torch.bool:
            raise TypeError(
                f"priority must be one real number, got a {priority.dtype} tensor {tuple(priority.shape)}"
            )
        priority = priority.item()
    return _checks.positive(priority, "priority")


def timeout_seconds(timeout: Any) -> float | None:
    """None (wait forever) or a non-negative finite number of seconds."""
    return None if timeout is None else _checks.non_negative(timeout, "timeout")


def layout_code(layout: Any) -> int:
    """The core's code of ``layout``: 0 = "padded", 1 = "packed"."""
    return LAYOUTS.index(_checks.choice(layout, "layout", LAYOUTS))


def pad_left(padding_side: Any) -> bool:
    """Whether ``padding_side`` ("right" or "left") puts the padding on the left."""
    return _checks.choice(padding_side, "padding_side", PADDING_SIDES) == "left"


def pin_memory_flag(pin_memory: Any) -> bool:
    """``pin_memory`` as a bool; True needs CUDA (pinned host memory is for copies to a GPU)."""
    pin_memory = _checks.flag(pin_memory, "pin_memory")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (pinned host memory is for fast copies to a GPU)")
    return pin_memory


def file_path(path: Any, *, for_load: bool) -> str:
    """``path`` (str, bytes or os.PathLike) as a str without NUL bytes, not a directory; to load,
    an existing file (FileNotFoundError / IsADirectoryError otherwise)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        got = "None" if path is None else type(path).__name__
        raise TypeError(f"path must be a str or os.PathLike, got {got}")
    path = os.fsdecode(os.fspath(path))
    if not path or "\0" in path:
        raise ValueError(f"path must be a non-empty path without NUL bytes, got {path!r}")
    if for_load and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"no replay buffer file at {path!r}", path)
    if os.path.isdir(path):
        verb = "load" if for_load else "save to"
        raise IsADirectoryError(errno.EISDIR, f"cannot {verb} {path!r}: it is a directory, not a file", path)
    return path


# ----------------------------------------------------------------------------- field sets


def split_fields(
    fields: Mapping[str, Any],
    token_fields: tuple,
    sequence_fields: tuple,
    token_dtypes: list[np.dtype],
    sequence_dtypes: list[np.dtype],
) -> tuple[list, list]:
    """``(token, sequence)`` lists of (value, name, NumPy dtype) of the given ``fields``, in schema
    order; ValueError naming unknown or missing fields."""
    names = [f.name for f in (*token_fields, *sequence_fields)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the schema has {sorted(names)}")
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    tok = [(fields[f.name], f.name, dt) for f, dt in zip(token_fields, token_dtypes, strict=True)]
    seq = [(fields[f.name], f.name, dt) for f, dt in zip(sequence_fields, sequence_dtypes, strict=True)]
    return tok, seq


def token_arrays(tok: list, *, ndim: int, layout: str) -> list[np.ndarray]:
    """The per-token fields of :func:`split_fields` as arrays of one shape with ``ndim`` dimensions
    (``layout`` names that shape in messages, e.g. "(B, T) padded")."""
    arrays = [as_array(value, name, dtype) for value, name, dtype in tok]
    first, shape = tok[0][1], arrays[0].shape
    for a, (_, name, _) in zip(arrays, tok, strict=True):
        if a.ndim != ndim:
            raise ValueError(f"field {name!r} must be {ndim}-D {layout}, got shape {a.shape}")
        if a.shape != shape:
            raise ValueError(
                f"per-token fields must have one shape: {first!r} has {shape}, {name!r} has {a.shape}"
            )
    return arrays


def sequence_arrays(seq: list, B: int) -> list[np.ndarray]:
    """The per-sequence fields of :func:`split_fields` as (B,) arrays of their dtypes."""
    out = []
    for value, name, dtype in seq:
        a = as_array(value, name, dtype)
        if a.shape != (B,):
            raise ValueError(f"per-sequence field {name!r} must have shape ({B},), got {a.shape}")
        out.append(a)
    return out


def pad_values_bytes(
    pad_values: Any, token_fields: tuple, token_dtypes: list[np.dtype]
) -> list[bytes] | None:
    """None (the schema's pads) or the pad bytes of every per-token field, ``pad_values`` (a
    name -> value mapping) overriding the schema's pads."""
    if pad_values is None:
        return None
    if not isinstance(pad_values, Mapping):
        raise TypeError(
            f"pad_values must be a mapping of field name -> value, got {type(pad_values).__name__}"
        )
    names = [f.name for f in token_fields]
    unknown = sorted(set(pad_values) - set(names), key=repr)
    if unknown:
        raise ValueError(f"pad_values names unknown per-token field(s) {unknown}; per-token fields: {names}")
    return [
        pad_bytes(pad_values.get(f.name, f.pad), dtype, f"pad_values[{f.name!r}]")
        for f, dtype in zip(token_fields, token_dtypes, strict=True)
    ]


# ----------------------------------------------------------------------------- fields


def as_array(value: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous NumPy view (zero-copy when possible) of field ``name`` with its exact dtype:
    tensors and arrays must have that dtype; lists and scalars are cast when no value changes."""
    what = f"field {name!r}"
    if isinstance(value, torch.Tensor):
        value = _checks.tensor(value, what)
        if value.device.type != "cpu":
            raise ValueError(f"{what} must be a CPU tensor, got device {value.device}")
        if value.layout != torch.strided:
            raise TypeError(f"{what} must be a dense (strided) tensor, got layout {value.layout}")
        if value.dtype != NUMPY_DTYPE_TO_TORCH[dtype]:
            raise TypeError(f"{what} must have dtype {NUMPY_DTYPE_TO_TORCH[dtype]}, got {value.dtype}")
        return np.ascontiguousarray(value.detach().resolve_conj().resolve_neg().numpy())
    if isinstance(value, np.ndarray):
        if value.dtype != dtype:
            raise TypeError(f"{what} must have dtype {dtype.name}, got {value.dtype}")
        return np.ascontiguousarray(value)
    if isinstance(value, (list, tuple, int, float, bool, np.generic)):
        try:
            raw = np.asarray(value)
        except ValueError as exc:
            raise ValueError(f"{what} is not a rectangular array: {exc}") from None
        if raw.dtype == object:
            raw = _object_numbers(raw, name, dtype)
        integers = raw.dtype.kind in "iu" and dtype.kind in "iu"  # range-checked below
        bool_for_number = raw.dtype.kind == "b" and dtype.kind != "b"
        if (
            raw.dtype.kind not in "biuf"
            or bool_for_number
            or not (integers or np.can_cast(raw.dtype, dtype, casting="same_kind"))
        ):
            raise TypeError(f"{what} must hold {dtype.name} values, got {raw.dtype}")
        return _checked_cast(raw, name, dtype)
    got = "None" if value is None else type(value).__name__
    raise TypeError(f"{what} must be a NumPy array, a CPU torch tensor or a list, got {got}")


def _object_numbers(raw: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    """An object array from a list (Python ints beyond 64 bits) as numbers, or as it was."""
    flat = raw.reshape(-1).tolist()
    if not flat or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
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


# ----------------------------------------------------------------------------- ids, lengths, priorities


def _host_array(value: Any, name: str) -> np.ndarray:
    """A tensor (any device but meta), array, list or tuple as a NumPy array; TypeError otherwise."""
    if isinstance(value, torch.Tensor):
        return _checks.tensor(value, name).detach().cpu().resolve_conj().resolve_neg().numpy()
    if isinstance(value, (np.ndarray, list, tuple, np.generic)):
        return np.asarray(value)
    got = "None" if value is None else type(value).__name__
    raise TypeError(f"{name} must be a tensor, a NumPy array or a list, got {got}")


def _int64_array(value: Any, name: str) -> np.ndarray:
    """Integers (not bools or floats) as a C-contiguous int64 array; ValueError beyond int64."""
    a = _host_array(value, name)
    if a.dtype == object and all(type(v) is int for v in a.reshape(-1).tolist()):
        bad = next((v for v in a.reshape(-1).tolist() if not -(2**63) <= v <= INT64_MAX), None)
        if bad is not None:
            raise ValueError(f"{name} holds {bad}, beyond int64")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > INT64_MAX:
        raise ValueError(f"{name} holds {int(a.max())}, beyond int64 (must be < 2**63)")
    return np.ascontiguousarray(a, dtype=np.int64)


def ids_array(ids: Any) -> np.ndarray:
    """Sequence ids (an int or 1-D integers, each < 2**63) as a (n,) int64 array."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [int64_value(ids, "ids")]
    a = _int64_array(ids, "ids")
    if a.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {a.shape}")
    return a


def lengths_array(lengths: Any) -> np.ndarray:
    """Sequence lengths (1-D integers < 2**63) as a (n,) int64 array (the core checks they are > 0)."""
    a = _int64_array(lengths, "lengths")
    if a.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {a.shape}")
    return a


def priorities_array(value: Any, name: str, n: int) -> np.ndarray:
    """``n`` priorities (1-D real numbers, each finite and > 0; one number when n == 1) as a (n,)
    float64 array."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    a = _host_array(value, name)
    if a.ndim == 0 and n == 1:
        a = a.reshape(1)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {a.dtype}")
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} values (shape ({n},)), got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    if a.size and not (np.isfinite(a).all() and (a > 0).all()):
        bad = a[~(np.isfinite(a) & (a > 0))][0]
        raise ValueError(f"{name} must be finite and > 0, got {bad}")
    return a


def padded_starts(
    lengths: Any, mask: Any, padding_side: str, B: int, T: int
) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths, (B,) int64 each, of the sequences in padded (B, T) fields, from
    either ``lengths`` (with ``padding_side``) or a 0/1 ``mask`` with one run of ones per row."""
    if lengths is not None:
        lens = _int64_array(lengths, "lengths")
        if lens.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {lens.shape}")
        if B and (lens.min() < 1 or lens.max() > T):
            raise ValueError(
                f"lengths must lie in [1, {T}] (T of the padded fields), got {lens.min()}..{lens.max()}"
            )
        starts = np.zeros(B, np.int64) if padding_side == "right" else (T - lens)
        return starts, lens
    m = _host_array(mask, "mask")
    if m.dtype.kind not in "biuf":
        raise TypeError(f"mask must be a bool, integer or float 0/1 mask, got dtype {m.dtype}")
    if m.shape != (B, T):
        raise ValueError(f"mask must have the shape of the padded fields {(B, T)}, got {m.shape}")
    if m.dtype.kind != "b" and m.size and not np.isin(m, (0, 1)).all():
        raise ValueError("mask must contain only 0 and 1")
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


def packed_starts(cu_seqlens: Any, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths, (B,) int64 each, of packed sequences from ``cu_seqlens`` (B + 1,)
    over N tokens (the shared contract of :func:`alignkit._checks.cu_seqlens`)."""
    cu = _checks.cu_seqlens(cu_seqlens, N, "cu_seqlens").numpy()
    return np.ascontiguousarray(cu[:-1]), np.ascontiguousarray(np.diff(cu))
