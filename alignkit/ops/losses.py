"""PPO losses: the policy loss (clipped with dual clip, GSPO, CISPO; + KL penalty and entropy
bonus), clipped value loss, the KL estimators and masked loss aggregation.

Formulas: docs/formulas.md ("KL estimators", "Clipped policy loss", "CISPO", "Value loss", "Loss
aggregation"), i.e. verl's ``core_algos``. The policy and value losses run as one fused pass
(kernels/ppo_loss.py on CUDA, alignkit/cpu/losses.py on CPU): the forward reads every input once,
reduces it to per-row statistics, from which any aggregation mode and every metric follows with
B-sized work, and (when grad is needed) writes the per-token gradient of the row sums; the backward
scales that by the per-row weight of the aggregation in one pass. Metrics are tensors, never read on
the host; the one host read is the check that the mask holds only 0 and 1, which the pass counts
as it goes (a sync on CUDA, like every other alignkit op's mask check).

Conventions beyond the formulas:

* Ties are not clipped: the gradient at ``L1 == L2`` (ratio exactly at a clip bound) is the unclipped
  one, and ``Lc == L3`` is not dual-clipped; this matches the clip-fraction predicates (CISPO: a
  ratio on a bound is inside the range).
* Masked positions are selected away, never multiplied: NaN/inf there does not leak.
* An all-masked batch gives loss 0 and zero gradients (normalisers are clamped at 1), never NaN.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import backend as _backend
from ..loss_layout import VALUE_BAD_MASK, VALUE_CLIP, VALUE_COUNT, VALUE_LOSS
from . import loss_config
from .loss_config import FIELDS, UNSET, PolicyLossConfig, resolve_config
from .loss_pass import (
    packed_width,
    policy_loss_and_metrics,
    policy_stats,
    raise_on_bad_mask,
    row_weights,
    scale_rows,
    value_stats,
)

_backend.register_op("ppo_policy_loss")
_backend.register_op("value_loss")

METRIC_KEYS = ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl", "entropy")


# ----------------------------------------------------------------------------- aggregation, KL


def agg_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, *, agg: str = "token-mean", agg_scale: float | None = None
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss over the mask (differentiable in ``loss_mat``).

    * token-mean: ``sum(m L) / sum(m)``, or ``/ agg_scale`` (a global token count) when given
    * seq-mean-token-sum: mean over non-empty rows of ``sum_t(m L)``
    * seq-mean-token-mean: mean over non-empty rows of ``sum_t(m L) / (sum_t m + 1e-8)``
    * seq-mean-token-sum-norm: ``sum over rows of sum_t(m L) / n_nonempty / agg_scale``,
      ``agg_scale`` defaulting to T (Dr.GRPO: the max response length)

    Fully masked rows are excluded from the row count; an all-masked batch gives 0. Masked
    positions are selected away (NaN there does not leak). Returns a 0-dim tensor (fp32 at least).
    """
    loss_mat = _checks.float_tensor(loss_mat, "loss_mat", ndim=2)
    mask = _checks.mask(mask, "mask", loss_mat, "loss_mat")
    agg = loss_config.agg_mode(agg)
    scale = loss_config.agg_scale(agg_scale, agg)
    dtype = torch.promote_types(loss_mat.dtype, torch.float32)
    active = mask != 0
    row_sums = torch.where(
        active, loss_mat.to(dtype), torch.zeros((), dtype=dtype, device=loss_mat.device)
    ).sum(-1)
    counts = active.sum(-1).to(dtype)
    return (row_weights(counts, agg, scale, loss_mat.shape[1]) * row_sums).sum()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, *, kl_estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate at ``d = logp - ref_logp`` (differentiable in both).

    k1 (``kl``): d;  abs: |d|;  k2 (``mse``): d^2 / 2;
    k3 (``low_var_kl``): ``x = clamp(-d, -20, 20)``, ``clamp(exp(x) - x - 1, -10, 10)`` (computed as
    ``expm1(x) - x``, which does not cancel near 0). The default, k3, is the estimator of
    :class:`PolicyLossConfig`; in-reward KL usually takes k1. Returns fp32 (fp64 for fp64 inputs).
    """
    logp = _checks.float_tensor(logp, "logp")
    ref_logp = _checks.float_like(ref_logp, "ref_logp", logp, "logp")
    name = loss_config.kl_estimator(kl_estimator)
    dtype = _checks.accumulation_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if name == "k1":
        return d
    if name == "abs":
        return d.abs()
    if name == "k2":
        return 0.5 * d.square()
    x = (-d).clamp(-20.0, 20.0)
    return (torch.expm1(x) - x).clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------- autograd


class _PolicyLossFunction(torch.autograd.Function):
    """Inputs: logp and entropy (differentiable); the rest are constants. Outputs: loss and the
    metric tensors of METRIC_KEYS (non-differentiable). Saves the per-token gradient of the row
    sums (B, T) and the per-row weights of the aggregation. ``cu_seqlens`` (validated, CPU) or None:
    the rows are the sequences packed in a (1, N) batch."""

    @staticmethod
    def forward(
        ctx, logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, config, impl, dtype, cu_seqlens
    ):
        stats, grad = policy_stats(
            impl, logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, config, dtype,
            write_grad=ctx.needs_input_grad[0], cu_seqlens=cu_seqlens,
        )  # fmt: skip
        width = logp.shape[1] if cu_seqlens is None else packed_width(cu_seqlens)
        loss, metrics, weights = policy_loss_and_metrics(
            stats, config, width, with_kl=True, with_entropy=True
        )
        ctx.config, ctx.impl, ctx.cu_seqlens = config, impl, cu_seqlens
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.save_for_backward(grad, mask if ctx.needs_input_grad[1] else None, weights)
        values = tuple(metrics[k].to(dtype) for k in METRIC_KEYS)
        ctx.mark_non_differentiable(*values)
        return (loss.to(dtype), *values)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        grad, mask, weights = ctx.saved_tensors
        logp_dtype, entropy_dtype = ctx.dtypes
        dlogp, dent = scale_rows(
            ctx.impl, grad, mask, weights * grad_loss, logp_dtype, entropy_coef=ctx.config.entropy_coef,
            entropy_dtype=entropy_dtype if ctx.needs_input_grad[1] else None, cu_seqlens=ctx.cu_seqlens,
        )  # fmt: skip
        return dlogp, dent, None, None, None, None, None, None, None, None, None


class _ValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg, scale, impl, dtype):
        stats, grad = value_stats(
            impl,
            values,
            old_values,
            returns,
            mask,
            clip=clip,
            dtype=dtype,
            write_grad=ctx.needs_input_grad[0],
        )
        raise_on_bad_mask(stats[:, VALUE_BAD_MASK])
        counts = stats[:, VALUE_COUNT]
        weights = row_weights(counts, agg, scale, values.shape[1])
        loss = (0.5 * (weights * stats[:, VALUE_LOSS]).sum()).to(dtype)
        vf_loss = loss.clone()
        clipfrac = (stats[:, VALUE_CLIP].sum() / counts.sum().clamp(min=1.0)).to(dtype)
        ctx.impl = impl
        ctx.values_dtype = values.dtype
        ctx.save_for_backward(grad, 0.5 * weights)
        ctx.mark_non_differentiable(vf_loss, clipfrac)
        return loss, vf_loss, clipfrac

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        grad, half_weights = ctx.saved_tensors
        dv, _ = scale_rows(ctx.impl, grad, None, half_weights * grad_loss, ctx.values_dtype)
        return dv, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: PolicyLossConfig | None = None,
    clip_low: float = UNSET,
    clip_high: float = UNSET,
    dual_clip: float | None = UNSET,
    agg: str = UNSET,
    agg_scale: float | None = UNSET,
    loss_type: str = UNSET,
    kl_coef: float = UNSET,
    kl_estimator: str = UNSET,
    entropy_coef: float = UNSET,
    is_weights: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO actor loss (clipped, GSPO or CISPO) with KL penalty and entropy bonus, in one fused pass.

    Per token (docs/formulas.md, "Clipped policy loss"): ``lr = clamp(logp - old_logp, -20, 20)``,
    ``ratio = exp(lr)``, ``L = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))``, then
    where ``A < 0`` ``min(L, -A dual_clip)``, times ``is_weights``. Total:
    ``agg(L) - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logp, ref_logp))``.
    ``loss_type="gspo"`` is GSPO (the ratio is ``exp(min(s, 10))`` with ``s`` the masked mean
    log-ratio of the row, gradient through ``logp - stopgrad(logp)``; no dual clip).
    ``loss_type="cispo"`` is CISPO (docs/formulas.md, "CISPO"; MiniMax-M1, arXiv 2506.13585):
    ``L = -stopgrad(clamp(ratio, 1 - clip_low, 1 + clip_high)) * A * logp``, so ``dL/dlogp = -w A``
    at every token; no dual clip, ``pg_clipfrac`` counts ratios outside the range.

    Args:
        logp, old_logp, advantages, mask: (B, T); gradients flow to ``logp`` (and ``entropy``) only.
        config: a :class:`PolicyLossConfig` (default: its defaults); the option keywords below
            override its fields one by one (``clip_low``, ``clip_high``, ``dual_clip``, ``agg``,
            ``agg_scale``, ``loss_type``, ``kl_coef``, ``kl_estimator``, ``entropy_coef``; see
            :class:`PolicyLossConfig` for their meaning and defaults).
        is_weights, ref_logp, entropy: optional (B, T) tensors (truncated-IS weights, reference
            log-probs for the KL term, policy entropy for the bonus).
        cu_seqlens: optional offsets of the sequences packed end to end in (1, N) inputs (int
            tensor, array or list, ``[0] == 0``, ``[-1] == N``, strictly increasing). Every
            sequence then counts as a row: the seq-mean modes and GSPO's per-sequence ratio give
            the numbers of the same sequences padded to (S, longest), and ``seq-mean-token-sum-norm``
            divides by the longest sequence unless ``agg_scale`` is given. Without it, a packed row
            is one sequence (right for ``token-mean`` with ppo_clip / cispo only).
        backend: ``"auto" | "triton" | "cpu"``.

    Returns:
        ``(loss, metrics)``: 0-dim loss (fp32; fp64 for fp64 inputs) and a dict of 0-dim tensors
        (no host sync): pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl (masked token means of the
        clip predicates and of ``-lr``), and ``kl`` / ``entropy`` (the aggregated terms) when
        ``ref_logp`` / ``entropy`` are given.
    """
    options = dict(zip(FIELDS, (clip_low, clip_high, dual_clip, agg, agg_scale, loss_type, kl_coef,
                                kl_estimator, entropy_coef), strict=True))  # fmt: skip
    config = resolve_config(config, options)
    logp = _checks.float_tensor(logp, "logp", ndim=2)
    old_logp = _checks.float_like(old_logp, "old_logp", logp, "logp")
    advantages = _checks.float_like(advantages, "advantages", logp, "logp")
    mask = _checks.mask(mask, "mask", logp, "logp", check_values=False)  # values: checked in the pass
    optional = {"is_weights": is_weights, "ref_logp": ref_logp, "entropy": entropy}
    is_weights, ref_logp, entropy = (
        None if t is None else _checks.float_like(t, name, logp, "logp") for name, t in optional.items()
    )
    config.check_inputs(has_ref=ref_logp is not None, has_entropy=entropy is not None)
    cu_seqlens = packed_offsets(cu_seqlens, logp, "logp")
    impl = _backend.resolve(backend, logp.device)
    dtype = _checks.accumulation_dtype(logp, old_logp, advantages, is_weights, ref_logp, entropy)
    loss, *values = _PolicyLossFunction.apply(
        logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, config, impl, dtype, cu_seqlens
    )
    return loss, select_metrics(values, with_kl=ref_logp is not None, with_entropy=entropy is not None)


