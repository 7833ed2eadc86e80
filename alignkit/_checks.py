"""Input validation and dtype rules shared by the public ops: every message names the argument and
what it got."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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


def mask(m: object, name: str, ref: torch.Tensor, ref_name: str, check_values: bool = True) -> torch.Tensor:
    """A 0/1 mask of ``ref``'s shape and device (bool, integer or float dtype).

    ``check_values`` costs one reduction (and a device sync on CUDA)."""
    m = tensor(m, name)
    same_shape(m, name, ref, ref_name)
    same_device(m, name, ref, ref_name)
    if m.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {m.dtype}")
    if check_values:
        zero_one(m, name)
    return m


def zero_one(m: torch.Tensor, name: str) -> None:
    """Raise unless every element of ``m`` is 0 or 1 (one reduction; a device sync on CUDA)."""
    if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1")


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any given tensor is fp64, else fp32 (fp16/bf16 inputs accumulate in fp32)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _number(value: object, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
