"""PPO losses: clipped policy loss (+ KL penalty and entropy bonus, dual clip, GSPO), clipped value
loss, the KL estimators and masked loss aggregation.

Formulas: ../shared/conventions.md ("KL estimators", "Clipped policy loss", "Value loss", "Loss
aggregation"), i.e. verl's ``core_algos``. The policy and value losses run as one fused pass
(kernels/ppo_loss.py on CUDA, alignkit/cpu/losses.py on CPU): the forward reads every input once,
reduces it to per-row statistics, from which any aggregation mode and every metric follows with
B-sized work, and (when grad is needed) writes the per-token gradient of the row sums; the backward
scales that by the per-row weight of the aggregation in one pass. Metrics are tensors, never read on
the host; the one host read is the check that the mask holds only 0 and 1, which the pass counts
as it goes (a sync on CUDA, like every other alignkit op's mask check).

Conventions beyond the formulas:

* Ties are not clipped: the gradient at ``L1 == L2`` (ratio exactly at a clip bound) is the unclipped
  one, and ``Lc == L3`` is not dual-clipped; this matches the clip-fraction predicates.
* Masked positions are selected away, never multiplied: NaN/inf there does not leak.
* An all-masked batch gives loss 0 and zero gradients (normalisers are clamped at 1), never NaN.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import backend as _backend
from ..cpu import losses as _cpu

_backend.register_op("ppo_policy_loss")
_backend.register_op("value_loss")

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Estimator names, verl's aliases included, to the canonical name.
KL_ESTIMATORS = {
    "k1": "k1",
    "kl": "k1",
    "abs": "abs",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}
_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
RATIO_LEVELS = ("token", "sequence")

# Columns of the policy statistics (kernels/ppo_loss.py P_*; alignkit/cpu/losses.py).
_COUNT, _LOSS, _ENTROPY, _KL, _CLIP, _CLIP_LOWER, _NEG_LOGRATIO, _BAD_MASK = range(8)


# ----------------------------------------------------------------------------- validation


def _like(x: object, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    x = _checks.float_tensor(x, name)
    _checks.same_shape(x, name, ref, ref_name)
    _checks.same_device(x, name, ref, ref_name)
    return x


def _agg_mode(mode: object, name: str = "agg") -> str:
    if mode not in AGG_MODES:
        raise ValueError(f"{name} must be one of {', '.join(AGG_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _agg_scale(scale: object, mode: str, name: str = "agg_scale") -> float | None:
    if scale is None:
        return None
    if mode not in ("token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(
            f"{name} applies to token-mean (a global token count) and seq-mean-token-sum-norm (the "
            f"divisor), not to {mode}; got {scale!r}"
        )
    return _checks.positive(scale, name)


def _kl_estimator(estimator: object, name: str = "kl_estimator") -> str:
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATORS:
        raise ValueError(f"{name} must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator]


def _policy_config(
    *,
    clip_low,
    clip_high,
    dual_clip,
    agg,
    agg_scale,
    ratio_level,
    kl_coef,
    kl_estimator,
    entropy_coef,
    has_ref: bool,
    has_entropy: bool,
) -> dict:
    """Validated policy-loss options (shared with alignkit.fused_linear_ppo_loss)."""
    cfg = {
        "clip_low": _checks.non_negative(clip_low, "clip_low"),
        "clip_high": _checks.non_negative(clip_high, "clip_high"),
        "agg": _agg_mode(agg),
        "kl_estimator": _kl_estimator(kl_estimator),
        "kl_coef": _checks.finite(kl_coef, "kl_coef"),
        "entropy_coef": _checks.finite(entropy_coef, "entropy_coef"),
    }
    cfg["agg_scale"] = _agg_scale(agg_scale, cfg["agg"])
    if dual_clip is not None:
        dual_clip = _checks.finite(dual_clip, "dual_clip")
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {', '.join(RATIO_LEVELS)}, got {ratio_level!r}")
    cfg["ratio_level"] = ratio_level
    cfg["dual_clip"] = None if ratio_level == "sequence" else dual_clip  # GSPO has no dual clip
    cfg["kl_code"] = _KL_CODES[cfg["kl_estimator"]]
    if cfg["kl_coef"] != 0.0 and not has_ref:
        raise ValueError(f"kl_coef={cfg['kl_coef']} needs ref_logp, got None")
    if cfg["entropy_coef"] != 0.0 and not has_entropy:
        raise ValueError(f"entropy_coef={cfg['entropy_coef']} needs entropy, got None")
    return cfg


# ----------------------------------------------------------------------------- aggregation


def _row_scale(counts: torch.Tensor, mode: str, scale: float | None, T: int) -> torch.Tensor:
    """Per-row weights ``c_b`` with ``agg(L, m) = sum_b c_b sum_t m L`` (no host sync)."""
    if mode == "token-mean":
        if scale is not None:
            return torch.full_like(counts, 1.0 / scale)
        return (1.0 / counts.sum().clamp(min=1.0)).expand(counts.shape)
    nonempty = (counts > 0).to(counts.dtype)
    rows = nonempty.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return nonempty / rows
    if mode == "seq-mean-token-mean":
        return nonempty / ((counts + 1e-8) * rows)
    return nonempty / (rows * (float(T) if scale is None else scale))


def agg_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", scale: float | None = None
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss over the mask (differentiable in ``loss_mat``).

    * token-mean: ``sum(m L) / sum(m)``, or ``/ scale`` (a global token count) when given
    * seq-mean-token-sum: mean over non-empty rows of ``sum_t(m L)``
    * seq-mean-token-mean: mean over non-empty rows of ``sum_t(m L) / (sum_t m + 1e-8)``
    * seq-mean-token-sum-norm: ``sum over rows of sum_t(m L) / n_nonempty / scale``, ``scale``
      defaulting to T (Dr.GRPO: the max response length)

    Fully masked rows are excluded from the row count. Returns a 0-dim tensor (fp32 at least).
    """
    loss_mat = _checks.float_tensor(loss_mat, "loss_mat", ndim=2)
    mask = _checks.mask(mask, "mask", loss_mat, "loss_mat")
    mode = _agg_mode(mode, "mode")
    scale = _agg_scale(scale, mode, "scale")
    dtype = torch.promote_types(loss_mat.dtype, torch.float32)
    active = mask != 0
    row_sums = torch.where(
        active, loss_mat.to(dtype), torch.zeros((), dtype=dtype, device=loss_mat.device)
    ).sum(-1)
    counts = active.sum(-1).to(dtype)
    return (_row_scale(counts, mode, scale, loss_mat.shape[1]) * row_sums).sum()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate at ``d = logp - ref_logp`` (differentiable in both).

    k1 (``kl``): d;  abs: |d|;  k2 (``mse``): d^2 / 2;
    k3 (``low_var_kl``): ``x = clamp(-d, -20, 20)``, ``clamp(exp(x) - x - 1, -10, 10)`` (computed as
    ``expm1(x) - x``, which does not cancel near 0). Returns fp32 (fp64 for fp64 inputs).
    """
    logp = _checks.float_tensor(logp, "logp")
    ref_logp = _like(ref_logp, "ref_logp", logp, "logp")
    code = _kl_estimator(estimator, "estimator")
    dtype = _checks.accumulation_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if code == "k1":
        return d
    if code == "abs":
        return d.abs()
    if code == "k2":
        return 0.5 * d.square()
    x = (-d).clamp(-20.0, 20.0)
    return (torch.expm1(x) - x).clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------- implementations


def _numpy(t: torch.Tensor | None, dtype: torch.dtype):
    if t is None:
        return None
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def _mask_numpy(mask: torch.Tensor, dtype: torch.dtype):
    mask = mask.detach().to("cpu")
    if mask.dtype in (torch.bool, torch.uint8, dtype):
        return mask.contiguous().numpy()
    return mask.to(dtype).contiguous().numpy()


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()


def _policy_stats(impl, logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, cfg, write_grad):
    """One fused pass: per-row statistics (B, 8) in the compute dtype and, when ``write_grad``, the
    per-token gradient of the row sums w.r.t. logp (B, T) (what :func:`_scale_rows` scales)."""
    dtype = cfg["dtype"]
    seq = cfg["ratio_level"] == "sequence"
    if impl == "triton":
        from ..kernels import ppo_loss as _kernels

        tensors = [_contig(t) for t in (logp, old_logp, advantages, mask, is_weights, ref_logp, entropy)]
        logp_c, old_c, adv_c, mask_c, isw_c, ref_c, ent_c = tensors
        seq_lr = _kernels.seq_logratio(logp_c, old_c, mask_c, dtype) if seq else None
        return _kernels.policy_fwd(
            logp_c, old_c, adv_c, mask_c, isw_c, ref_c, ent_c, seq_lr,
            cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["kl_code"], cfg["kl_coef"],
            write_grad, dtype,
        )  # fmt: skip
    np_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lp, old, adv, isw, ref, ent = (
        _numpy(t, np_dtype) for t in (logp, old_logp, advantages, is_weights, ref_logp, entropy)
    )
    stats_np, _, grad_np = _cpu.policy_fwd(
        lp, old, adv, _mask_numpy(mask, np_dtype), isw, ref, ent, seq,
        cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["kl_code"], cfg["kl_coef"], write_grad,
    )  # fmt: skip
    stats = torch.from_numpy(stats_np).to(device=logp.device, dtype=dtype)
    grad = None if grad_np is None else torch.from_numpy(grad_np).to(logp.device)
    return stats, grad


def _scale_rows(impl, grad, mask, row_weight, out_dtype, entropy_coef=0.0, entropy_dtype=None):
    """Backward of every loss here: ``row_weight[:, None] * grad`` (out_dtype; None if grad is None)
    and, for ``entropy_dtype``, d entropy ``= -entropy_coef * row_weight[:, None] * m``."""
    if impl == "triton" and grad is not None:
        from ..kernels import ppo_loss as _kernels

        mask = _contig(mask) if entropy_dtype is not None else None
        return _kernels.scale_rows_bwd(grad, mask, row_weight, out_dtype, entropy_coef, entropy_dtype)
    if grad is not None and grad.device.type == "cpu":  # numba: torch's thread pool loses on small CPUs
        np_mask = None if entropy_dtype is None else _mask_numpy(mask, grad.dtype)
        dx, dent = _cpu.scale_rows(
            grad.numpy(), np_mask, row_weight.detach().to("cpu", torch.float64).numpy(), entropy_coef,
            entropy_dtype is not None,
        )  # fmt: skip
        dx = torch.from_numpy(dx).to(out_dtype)
        return dx, None if dent is None else torch.from_numpy(dent).to(entropy_dtype)
    dx = None if grad is None else (row_weight.to(grad.dtype)[:, None] * grad).to(out_dtype)
    dent = None
    if entropy_dtype is not None:
        w = (-entropy_coef * row_weight)[:, None].to(mask.device)
        dent = torch.where(mask != 0, w, torch.zeros((), dtype=w.dtype, device=w.device)).to(entropy_dtype)
    return dx, dent


def _raise_on_bad_mask(bad_counts: torch.Tensor, name: str = "mask") -> None:
    # The fused pass counts mask values other than 0 and 1 as it reads the mask, so validating
    # costs no extra pass; reading the count is one host sync on CUDA (as _checks.mask's would be).
    if bool(bad_counts.any()):
        raise ValueError(f"{name} must contain only 0 and 1")


def _policy_combine(stats, cfg, T):
    """Loss, metric tensors (pg, clipfrac, clipfrac_lower, ppo_kl, kl, entropy) and the per-row
    scale of the aggregation, from the per-row statistics (B-sized work)."""
    _raise_on_bad_mask(stats[:, _BAD_MASK])
    counts = stats[:, _COUNT]
    row_scale = _row_scale(counts, cfg["agg"], cfg["agg_scale"], T)
    pg = (row_scale * stats[:, _LOSS]).sum()
    ent_agg = (row_scale * stats[:, _ENTROPY]).sum()
    kl_agg = (row_scale * stats[:, _KL]).sum()
    loss = pg - cfg["entropy_coef"] * ent_agg + cfg["kl_coef"] * kl_agg
    tokens = counts.sum().clamp(min=1.0)
    metrics = (
        pg,
        stats[:, _CLIP].sum() / tokens,
        stats[:, _CLIP_LOWER].sum() / tokens,
        stats[:, _NEG_LOGRATIO].sum() / tokens,
        kl_agg,
        ent_agg,
    )
    return loss, metrics, row_scale


def _metrics_dict(metrics, with_kl: bool, with_entropy: bool) -> dict[str, torch.Tensor]:
    pg, clipfrac, clipfrac_lower, ppo_kl, kl, ent = metrics
    out = {"pg_loss": pg, "pg_clipfrac": clipfrac, "pg_clipfrac_lower": clipfrac_lower, "ppo_kl": ppo_kl}
    if with_kl:
        out["kl"] = kl
    if with_entropy:
        out["entropy"] = ent
    return out


class _PolicyLossFunction(torch.autograd.Function):
    """Inputs: logp and entropy (differentiable); the rest are constants. Outputs: loss and the
    metric tensors (non-differentiable). Saves the per-token gradient of the row sums (B, T) and
    the per-row scale of the aggregation."""

    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, cfg):
        stats, grad = _policy_stats(
            cfg["impl"], logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, cfg,
            write_grad=ctx.needs_input_grad[0],
        )  # fmt: skip
        loss, metrics, row_scale = _policy_combine(stats, cfg, logp.shape[1])
        dtype = cfg["dtype"]
        ctx.cfg = cfg
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        ctx.save_for_backward(grad, mask if ctx.needs_input_grad[1] else None, row_scale)
        metrics = tuple(t.to(dtype) for t in metrics)
        ctx.mark_non_differentiable(*metrics)
        return (loss.to(dtype), *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        grad, mask, row_scale = ctx.saved_tensors
        logp_dtype, entropy_dtype = ctx.dtypes
        dlogp, dent = _scale_rows(
            ctx.cfg["impl"], grad, mask, row_scale * grad_loss, logp_dtype, ctx.cfg["entropy_coef"],
            entropy_dtype if ctx.needs_input_grad[1] else None,
        )  # fmt: skip
        return dlogp, dent, None, None, None, None, None, None


class _ValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, cfg):
        dtype = cfg["dtype"]
        write_grad = ctx.needs_input_grad[0]
        if cfg["impl"] == "triton":
            from ..kernels import ppo_loss as _kernels

            tensors = tuple(_contig(t) for t in (values, old_values, returns, mask))
            stats, grad = _kernels.value_fwd(*tensors, cfg["clip"], write_grad, dtype)
        else:
            np_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            arrays = (
                *(_numpy(t, np_dtype) for t in (values, old_values, returns)),
                _mask_numpy(mask, np_dtype),
            )
            stats_np, grad_np = _cpu.value_fwd(*arrays, cfg["clip"], write_grad)
            stats = torch.from_numpy(stats_np).to(device=values.device, dtype=dtype)
            grad = None if grad_np is None else torch.from_numpy(grad_np).to(values.device)
        _raise_on_bad_mask(stats[:, 3])
        counts = stats[:, 0]
        row_scale = _row_scale(counts, cfg["agg"], cfg["agg_scale"], values.shape[1])
        loss = (0.5 * (row_scale * stats[:, 1]).sum()).to(dtype)
        vf_loss = loss.clone()
        clipfrac = (stats[:, 2].sum() / counts.sum().clamp(min=1.0)).to(dtype)
        ctx.impl = cfg["impl"]
        ctx.values_dtype = values.dtype
        ctx.save_for_backward(grad, 0.5 * row_scale)
        ctx.mark_non_differentiable(vf_loss, clipfrac)
        return loss, vf_loss, clipfrac

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        grad, half_row_scale = ctx.saved_tensors
        dv, _ = _scale_rows(ctx.impl, grad, None, half_row_scale * grad_loss, ctx.values_dtype)
        return dv, None, None, None, None


# ----------------------------------------------------------------------------- public API


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    agg_scale: float | None = None,
    ratio_level: str = "token",
    is_weights: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO actor loss with dual clip, KL penalty and entropy bonus, in one fused pass.

    Per token (conventions.md): ``lr = clamp(logp - old_logp, -20, 20)``, ``ratio = exp(lr)``,
    ``L = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))``, then where ``A < 0``
    ``min(L, -A dual_clip)``, times ``is_weights``. Total:
    ``agg(L) - entropy_coef * agg(entropy) + kl_coef * agg(kl_penalty(logp, ref_logp))``.
    ``ratio_level="sequence"`` is GSPO (the ratio is ``exp(min(s, 10))`` with ``s`` the masked mean
    log-ratio of the row, gradient through ``logp - stopgrad(logp)``; no dual clip).

    Args:
        logp, old_logp, advantages, mask: (B, T); gradients flow to ``logp`` (and ``entropy``) only.
        clip_low, clip_high: non-negative clip ranges (asymmetric: DAPO's clip-higher).
        dual_clip: > 1, or None to disable (ignored for GSPO).
        agg, agg_scale: aggregation mode (see :func:`agg_loss`) and its scale.
        is_weights, ref_logp, entropy: optional (B, T) tensors.
        kl_coef, kl_estimator: KL penalty weight (needs ``ref_logp``) and estimator
            (k1/kl, abs, k2/mse, k3/low_var_kl).
        entropy_coef: entropy bonus weight (needs ``entropy``).
        backend: ``"auto" | "triton" | "cpu"``.

    Returns:
        ``(loss, metrics)``: 0-dim loss (fp32; fp64 for fp64 inputs) and a dict of 0-dim tensors
        (no host sync): pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl (masked token means of the
        clip predicates and of ``-lr``), and ``kl`` / ``entropy`` (the aggregated terms) when
        ``ref_logp`` / ``entropy`` are given.
    """
    logp = _checks.float_tensor(logp, "logp", ndim=2)
    old_logp = _like(old_logp, "old_logp", logp, "logp")
    advantages = _like(advantages, "advantages", logp, "logp")
    mask = _checks.mask(mask, "mask", logp, "logp", check_values=False)  # values: checked in the pass
    if is_weights is not None:
        is_weights = _like(is_weights, "is_weights", logp, "logp")
    if ref_logp is not None:
        ref_logp = _like(ref_logp, "ref_logp", logp, "logp")
    if entropy is not None:
        entropy = _like(entropy, "entropy", logp, "logp")
    cfg = _policy_config(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, agg_scale=agg_scale,
        ratio_level=ratio_level, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        has_ref=ref_logp is not None, has_entropy=entropy is not None,
    )  # fmt: skip
    cfg["impl"] = _backend.resolve(backend, logp.device)
    cfg["dtype"] = _checks.accumulation_dtype(logp, old_logp, advantages, is_weights, ref_logp, entropy)
    loss, pg, clipfrac, clipfrac_lower, ppo_kl, kl, ent = _PolicyLossFunction.apply(
        logp, entropy, old_logp, advantages, mask, is_weights, ref_logp, cfg
    )
    metrics = _metrics_dict(
        (pg, clipfrac, clipfrac_lower, ppo_kl, kl, ent), ref_logp is not None, entropy is not None
    )
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
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
    old_values = _like(old_values, "old_values", values, "values")
    returns = _like(returns, "returns", values, "values")
    mask = _checks.mask(mask, "mask", values, "values", check_values=False)  # values: checked in the pass
    cfg = {"clip": _checks.non_negative(clip, "clip"), "agg": _agg_mode(agg)}
    cfg["agg_scale"] = _agg_scale(agg_scale, cfg["agg"])
    cfg["impl"] = _backend.resolve(backend, values.device)
    cfg["dtype"] = _checks.accumulation_dtype(values, old_values, returns)
    loss, vf_loss, clipfrac = _ValueLossFunction.apply(values, old_values, returns, mask, cfg)
    return loss, {"vf_loss": vf_loss, "vf_clipfrac": clipfrac}
