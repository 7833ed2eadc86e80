"""Outcome (group) advantages for GRPO, Dr.GRPO, RLOO and REINFORCE++-baseline.

Formulas: docs/formulas.md, "Group (outcome) advantages". Vectorised with scatter-adds (no Python
loop over groups), plain torch, on any device; differentiable in ``scores``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import _checks
from .whiten import whiten_selected

METHODS = ("grpo", "dr_grpo", "rloo", "reinforce++-baseline")


def group_ids(index: object, batch: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group ids 0..G-1 (int64 tensor on ``device``) from ids of any kind and order.

    ``index`` may be an integer tensor, a NumPy array (numbers or strings, e.g. verl's uid array)
    or a sequence of hashable ids.
    """
    if isinstance(index, torch.Tensor):
        index = _checks.tensor(index, "index")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index must hold integer group ids, got a {index.dtype} tensor")
        if index.dim() != 1 or index.numel() != batch:
            raise ValueError(f"index must have shape ({batch},), got {tuple(index.shape)}")
        _, inverse = torch.unique(index.to(device), return_inverse=True)
        return inverse.to(torch.int64), int(inverse.max()) + 1 if batch else 0
    if isinstance(index, np.ndarray) or (isinstance(index, Sequence) and not isinstance(index, (str, bytes))):
        items = (
            list(np.asarray(index, dtype=object).reshape(-1))
            if isinstance(index, np.ndarray)
            else list(index)
        )
        if len(items) != batch:
            raise ValueError(f"index must hold {batch} group ids (one per score), got {len(items)}")
        for item in items:
            if isinstance(item, (float, np.floating)) and not np.isfinite(item):
                raise ValueError(f"index must hold finite group ids, got {item!r}")
        dense: dict[object, int] = {}
        try:
            ids = [dense.setdefault(item, len(dense)) for item in items]
        except TypeError as exc:
            raise TypeError(f"index entries must be hashable group ids: {exc}") from None
        return torch.tensor(ids, dtype=torch.int64, device=device), len(dense)
    raise TypeError(
        f"index must be a tensor, a NumPy array or a list of group ids, got {type(index).__name__}"
    )


def group_advantages(
    scores: torch.Tensor,
    index: object,
    *,
    method: str = "grpo",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence advantages from outcome scores grouped by prompt.

    With ``n`` members, group mean ``mu`` and unbiased std ``sigma``:

    * ``grpo``: ``(s - mu) / (sigma + eps)``; a group of one has mu = 0, sigma = 1.
    * ``dr_grpo``: ``s - mu`` (a group of one: mu = 0).
    * ``rloo``: ``s n/(n-1) - mu n/(n-1)``, s minus the mean of the others (a group of one: s).
    * ``reinforce++-baseline``: ``s - mu``, then whitened over the batch: over the masked tokens
      when ``mask`` is given (verl's behaviour, longer responses weigh more), else over sequences.

    Args:
        scores: (B,) float sequence rewards.
        index: group id per sequence, any order: int tensor, NumPy array (ints or strings) or list.
        method: one of ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce++-baseline``.
        eps: added to the std for ``grpo`` (verl 1e-6, TRL 1e-4, OpenRLHF 1e-9).
        mask: optional (B, T) response mask; when given the advantage is broadcast over it and a
            (B, T) tensor is returned (zero where the mask is 0).

    Returns:
        (B,) advantages, or (B, T) when ``mask`` is given; float32 (float64 for float64 scores).
    """
    scores = _checks.float_tensor(scores, "scores", ndim=1)
    method = _checks.choice(method, "method", METHODS)
    eps = _checks.eps(eps)
    batch = scores.shape[0]
    if mask is not None:
        mask = _checks.tensor(mask, "mask")
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise ValueError(f"mask must have shape ({batch}, T), got {tuple(mask.shape)}")
        _checks.same_device(mask, "mask", scores, "scores")
        _checks.zero_one(mask, "mask")
    if method == "reinforce++-baseline" and mask is None and batch < 2:
        raise ValueError(
            f"scores must hold at least 2 sequences for reinforce++-baseline (it whitens over the "
            f"batch), got {batch}"
        )
    gid, n_groups = group_ids(index, batch, scores.device)
    acc = _checks.accumulation_dtype(scores)
    s = scores.to(acc)

    count = torch.zeros(n_groups, dtype=acc, device=s.device).index_add_(0, gid, torch.ones_like(s))
    total = torch.zeros(n_groups, dtype=acc, device=s.device).index_add_(0, gid, s)
    n = count[gid]
    single = n == 1
    mean = torch.where(single, torch.zeros_like(s), (total / count)[gid])

    if method == "grpo":
        sq_dev = torch.zeros(n_groups, dtype=acc, device=s.device).index_add_(0, gid, (s - mean) ** 2)
        var = sq_dev[gid] / torch.clamp(n - 1, min=1)
        # sqrt has an infinite slope at 0: a group of equal scores (all right, all wrong) would give
        # NaN gradients, so its std is taken as a constant 0; with eps = 0 its advantage is 0.
        spread = var > 0
        std = torch.where(spread, torch.where(spread, var, 1.0).sqrt(), 0.0)
        std = torch.where(single, torch.ones_like(s), std)
        denom = std + eps
        adv = torch.where(denom > 0, (s - mean) / torch.where(denom > 0, denom, 1.0), 0.0)
    elif method == "rloo":
        scale = n / torch.clamp(n - 1, min=1)
        adv = torch.where(single, s, s * scale - mean * scale)
    else:
        adv = s - mean

    if mask is None:
        if method == "reinforce++-baseline":
            adv = whiten_selected(adv, torch.ones_like(adv, dtype=torch.bool))
        return adv
    keep = mask != 0
    zero = torch.zeros((), dtype=acc, device=s.device)
    spread = torch.where(keep, adv[:, None], zero)
    if method == "reinforce++-baseline":
        spread = torch.where(keep, whiten_selected(spread, keep), zero)
    return spread
