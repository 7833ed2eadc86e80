"""Rollout correction: importance weights for the mismatch between the sampler's log-probs and the
trainer's, ``rollout_correction_weights``.

Formulas: docs/formulas.md ("Rollout correction"). With ``d_t = old_logp_t - rollout_logp_t`` (old:
the trainer's recomputation before the update; rollout: what the sampler recorded):

* token level: ``rho_t = exp(d_t)``;
* sequence level: ``rho = exp(sum_t m_t d_t)`` per sequence, shared by its tokens;
* TIS (truncated): ``w = min(rho, C)``; MIS (masked): ``w = rho`` if ``rho <= C`` else 0.

The weights are detached (no gradient reaches either log-prob) and go to the policy loss as
``is_weights``. Plain torch on any device, in fp32 (fp64 for fp64 inputs); no host sync besides the
mask check. Masked positions are selected away (``where``), never multiplied: NaN/inf stored there
cannot reach a weight or a metric, and their weight is 0. NaN at a live position stays visible
(MIS keeps it: ``rho > C`` is false for NaN, so the NaN is passed on, not zeroed).
"""

from __future__ import annotations

import torch

from .. import _checks

LEVELS = ("token", "sequence")
MODES = ("tis", "mis")  # truncated / masked importance sampling


def rollout_correction_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "tis",
    threshold: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated (TIS) or masked (MIS) importance weights, per token or per sequence.

    ``rho = exp(old_logp - rollout_logp)`` per token (``level="token"``), or
    ``exp(sum_t m_t (old_logp_t - rollout_logp_t))`` per sequence (``level="sequence"``, broadcast
    over the sequence's tokens); ``mode="tis"``: ``w = min(rho, threshold)``; ``mode="mis"``:
    ``w = rho`` where ``rho <= threshold``, else 0. A ratio equal to the threshold is kept as is.

    Args:
        old_logp: (B, T) the trainer's log-probs of the sampled tokens, before the update.
        rollout_logp: (B, T) the sampler's log-probs of the same tokens.
        mask: (B, T) 0/1, 1 = a sampled token trained on.
        level: ``"token"`` or ``"sequence"``.
        mode: ``"tis"`` or ``"mis"``.
        threshold: ``C > 0`` (default 2.0, verl's ``rollout_is_threshold``).

    Returns:
        ``(weights, metrics)``: weights (B, T) fp32 (fp64 for fp64 inputs), detached, 0 where
        masked; metrics, 0-dim tensors (no host sync), 0 for an all-masked batch:

        * ``rollout/logprob_mismatch``: masked token mean of ``|old_logp - rollout_logp|``;
        * ``rollout/logprob_mismatch_max``: its masked maximum;
        * ``rollout_is/mean``, ``rollout_is/max``: mean and maximum of the weights over the
          units (live tokens at token level, non-empty sequences at sequence level);
        * ``rollout_is/clipfrac``: share of those units with ``rho > threshold`` (truncated by
          TIS, zeroed by MIS).
    """
    old_logp = _checks.float_tensor(old_logp, "old_logp", ndim=2)
    rollout_logp = _checks.float_like(rollout_logp, "rollout_logp", old_logp, "old_logp")
    mask = _checks.mask(mask, "mask", old_logp, "old_logp")
    level = _checks.choice(level, "level", LEVELS)
    mode = _checks.choice(mode, "mode", MODES)
    threshold = _checks.positive(threshold, "threshold")
    dtype = _checks.accumulation_dtype(old_logp, rollout_logp)
    with torch.no_grad():
        live = mask != 0  # (B, T)
        zero = torch.zeros((), dtype=dtype, device=old_logp.device)
        diff = torch.where(live, old_logp.to(dtype) - rollout_logp.to(dtype), zero)  # (B, T)
        if level == "token":
            rho, units = diff.exp(), live  # (B, T)
        else:
            rho, units = diff.sum(-1).exp(), live.any(-1)  # (B,)
        over = rho > threshold  # False for NaN: a NaN ratio stays visible in the weight
        if mode == "tis":
            unit_weights = torch.where(over, torch.full((), threshold, dtype=dtype, device=rho.device), rho)
        else:
            unit_weights = torch.where(over, zero, rho)
        unit_weights = torch.where(units, unit_weights, zero)
        weights = unit_weights if level == "token" else unit_weights[:, None].expand_as(diff)
        weights = torch.where(live, weights, zero)  # (B, T)
        n_tokens = live.sum().to(dtype).clamp(min=1.0)
        n_units = units.sum().to(dtype).clamp(min=1.0)
        mismatch = diff.abs()  # 0 where masked
        metrics = {
            "rollout/logprob_mismatch": mismatch.sum() / n_tokens,
            "rollout/logprob_mismatch_max": _max_or_zero(mismatch),
            "rollout_is/mean": unit_weights.sum() / n_units,
            "rollout_is/max": _max_or_zero(unit_weights),
            "rollout_is/clipfrac": (over & units).sum().to(dtype) / n_units,
        }
    return weights, metrics


def _max_or_zero(x: torch.Tensor) -> torch.Tensor:
    """Maximum of a non-negative tensor that holds 0 where masked (0 for an empty tensor)."""
    return x.amax() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)
