"""Masked statistics and whitening (conventions.md, "Masked whitening"). Plain torch: differentiable,
on any device, reductions accumulated in fp32 (fp64 for fp64 input)."""

from __future__ import annotations

import torch

from .. import _checks


def _prepare(x, mask, dim) -> tuple[torch.Tensor, torch.Tensor]:
    x = _checks.float_tensor(x, "x")
    mask = _checks.mask(mask, "mask", x, "x")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if dim is not None and not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
    return x.to(acc), mask.to(acc)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(m x) / sum(m)`` over all elements (``dim=None``) or along ``dim``.

    An empty mask (sum 0) gives NaN for that reduction: there is no mean of nothing.
    """
    x, m = _prepare(x, mask, dim)
    if dim is None:
        return (x * m).sum() / m.sum()
    return (x * m).sum(dim) / m.sum(dim)


def _mean_var(x: torch.Tensor, m: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = m.sum()
    need = 2 if unbiased else 1
    if bool(n < need):  # one host sync: a silent NaN here would poison a whole training step
        raise ValueError(f"mask must select at least {need} elements for a variance, got {int(n)}")
    mean = (x * m).sum() / n
    var = (m * (x - mean) ** 2).sum() / n
    return mean, var * n / (n - 1) if unbiased else var


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Masked variance over all elements; unbiased (``* n / (n - 1)``) by default.

    Raises ValueError when the mask selects fewer than 2 elements (``unbiased``) or none.
    """
    return _mean_var(*_prepare(x, mask, None), unbiased)[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + 1e-8)`` with masked mean and unbiased masked variance, plus the
    mean back if ``shift_mean=False`` (verl's ``masked_whiten``). Returns x's shape, float32
    (float64 for float64 x). A mask with sum 0 or 1 raises ValueError."""
    return whiten_prepared(*_prepare(x, mask, None), shift_mean)


def whiten_prepared(x: torch.Tensor, m: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """:func:`masked_whiten` for inputs other ops already validated: ``x`` and the 0/1 mask ``m`` in
    one accumulation dtype (skips the argument checks and their device sync)."""
    mean, var = _mean_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean
