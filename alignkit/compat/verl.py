"""verl's functions, backed by alignkit ops: same names, signatures, return structures, metric keys
and numbers as verl 0.9 (``verl/trainer/ppo/core_algos.py``, ``verl/utils/torch_functional.py``).

Use them by changing an import line (``from alignkit.compat.verl import agg_loss, ...``) or call
:func:`patch` once, before building the trainer, to swap them into verl itself.

Where verl and alignkit's own ops differ, these functions reproduce verl, by calling the alignkit
op on transformed inputs and scaling its result rather than re-implementing the math:

* ``agg_loss`` (and every loss's aggregation): verl's ``dp_size``, ``batch_num_tokens``,
  ``global_batch_size`` and ``loss_scale_factor`` normalisers and its ``token-sum`` mode.
* ``compute_grpo_outcome_advantage``: scores are the sum of ``token_level_rewards`` over *all*
  positions (verl does not mask that sum); ``norm_adv_by_std_in_grpo=False`` is Dr.GRPO.
* ``compute_reinforce_plus_plus_outcome_advantage``: verl 0.9 carries the return through masked
  positions (observation spans) and reports 0 there, which is GAE with zero values and lam = 1;
  :func:`alignkit.discounted_returns` restarts the sum instead (verl <= 0.8's loop).
* ``compute_policy_loss_gspo``: verl does not clamp the per-token log-ratios at +-20 before the
  sequence mean (alignkit's GSPO does); rows with such a token get the unclamped mean.
* ``kl_penalty``: the ``"+"`` suffix (e.g. ``"k3+"``: k3's value with k2's gradient).

Differences that remain, all on inputs verl handles worse or not at all: outputs are fp32 (fp64
for fp64 inputs) where verl keeps a bf16/fp16 input's dtype; masks must be 0/1 (verl also accepts
weighted masks in ``masked_whiten``); NaN at a masked position stays out of every result (verl
multiplies it by 0, which gives NaN); an all-masked batch gives 0 where verl gives NaN; k3 is
computed as ``expm1(u) - u``, accurate near 0 where verl's ``exp(u) - u - 1`` cancels.

Bad input raises what verl raises (``ValueError`` for an unknown ``loss_agg_mode``, ...). Where
verl asserts, or raises ``AttributeError`` / ``NotImplementedError``, the error here is an
alignkit ``ValueError`` / ``TypeError`` subclass that an ``except`` written for verl still catches.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import alignkit

from .. import _checks
from . import patching
from .patching import PatchHandle

__all__ = [
    "VerlAssertionError",
    "VerlConfigError",
    "VerlNotImplementedError",
    "agg_loss",
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss_cispo",
    "compute_policy_loss_gspo",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_value_loss",
    "entropy_from_logits",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_whiten",
    "patch",
]

CORE_ALGOS = "verl.trainer.ppo.core_algos"
TORCH_FUNCTIONAL = "verl.utils.torch_functional"
CORE_ALGOS_FUNCTIONS = (
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_gspo",
    "compute_policy_loss_cispo",
    "compute_value_loss",
    "agg_loss",
    "kl_penalty",
)
TORCH_FUNCTIONAL_FUNCTIONS = ("masked_whiten", "logprobs_from_logits", "entropy_from_logits")
REGISTRIES = ("POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY")  # name -> function dicts of core_algos

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")  # each also with a "+" suffix
GSPO_LOG_RATIO_CLAMP = 20.0  # alignkit clamps per-token log-ratios at +-20 (verl's GSPO does not)


class VerlAssertionError(ValueError, AssertionError):
    """Input that verl rejects with an ``assert`` (no config, ``clip_ratio_c <= 1``)."""


class VerlConfigError(TypeError, AttributeError):
    """A config without a field verl reads from it (verl raises AttributeError)."""


class VerlNotImplementedError(ValueError, NotImplementedError):
    """A ``kl_penalty`` name verl does not implement (verl raises NotImplementedError)."""


# ----------------------------------------------------------------------------- helpers

_REQUIRED = object()


def _config_value(config: Any, name: str, default: Any = _REQUIRED) -> Any:
    """``config.name`` (an ActorConfig / AlgoConfig, an omegaconf DictConfig, any object) or
    ``config[name]`` (a mapping); ``default`` when absent, VerlConfigError when required."""
    if isinstance(config, Mapping):
        if name in config:
            return config[name]
    else:
        value = getattr(config, name, _REQUIRED)
        if value is not _REQUIRED:
            return value
    if default is _REQUIRED:
        raise VerlConfigError(f"config must provide {name!r}, got a {type(config).__name__} without it")
    return default


def _require_config(config: Any, function: str) -> Any:
    if config is None:
        raise VerlAssertionError(f"{function} needs config (an actor or algorithm config), got None")
    return config


def _scalar(value: Any, name: str) -> Any:
    """A Python number from a number or a one-element tensor (verl types gamma/lam as tensors)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        return value.item()
    return value


def _count(value: Any, name: str) -> float | torch.Tensor:
    """A positive normaliser: a number (checked) or a tensor (kept on its device, unchecked: reading it
    would cost a device sync)."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)  # factors are formed in fp64, then cast to the loss's dtype
    return _checks.positive(value, name)


def verl_aggregation(
    loss_agg_mode: str,
    loss_mask: torch.Tensor,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[str, float | None, float | torch.Tensor]:
    """``(agg, agg_scale, factor)`` such that ``factor * alignkit.agg_loss(L, m, agg=agg,
    agg_scale=agg_scale)`` is verl's ``agg_loss(L, m, loss_agg_mode, ...)``, with ``S`` the masked
    sum, ``R`` the number of non-empty rows and ``dp`` the data-parallel size:

    * token-mean: ``S / batch_num_tokens * dp`` (default: the local token count, dp = 1)
    * token-sum: ``S * dp``
    * seq-mean-token-sum: ``S / global_batch_size * dp`` (default: R, dp = 1)
    * seq-mean-token-sum-norm: seq-mean-token-sum ``/ loss_scale_factor`` (default: T)
    * seq-mean-token-mean: ``sum over rows of S_b / (n_b + 1e-8) / global_batch_size * dp``
    """
    if not isinstance(loss_agg_mode, str) or loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")  # verl's message
    dp = _checks.positive(dp_size, "dp_size")
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0, dp
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", None, dp
        tokens = _count(batch_num_tokens, "batch_num_tokens")
        return (
            ("token-mean", 1.0, dp / tokens)
            if isinstance(tokens, torch.Tensor)
            else ("token-mean", tokens, dp)
        )
    if global_batch_size is None and dp > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    sequences = None if global_batch_size is None else _count(global_batch_size, "global_batch_size")
    if loss_agg_mode == "seq-mean-token-mean":
        if sequences is None:
            return "seq-mean-token-mean", None, dp
        rows = (loss_mask != 0).any(-1).sum(dtype=torch.float64)  # alignkit divides by R: undo it
        return "seq-mean-token-mean", None, rows * (dp / sequences)
    norm = 1.0
    if loss_agg_mode == "seq-mean-token-sum-norm":
        norm = (
            loss_mask.shape[-1]
            if loss_scale_factor is None
            else _count(loss_scale_factor, "loss_scale_factor")
        )
    if sequences is None:
        if loss_agg_mode == "seq-mean-token-sum":
            return "seq-mean-token-sum", None, dp
        return "seq-mean-token-sum-norm", float(norm), dp
    # S / gbs / norm: token-mean with a global divisor (the masked sum over non-empty rows is S)
    if isinstance(sequences, torch.Tensor):
        return "token-mean", float(norm), dp / sequences
    return "token-mean", sequences * norm, dp


def _scaled(loss: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    if isinstance(factor, torch.Tensor):
        return loss * factor.to(device=loss.device, dtype=loss.dtype)
    return loss if factor == 1 else loss * factor


def _actor_metrics(metrics: dict[str, torch.Tensor], clipfrac_lower: bool = True) -> dict[str, float]:
    """verl's metric dict (Python floats, one host read for all three)."""
    values = torch.stack([metrics["pg_clipfrac"], metrics["ppo_kl"], metrics["pg_clipfrac_lower"]])
    clipfrac, ppo_kl, lower = values.detach().double().tolist()
    return {
        "actor/pg_clipfrac": clipfrac,
        "actor/ppo_kl": ppo_kl,
        "actor/pg_clipfrac_lower": lower if clipfrac_lower else 0.0,
    }


def _clip_ratios(config: Any) -> tuple[float, float]:
    clip_ratio = _config_value(config, "clip_ratio")
    low = _config_value(config, "clip_ratio_low", None)
    high = _config_value(config, "clip_ratio_high", None)
    return (clip_ratio if low is None else low), (clip_ratio if high is None else high)


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = _config_value(config, "global_batch_info", None)
    return dict(info) if info else {}


# ----------------------------------------------------------------------------- advantages


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's GAE: ``alignkit.gae(..., whiten=True)``: masked positions pass both carries through,
    returns ``A + V`` before whitening, advantages whitened over ``response_mask``. (B, T) each."""
    with torch.no_grad():  # targets, as in verl (inputs that require grad are fine here)
        return alignkit.gae(
            token_level_rewards,
            values,
            response_mask,
            gamma=_scalar(gamma, "gamma"),
            lam=_scalar(lam, "lam"),
            whiten=True,
        )


def _outcome(token_level_rewards, response_mask, index, method, epsilon):
    """Group advantages of the per-row reward sums, broadcast over the response tokens."""
    rewards = _checks.float_tensor(token_level_rewards, "token_level_rewards", ndim=2)
    _checks.mask(response_mask, "response_mask", rewards, "token_level_rewards", check_values=False)
    with torch.no_grad():
        scores = rewards.sum(dim=-1)  # over all positions, as verl sums (the mask is not applied)
        advantages = alignkit.group_advantages(scores, index, method=method, eps=epsilon, mask=response_mask)
    return advantages, advantages


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(s - mu) / (sigma + epsilon)`` per group of ``index`` (a group of one: mu = 0,
    sigma = 1); ``norm_adv_by_std_in_grpo=False``: ``s - mu`` (Dr.GRPO). ``s`` is the row sum of
    ``token_level_rewards``; the result is broadcast over ``response_mask``. Returns
    ``(advantages, advantages)``, (B, T)."""
    method = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
    return _outcome(token_level_rewards, response_mask, index, method, epsilon)


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: ``s n/(n-1) - mu n/(n-1)`` (``s`` minus the mean of the other members; a group of one
    keeps ``s``), broadcast over ``response_mask``. ``epsilon`` is unused, as in verl."""
    return _outcome(token_level_rewards, response_mask, index, "rloo", 0.0)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: ``s - mu`` per group, broadcast over the response tokens and whitened
    over them (0 outside the mask). ``epsilon`` is unused, as in verl."""
    return _outcome(token_level_rewards, response_mask, index, "reinforce++-baseline", 0.0)


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (verl 0.9): the discounted return ``G_t = r_t + gamma * G_next`` over live
    tokens, where masked positions are skipped (``G`` carries through them unchanged and they
    report 0), then whitened over the mask. ``gamma`` is ``config.gamma``.

    The skip-through recurrence is GAE's with zero values and ``lam = 1``, so this is
    ``alignkit.gae(rewards, 0, mask, gamma=gamma, lam=1)`` restricted to the mask. Returns
    ``(advantages, returns)``, (B, T), 0 outside the mask.
    """
    config = _require_config(config, "compute_reinforce_plus_plus_outcome_advantage")
    gamma = _scalar(_config_value(config, "gamma"), "gamma")
    rewards = _checks.float_tensor(token_level_rewards, "token_level_rewards", ndim=2)
    with torch.no_grad():
        carried, _ = alignkit.gae(rewards, torch.zeros_like(rewards), response_mask, gamma=gamma, lam=1.0)
        live = response_mask != 0
        returns = torch.where(live, carried, 0.0)
        advantages = torch.where(live, alignkit.masked_whiten(returns, response_mask), 0.0)
    return advantages, returns


# ----------------------------------------------------------------------------- losses


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """verl's ``agg_loss``: ``alignkit.agg_loss`` with verl's global-batch normalisers (see
    :func:`verl_aggregation` for each mode's formula). Returns a 0-dim tensor."""
    agg, scale, factor = verl_aggregation(
        loss_agg_mode, loss_mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    return _scaled(alignkit.agg_loss(loss_mat, loss_mask, agg=agg, agg_scale=scale), factor)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """Per-token KL estimate by verl's names: ``kl``/``k1``, ``abs``, ``mse``/``k2``,
    ``low_var_kl``/``k3`` (docs/formulas.md, "KL estimators"). A ``"+"`` suffix keeps the value
    and takes k2's gradient (``k2 - stopgrad(k2) + stopgrad(value)``), as verl does. ``"full"`` and
    other names raise (VerlNotImplementedError, a NotImplementedError)."""
    name = kl_penalty
    if not isinstance(name, str):
        raise TypeError(f"kl_penalty must be a str, got {type(name).__name__}")
    straight_through = name.endswith("+")
    base = name[:-1] if straight_through else name
    if base not in KL_PENALTIES:
        hint = " ('full' is not implemented by verl either)" if base == "full" else ""
        raise VerlNotImplementedError(
            f"kl_penalty must be one of {', '.join(KL_PENALTIES)} (optionally with a '+' suffix), "
            f"got {name!r}{hint}"
        )
    value = alignkit.kl_penalty(logprob, ref_logprob, kl_estimator=base)
    if not straight_through:
        return value
    k2 = alignkit.kl_penalty(logprob, ref_logprob, kl_estimator="k2")
    return k2 - k2.detach() + value.detach()


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's clipped PPO loss with dual clip: :func:`alignkit.ppo_policy_loss` with
    ``clip_low = config.clip_ratio_low`` (default ``config.clip_ratio``), ``clip_high`` likewise,
    ``dual_clip = config.clip_ratio_c`` (default 3.0, must be > 1), ``is_weights =
    rollout_is_weights`` and verl's aggregation (``config.global_batch_info`` included).

    Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``, the
    metrics as Python floats (verl reads them to the host; here one read for all three).
    """
    config = _require_config(config, "compute_policy_loss_vanilla")
    clip_low, clip_high = _clip_ratios(config)
    dual_clip = _config_value(config, "clip_ratio_c", 3.0)
    if not (isinstance(dual_clip, numbers.Real) and dual_clip > 1.0):
        raise VerlAssertionError(
            f"clip_ratio_c (the dual-clip bound) must be greater than 1.0, got {dual_clip!r}"
        )
    agg, scale, factor = verl_aggregation(loss_agg_mode, response_mask, **_global_batch_info(config))
    loss, metrics = alignkit.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=float(dual_clip),
        agg=agg,
        agg_scale=scale,
        is_weights=rollout_is_weights,
    )
    return _scaled(loss, factor), _actor_metrics(metrics)


def _unclamped_sequence_ratio_old_logp(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """old_log_prob, except in rows holding a live token with ``|logp - old| > 20``: there
    ``logp - s`` with ``s`` the row's *unclamped* masked-mean log-ratio, so that alignkit's GSPO
    (which clamps each token at +-20 before the mean) sees verl's sequence ratio."""
    with torch.no_grad():
        live = response_mask != 0
        log_ratio = log_prob.detach() - old_log_prob
        wild = (live & (log_ratio.abs() > GSPO_LOG_RATIO_CLAMP)).any(-1, keepdim=True)
        mean = torch.where(live, log_ratio, 0.0).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp(
            min=1
        )
        return torch.where(wild, log_prob.detach() - mean, old_log_prob)


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's GSPO (arXiv 2507.18071): ``alignkit.ppo_policy_loss(loss_type="gspo")``, one ratio
    ``exp(min(s, 10))`` per sequence with ``s`` the masked mean of ``log_prob - old_log_prob``,
    clip ``config.clip_ratio_low/high``, no dual clip, aggregated in ``loss_agg_mode`` (verl 0.9
    honours it; default seq-mean-token-mean) with verl's normalisers.

    verl takes the mean of the *unclamped* per-token log-ratios; so does this function (the one
    remaining difference: a row whose mean is below -20, a ratio under 2e-9, gets ratio e^-20).
    Returns ``(pg_loss, metrics)`` as :func:`compute_policy_loss_vanilla`, pg_clipfrac_lower 0.
    """
    config = _require_config(config, "compute_policy_loss_gspo")
    clip_low, clip_high = _clip_ratios(config)
    agg, scale, factor = verl_aggregation(loss_agg_mode, response_mask, **_global_batch_info(config))
    log_prob_t = _checks.float_tensor(log_prob, "log_prob", ndim=2)
    old = _checks.float_like(old_log_prob, "old_log_prob", log_prob_t, "log_prob")
    mask = _checks.mask(response_mask, "response_mask", log_prob_t, "log_prob", check_values=False)
    loss, metrics = alignkit.ppo_policy_loss(
        log_prob_t,
        _unclamped_sequence_ratio_old_logp(old, log_prob_t, mask),
        advantages,
        mask,
        loss_type="gspo",
        clip_low=clip_low,
        clip_high=clip_high,
        agg=agg,
        agg_scale=scale,
        is_weights=rollout_is_weights,
    )
    return _scaled(loss, factor), _actor_metrics(metrics, clipfrac_lower=False)


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's CISPO (arXiv 2506.13585): ``alignkit.ppo_policy_loss(loss_type="cispo")``,
    ``-stopgrad(clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A * logp`` with verl's
    aggregation. Returns ``(pg_loss, metrics)`` as :func:`compute_policy_loss_vanilla`,
    pg_clipfrac_lower 0."""
    config = _require_config(config, "compute_policy_loss_cispo")
    clip_low, clip_high = _clip_ratios(config)
    agg, scale, factor = verl_aggregation(loss_agg_mode, response_mask, **_global_batch_info(config))
    loss, metrics = alignkit.ppo_policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        loss_type="cispo",
        clip_low=clip_low,
        clip_high=clip_high,
        agg=agg,
        agg_scale=scale,
        is_weights=rollout_is_weights,
    )
    return _scaled(loss, factor), _actor_metrics(metrics, clipfrac_lower=False)


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's clipped value loss (note verl's argument order: predictions, returns, old values):
    ``0.5 * agg(max((vpreds - R)^2, (clip(vpreds, values -+ cliprange_value) - R)^2))`` by
    :func:`alignkit.value_loss`. Returns ``(vf_loss, vf_clipfrac)``, 0-dim tensors."""
    agg, scale, factor = verl_aggregation(
        loss_agg_mode, response_mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    loss, metrics = alignkit.value_loss(
        vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg, agg_scale=scale
    )
    return _scaled(loss, factor), metrics["vf_clipfrac"]


# ----------------------------------------------------------------------------- torch_functional


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + 1e-8)`` over the 0/1 ``mask`` (unbiased variance), plus the mean
    back when ``shift_mean`` is false: :func:`alignkit.masked_whiten`. A mask selecting fewer than
    2 elements raises ValueError, as in verl."""
    return alignkit.masked_whiten(values, mask, shift_mean=bool(shift_mean))


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """``log_softmax(logits)[labels]`` by :func:`alignkit.token_logprobs` (fp32; the -100 label
    gives 0, as verl's flash-attn path does). ``inplace_backward`` writes the gradient into the
    logits' storage, as verl's flash-attn kernel does, but only for logits produced by an op (a
    leaf tensor's data is never overwritten) and not for expanded (stride-0) views."""
    logits = _checks.float_tensor(logits, "logits")
    inplace = bool(inplace_backward) and logits.grad_fn is not None and 0 not in logits.stride()
    return alignkit.token_logprobs(logits, labels, inplace_backward=inplace)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last dimension, ``logsumexp(z) - sum softmax(z) z``
    (differentiable), by :func:`alignkit.token_logprobs` (the vocabulary is streamed in tiles)."""
    logits = _checks.float_tensor(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension, got a scalar")
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return alignkit.token_logprobs(logits, labels, return_entropy=True)[1]


# ----------------------------------------------------------------------------- patching


def patch() -> PatchHandle:
    """Swap this module's functions into verl: in ``core_algos`` and ``torch_functional``, in
    every imported verl module that re-imported them by name, and in verl's registries
    (``register_policy_loss``: vanilla, gspo, cispo; ``register_adv_est``: gae, grpo, rloo,
    reinforce_plus_plus, reinforce_plus_plus_baseline). Call it before building the trainer.

    Returns a :class:`~alignkit.compat.patching.PatchHandle`; ``handle.restore()`` (or leaving
    ``with patch():``) puts verl's functions back. When verl is not installed (or fails to
    import) this does nothing and warns (:class:`~alignkit.compat.patching.PatchWarning`).
    """
    handle = PatchHandle("verl")
    modules = patching.import_peer("verl", (CORE_ALGOS, TORCH_FUNCTIONAL))
    if modules is None:
        return handle
    compat = sys.modules[__name__]
    replacements = {
        **patching.originals_of(modules[CORE_ALGOS], CORE_ALGOS_FUNCTIONS, compat),
        **patching.originals_of(modules[TORCH_FUNCTIONAL], TORCH_FUNCTIONAL_FUNCTIONS, compat),
    }
    patching.replace_everywhere(handle, replacements)
    for name in REGISTRIES:
        registry = getattr(modules[CORE_ALGOS], name, None)
        patching.replace_in_registry(handle, registry, replacements, f"{CORE_ALGOS}.{name}")
    return handle
