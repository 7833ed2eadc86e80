"""Schema and batch types of the replay buffer (:class:`alignkit.ReplayBuffer`).

Field declarations (:class:`TokenField`, :class:`SequenceField`) with their dtype conversions
(torch <-> NumPy <-> the core's dtype codes) and pad values, and :class:`Batch`, the torch tensors
that every copy out of the buffer returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _ext

__all__ = ["Batch", "SequenceField", "TokenField"]

_TORCH_TO_NUMPY = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NUMPY_TO_TORCH = {v: k for k, v in _TORCH_TO_NUMPY.items()}
_NUMPY_DTYPE_TO_TORCH = {np.dtype(v): k for k, v in _TORCH_TO_NUMPY.items()}  # dtype.name is slow
_RESERVED = frozenset(
    {
        "ids",
        "lengths",
        "attention_mask",
        "cu_seqlens",
        "position_ids",
        "weights",
        "priority",
        "priorities",
        "mask",
    }
)


def _numpy_dtype(dtype: Any, what: str) -> np.dtype:
    """The NumPy dtype of a schema dtype given as torch.dtype, NumPy dtype or string."""
    if isinstance(dtype, torch.dtype):
        name = _TORCH_TO_NUMPY.get(dtype)
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in _NUMPY_TO_TORCH:
        raise TypeError(f"{what} must be one of {sorted(_NUMPY_TO_TORCH)} (torch or NumPy), got {dtype!r}")
    return np.dtype(name)


def _pad_bytes(value: Any, dtype: np.dtype, what: str) -> bytes:
    """A pad value as the bytes of one element of dtype, rejecting values that do not fit."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, (bool, int, float, np.generic)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if dtype.kind in "biu":
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(f"{what} must be an integer for dtype {dtype.name}, got {value!r}")
        if dtype.kind == "b":
            if value not in (0, 1):
                raise ValueError(f"{what} must be 0/1/False/True for dtype bool, got {value!r}")
        else:
            info = np.iinfo(dtype)
            if not info.min <= int(value) <= info.max:
                raise ValueError(f"{what} = {value!r} does not fit in {dtype.name} [{info.min}, {info.max}]")
        value = int(value)
    elif dtype.kind == "f":
        try:
            with np.errstate(over="ignore"):
                cast = np.array(value, dtype=dtype)
            overflow = bool(np.isinf(cast)) and bool(np.isfinite(float(value)))
        except OverflowError:
            overflow = True
        if overflow:
            raise ValueError(f"{what} = {value!r} is out of range for {dtype.name}")
        return cast.tobytes()
    return np.array(value, dtype=dtype).tobytes()


@dataclass(frozen=True)
class TokenField:
    """A per-token field: one value per token of every sequence (tokens, logprobs, masks...)."""

    name: str  # key used in add(...) and in batches
    dtype: Any = torch.float32  # torch or NumPy dtype; bfloat16 is not storable
    pad: float | int | bool = 0  # default pad value in padded batches

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(
            self, "dtype", _NUMPY_TO_TORCH[_numpy_dtype(self.dtype, f"dtype of field {self.name!r}").name]
        )
        _pad_bytes(self.pad, _numpy_dtype(self.dtype, "dtype"), f"pad of field {self.name!r}")


@dataclass(frozen=True)
class SequenceField:
    """A per-sequence field: one value per sequence (score, group id, policy version, prompt length...)."""

    name: str  # key used in add(...) and in batches
    dtype: Any = torch.float32  # torch or NumPy dtype

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(
            self, "dtype", _NUMPY_TO_TORCH[_numpy_dtype(self.dtype, f"dtype of field {self.name!r}").name]
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"field names must be Python identifiers, got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"field name {name!r} is reserved (reserved: {sorted(_RESERVED)})")


@dataclass
class Batch:
    """Sequences copied out of the buffer, as torch tensors (B sequences, N = sum of lengths).

    padded layout: ``fields[name]`` is (B, T) for per-token fields (T = longest length), with
    ``attention_mask`` (B, T) bool; packed layout: ``fields[name]`` is (N,), with ``cu_seqlens``
    (B + 1,) int32 and ``position_ids`` (N,) int64 (0..len-1 per sequence). Per-sequence fields are
    (B,). ``weights`` (B,) float32: importance weights, prioritized sampling only.
    """

    ids: torch.Tensor  # (B,) int64
    lengths: torch.Tensor  # (B,) int64
    fields: dict[str, torch.Tensor]
    layout: str  # "padded" or "packed"
    max_seqlen: int  # T (padded) / longest sequence (packed)
    attention_mask: torch.Tensor | None = None  # (B, T) bool, padded only
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32, packed only
    position_ids: torch.Tensor | None = None  # (N,) int64, packed only
    weights: torch.Tensor | None = None  # (B,) float32, prioritized only

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fields[name]

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def _pinned(batch: Batch) -> Batch:
    """The batch with every tensor copied to pinned memory (the fallback path)."""
    for name in ("ids", "lengths", "attention_mask", "cu_seqlens", "position_ids", "weights"):
        t = getattr(batch, name)
        if t is not None:
            setattr(batch, name, t.pin_memory())
    batch.fields = {k: v.pin_memory() for k, v in batch.fields.items()}
    return batch


def _CODES() -> dict[str, int]:
    return _ext.load().replay_dtype_codes()


def _as_fields(spec: Any, cls: type, what: str) -> list:
    if isinstance(spec, Mapping):
        return [cls(name, dtype) for name, dtype in spec.items()]
    out = []
    for f in spec:
        if not isinstance(f, cls):
            raise TypeError(
                f"{what} must hold {cls.__name__} objects (or be a name -> dtype mapping), got {f!r}"
            )
        out.append(f)
    return out