def packed_offsets(cu_seqlens: object, ref: torch.Tensor, ref_name: str) -> torch.Tensor | None:
    """None, or validated CPU int64 ``cu_seqlens`` for a packed (1, N, ...) ``ref``."""
    if cu_seqlens is None:
        return None
    if ref.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens, {ref_name} must hold one packed row (leading shape (1, N)), got "
            f"{tuple(ref.shape)}"
        )
    return _checks.cu_seqlens(cu_seqlens, ref.shape[1])


def select_metrics(values, *, with_kl: bool, with_entropy: bool) -> dict[str, torch.Tensor]:
    """The metric dict of a policy loss from the tensors of METRIC_KEYS, without the KL / entropy
    entries when their inputs were not given."""
    metrics = dict(zip(METRIC_KEYS, values, strict=True))
    if not with_kl:
        del metrics["kl"]
    if not with_entropy:
        del metrics["entropy"]
    return metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.5,
    agg: str = "token-mean",
    agg_scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``vclip = old + clamp(v - old, -clip, clip)``,
    ``loss = 0.5 * agg(max((v - R)^2, (vclip - R)^2), m)``; gradients flow to ``values`` only.

    Returns ``(loss, {"vf_loss", "vf_clipfrac"})``; ``vf_clipfrac`` is the masked token mean of
    ``(vclip - R)^2 > (v - R)^2``.
    """
    values = _checks.float_tensor(values, "values", ndim=2)
    old_values = _checks.float_like(old_values, "old_values", values, "values")
    returns = _checks.float_like(returns, "returns", values, "values")
    mask = _checks.mask(mask, "mask", values, "values", check_values=False)  # values: checked in the pass
    clip = _checks.non_negative(clip, "clip")
    agg = loss_config.agg_mode(agg)
    scale = loss_config.agg_scale(agg_scale, agg)
    impl = _backend.resolve(backend, values.device)
    dtype = _checks.accumulation_dtype(values, old_values, returns)
    loss, vf_loss, clipfrac = _ValueLossFunction.apply(
        values, old_values, returns, mask, clip, agg, scale, impl, dtype
    )
    return loss, {"vf_loss": vf_loss, "vf_clipfrac": clipfrac}
