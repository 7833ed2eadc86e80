"""Masked statistics and whitening (docs/formulas.md, "Masked whitening"). Plain torch:
differentiable, on any device, reductions in the accumulation dtype (fp32; fp64 for fp64 input).

Masked positions are selected away with ``where``, never multiplied by the mask, so NaN/inf in
padding cannot reach the result. A mask that selects too few elements is a ValueError (one host
read of the count), never a silent NaN, where the validation mode checks values (by default on CPU
tensors; on CUDA the read would be a device sync, so there it gives NaN unless
``alignkit.set_validation("full")``).
"""

from __future__ import annotations

import torch

from .. import _checks


def _prepare(x, mask, dim) -> tuple[torch.Tensor, torch.Tensor]:
    """x in the accumulation dtype and the boolean selection ``mask != 0``."""
    x = _checks.float_tensor(x, "x")
    mask = _checks.mask(mask, "mask", x, "x")
    if dim is not None:
        dim = _checks.integer(dim, "dim")
        if not -x.dim() <= dim < max(x.dim(), 1):
            raise ValueError(
                f"dim must lie in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}"
            )
    return x.to(_checks.accumulation_dtype(x)), mask != 0


def _selected(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _require(count: torch.Tensor, need: int, what: str) -> None:
    if not _checks.checks_values(count):  # CUDA by default: the read below would be a device sync
        return
    low = count < need
    if bool(low.any()):  # one host read: a silent NaN here would poison a whole training step
        got = int(count.min())
        where = "" if count.dim() == 0 else f" in every slice along dim ({int(low.sum())} slices have {got})"
        raise ValueError(
            f"mask must select at least {need} element{'s' * (need > 1)} for {what}{where}, got {got}"
        )


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
    """``sum(m x) / sum(m)`` over all elements (``dim=None``) or along ``dim``.

    Raises ValueError when the mask selects nothing (in any slice, with ``dim``): there is no mean
    of nothing. Returns fp32 (fp64 for fp64 x).
    """
    x, keep = _prepare(x, mask, dim)
    count = keep.sum(dim) if dim is not None else keep.sum()
    _require(count, 1, "a mean")
    x = _selected(x, keep)
    total = x.sum(dim) if dim is not None else x.sum()
    return total / count.to(x.dtype)


def _centred(
    x: torch.Tensor, keep: torch.Tensor, need: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, (x - mean) / scale at selected positions (0 elsewhere), scale) of the selected values.
    They are divided by their largest magnitude first, so no square or sum overflows the dtype (fp32
    values near 1e20 would)."""
    n = keep.sum()
    _require(n, need, "a variance")
    n = n.to(x.dtype)
    x = _selected(x, keep)
    scale = x.detach().abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant that cancels exactly
    mean = scale * ((x / scale).sum() / n)
    return mean, _selected((x - mean) / scale, keep), scale


def _scaled_var(centred: torch.Tensor, keep: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = keep.sum().to(centred.dtype)
    return centred.square().sum() / (n - 1 if unbiased else n)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Masked variance over all elements; unbiased (``* n / (n - 1)``) by default.

    Raises ValueError when the mask selects fewer than 2 elements (``unbiased``) or none.
    """
    unbiased = _checks.flag(unbiased, "unbiased")
    x, keep = _prepare(x, mask, None)
    _, centred, scale = _centred(x, keep, 2 if unbiased else 1)
    return _scaled_var(centred, keep, unbiased) * scale * scale  # scale**2 alone may overflow


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + 1e-8)`` with masked mean and unbiased masked variance, plus the
    mean back if ``shift_mean=False`` (verl's ``masked_whiten``). Returns x's shape, float32
    (float64 for float64 x); positions outside the mask are transformed too (as verl does), but
    never enter the statistics. A mask with sum 0 or 1 raises ValueError."""
    shift_mean = _checks.flag(shift_mean, "shift_mean")
    x, keep = _prepare(x, mask, None)
    return whiten_selected(x, keep, shift_mean=shift_mean)


def whiten_selected(x: torch.Tensor, keep: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """:func:`masked_whiten` for inputs another op already validated: ``x`` in an accumulation dtype
    and the boolean selection ``keep`` of its shape (skips the argument checks)."""
    mean, centred, scale = _centred(x, keep, 2)
    # (x - mean) / sqrt(var + 1e-8), numerator and denominator divided by the scale.
    inv_std = torch.rsqrt(_scaled_var(centred, keep, True) + 1e-8 / scale.square())
    out = centred * inv_std
    # Unselected positions are transformed too (verl's output), from constants: whatever they hold
    # (NaN padding) then reaches no gradient.
    outside = ((x.detach() - mean.detach()) / scale) * inv_std.detach()
    out = torch.where(keep, out, outside)
    return out if shift_mean else out + torch.where(keep, mean, mean.detach())
