"""From the policy's last hidden states to the PPO actor loss in one chunked pass, logits never
held whole: ``fused_linear_ppo_loss``.

Math: ``logits = hidden @ weight.T (+ bias)``, ``z = logits / temperature``,
``logp = z[label] - logsumexp(z)``, ``H = logsumexp(z) - sum softmax(z) z`` (alignkit.ops.logprobs),
then the loss of :func:`alignkit.ppo_policy_loss` with ``entropy = H``. It equals
``ppo_policy_loss(*fused_linear_logprobs(..., return_entropy=True))`` in value and gradients. With
``logit_floor`` the log-prob and entropy are those of the distribution truncated at the floor (the
entries with ``z < floor`` leave the normaliser inside the fused tiles, as in
``fused_linear_logprobs(..., logit_floor=)``); with ``cu_seqlens`` the (1, N) inputs hold packed
sequences and the loss is that of ``ppo_policy_loss(..., cu_seqlens=)``.

The loss is terminal, so its gradients for hidden / weight / bias are computed during the
forward, chunk by chunk, and handed out by backward scaled by ``grad_output`` (in place: the graph
can be back-propagated once). The aggregation normalisers (global token count, per-row counts)
come from the mask before the chunk loop, so every per-token gradient is final when its chunk is
processed. Two schedules:

* single pass (CPU, per-token ratio: ppo_clip and cispo): per chunk of tokens, logits = one
  matmul, log-prob and entropy, the loss terms and their gradients (alignkit/cpu/losses.py on the
  chunk), d logits in place, then d hidden = dz @ W and d weight += dz^T h. Three matmuls per chunk;
  peak memory about one (chunk, V) logits block plus the gradients.
* two phases (Triton, and GSPO whose per-row ratio needs the whole row's log-probs first):
  kernels/fused_logprobs.py's fused forward (logits tiles folded into online statistics in registers,
  never stored) for every token, the fused PPO kernels on the (B, T) log-probs, then the fused
  backward, which recomputes logits tiles chunk by chunk. Peak memory is that of
  ``fused_linear_logprobs`` plus B x T-sized vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .. import backend as _backend
from .. import loss_layout as L
from ..cpu import logprobs as _cpu_logprobs
from ..cpu import mask_to_numpy, to_numpy
from .logprobs import validate_label_range, validate_labels, validate_lm_head, validate_logit_floor
from .loss_config import FIELDS, UNSET, PolicyLossConfig, resolve_config
from .loss_pass import (
    cpu_policy_fwd,
    packed_width,
    policy_loss_and_metrics,
    policy_stats,
    row_weights,
    scale_rows,
)
from .losses import METRIC_KEYS, packed_offsets, select_metrics

_backend.register_op("fused_linear_ppo_loss")


def _chunks(B: int, T: int, chunk_tokens: int):
    """Rectangular (rows, cols) blocks of the (B, T) grid, each contiguous in the flattened token
    order and never straddling a row boundary mid-row: whole-row groups when a row fits a chunk,
    else pieces of one row."""
    if chunk_tokens >= T:
        rows = max(1, chunk_tokens // max(T, 1))
        for r0 in range(0, B, rows):
            yield slice(r0, min(r0 + rows, B)), slice(0, T)
    else:
        for r in range(B):
            for c0 in range(0, T, chunk_tokens):
                yield slice(r, r + 1), slice(c0, min(c0 + chunk_tokens, T))


def _chunk_sequences(cu: torch.Tensor | None, cols: slice) -> tuple[slice, torch.Tensor | None]:
    """The packed sequences a chunk of columns ``[cols.start, cols.stop)`` of the one packed row
    touches (a slice of them) and their offsets clipped to the chunk, relative to its start (None:
    not packed, every row of the chunk is a row)."""
    if cu is None:
        return slice(None), None
    first = int(torch.searchsorted(cu, cols.start, right=True)) - 1
    last = int(torch.searchsorted(cu, cols.stop, right=False))  # cu[last] >= cols.stop
    local = cu[first : last + 1].clamp(cols.start, cols.stop) - cols.start
    return slice(first, last), local.contiguous()


def _single_pass_cpu(
    hidden, weight, bias, labels, floor, old_logp, advantages, mask, is_weights, ref_logp, cu, run, needs
):
    """Per-token ratio (ppo_clip, cispo) on the CPU implementation: (stats (rows, POLICY_STATS),
    d hidden, d weight, d bias). ``labels`` already hold ignore_index wherever the mask is 0;
    ``floor`` is None or (B, T); ``cu``: packed sequence offsets or None. Per-token ratios make the
    statistics of a sequence the sum of those of its pieces, so chunks need not follow sequences."""
    B, T, H = hidden.shape
    V = weight.shape[0]
    config, dtype = run.config, run.dtype
    old, adv, isw, ref = (to_numpy(t, dtype) for t in (old_logp, advantages, is_weights, ref_logp))
    m = mask_to_numpy(mask, dtype)
    if cu is None:
        counts = torch.from_numpy((m != 0).sum(-1)).to(dtype)
        weights = row_weights(counts, config.agg, config.agg_scale, T).contiguous()  # (B,)
    else:
        live = torch.from_numpy(np.concatenate([[0], np.cumsum(m[0] != 0)]))
        counts = (live[cu[1:]] - live[cu[:-1]]).to(dtype)  # live tokens per sequence
        weights = row_weights(counts, config.agg, config.agg_scale, packed_width(cu)).contiguous()  # (S,)
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros_like(w) if need_w else None
    d_bias = torch.zeros(V, dtype=dtype) if need_b and bias is not None else None
    stats = np.zeros((len(weights), L.POLICY_STATS), dtype=np.float64)
    zero = torch.zeros((), dtype=dtype)
    # A quarter of fused_linear_logprobs' CPU block: the logits block plus the three block-sized
    # temporaries of token_logprobs_fwd/bwd then stay within the unfused op's peak memory.
    chunk_tokens = run.chunk_size or max(1, _cpu_logprobs.default_chunk_rows(V) // 4)
    for rows, cols in _chunks(B, T, chunk_tokens):
        lab = labels[rows, cols].reshape(-1).to(torch.int64)
        keep = (lab != run.ignore_index)[:, None]
        # Masked / ignored positions may hold NaN hidden states (padding): selected away first.
        h = torch.where(keep, hidden[rows, cols].detach().reshape(-1, H).to(dtype), zero)  # (n, H)
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (n, V): the one logits block
        fl = None if floor is None else floor[rows, cols].reshape(-1)  # (n,)
        logp, ent, lse = _cpu_logprobs.token_logprobs_fwd(
            logits, lab, run.temperature, run.ignore_index, len(lab), logit_floor=fl
        )
        block = (rows.stop - rows.start, cols.stop - cols.start)
        sub = [None if a is None else np.ascontiguousarray(a[rows, cols]) for a in (old, adv, m, isw, ref)]
        seqs, local_cu = _chunk_sequences(cu, cols)
        chunk_stats, grad = cpu_policy_fwd(
            logp.reshape(block).numpy(), *sub, ent.reshape(block).numpy(), config=config, write_grad=any_grad,
            cu_seqlens=None if local_cu is None else local_cu.numpy(),
        )  # fmt: skip
        stats[rows if cu is None else seqs] += chunk_stats
        if not any_grad:
            continue
        g_logp, g_ent = scale_rows(
            "cpu", torch.from_numpy(grad), torch.from_numpy(sub[2]), weights[rows if cu is None else seqs],
            dtype, entropy_coef=config.entropy_coef, entropy_dtype=dtype, cu_seqlens=local_cu,
        )  # fmt: skip
        dz = _cpu_logprobs.token_logprobs_bwd(
            logits, lab, lse, ent, g_logp.reshape(-1), g_ent.reshape(-1), run.temperature, run.ignore_index,
            out=logits, chunk_rows=len(lab), logit_floor=fl,
        )  # d logits, in place of the logits block  # fmt: skip
        if d_hidden is not None:
            d_hidden[rows, cols] = (dz @ w).reshape(*block, H).to(hidden.dtype)
        if d_weight is not None:
            d_weight.addmm_(dz.T, h)
        if d_bias is not None:
            d_bias += dz.sum(dim=0)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return torch.from_numpy(stats).to(dtype), d_hidden, d_weight, d_bias


def _two_phase(
    hidden, weight, bias, labels, floor, old_logp, advantages, mask, is_weights, ref_logp, cu, run, needs
):
    """Log-probs of every token (fused, logits never stored), the fused PPO pass on them, then the
    fused log-prob backward with the PPO gradients: (stats (rows, POLICY_STATS), d hidden, d weight,
    d bias). ``floor``: None or (B, T); ``cu``: packed sequence offsets or None."""
    B, T, H = hidden.shape
    flat = hidden.detach().reshape(B * T, H)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    w = weight.detach() if weight.stride(-1) == 1 else weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    lab = labels.reshape(-1).to(torch.int64).contiguous()
    fl = None if floor is None else floor.reshape(-1)
    temperature, ignore_index, chunk = run.temperature, run.ignore_index, run.chunk_size
    triton_lp = run.impl == "triton" and hidden.dtype != torch.float64
    if triton_lp:
        from ..kernels import fused_logprobs as _fused_kernels

        logp, ent, lse = _fused_kernels.fused_linear_logprobs_fwd(
            flat, w, b, lab, temperature, ignore_index, logit_floor=fl
        )
    else:
        logp, ent, lse = _cpu_logprobs.fused_linear_logprobs_fwd(
            flat, w, b, lab, temperature, ignore_index, chunk, logit_floor=fl
        )
    logp2, ent2 = logp.view(B, T), ent.view(B, T)
    stats, grad = policy_stats(
        run.impl, logp2, ent2, old_logp, advantages, mask, is_weights, ref_logp, run.config, run.dtype,
        write_grad=any(needs), cu_seqlens=cu,
    )  # fmt: skip
    if not any(needs):
        return stats, None, None, None
    width = T if cu is None else packed_width(cu)
    weights = row_weights(stats[:, L.POLICY_COUNT], run.config.agg, run.config.agg_scale, width)
    g_logp, g_ent = scale_rows(
        run.impl, grad, mask, weights, logp.dtype, entropy_coef=run.config.entropy_coef,
        entropy_dtype=ent.dtype, cu_seqlens=cu,
    )  # fmt: skip
    backward = (
        _fused_kernels.fused_linear_logprobs_bwd if triton_lp else _cpu_logprobs.fused_linear_logprobs_bwd
    )
    d_flat, d_weight, d_bias = backward(
        flat,
        w,
        b,
        lab,
        lse,
        ent,
        g_logp.reshape(-1),
        g_ent.reshape(-1),
        temperature,
        ignore_index,
        needs,
        chunk,
        logit_floor=fl,
    )
    d_hidden = None if d_flat is None else d_flat.reshape(hidden.shape)
    return stats, d_hidden, d_weight, d_bias


@dataclass(frozen=True)
class _Run:
    """What one call runs with, besides the tensors: the loss options and the log-prob options."""

    config: PolicyLossConfig
    temperature: float
    ignore_index: int
    chunk_size: int | None
    impl: str
    dtype: torch.dtype


class _FusedLinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, floor, old_logp, advantages, mask, is_weights, ref_logp, cu, run
    ):
        # floor: None or (B, T) in the compute dtype, -inf where masked; cu: packed offsets or None.
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        single_pass = run.impl == "cpu" and not run.config.sequence_ratio and hidden.device.type == "cpu"
        compute = _single_pass_cpu if single_pass else _two_phase
        stats, d_hidden, d_weight, d_bias = compute(
            hidden, weight, bias, labels, floor, old_logp, advantages, mask, is_weights, ref_logp, cu, run,
            needs,
        )  # fmt: skip
        stats = stats.to(device=hidden.device)
        width = hidden.shape[1] if cu is None else packed_width(cu)
        loss, metrics, _ = policy_loss_and_metrics(stats, run.config, width, with_kl=True, with_entropy=True)
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.used = False
        values = tuple(metrics[k].to(run.dtype) for k in METRIC_KEYS)
        ctx.mark_non_differentiable(*values)
        return (loss.to(run.dtype), *values)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        if ctx.used:
            raise RuntimeError(
                "fused_linear_ppo_loss computes its gradients in forward and scales them in place: "
                "its graph can be back-propagated only once"
            )
        ctx.used = True
        grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = (None, None, None)
        return (*grads, None, None, None, None, None, None, None, None, None)


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
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
    logit_floor: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO actor loss straight from the last hidden states; the (B, T, V) logits never exist.

    Equals ``ppo_policy_loss(logp, old_logp, advantages, mask, entropy=H, ...)`` with
    ``logp, H = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
    ignore_index=ignore_index, logit_floor=logit_floor, return_entropy=True)``; the loss options
    (``config`` and the keywords that override its fields) and ``cu_seqlens`` are those of
    :func:`alignkit.ppo_policy_loss`.

    Args:
        hidden: (B, T, H) float tensor; weight: (V, H) lm_head weight (hidden's dtype);
            bias: optional (V,).
        labels: (B, T) integer token ids; ``ignore_index`` positions give logp = H = 0.
        old_logp, advantages, mask (and is_weights, ref_logp): (B, T). Positions with mask 0 are
            treated as ignored: their hidden states (padding, possibly NaN) never enter a product.
        logit_floor: optional (B, T) float tensor, the rollout's per-position floor
            (docs/formulas.md, "Truncated sampling and the logit floor"): vocabulary entries with
            ``z = logits / temperature`` below it leave the normaliser and the entropy (which is
            that of the truncated distribution) and get no gradient; -inf drops nothing; None: no
            truncation. Read only where the mask is 1 (NaN elsewhere is ignored); not differentiable.
        cu_seqlens: optional offsets of sequences packed in (1, N) inputs (hidden (1, N, H)), as in
            :func:`alignkit.ppo_policy_loss`: every sequence is a row of the aggregation and of GSPO.
        chunk_size: tokens per logits block (default on CPU: an 8 MiB fp32 block, a quarter of
            fused_linear_logprobs' block, which keeps the peak below the unfused pair's; on GPU the
            Triton backward's own default).

    Gradients flow to hidden, weight and bias; they are computed in forward, so ``backward``
    may run once. Returns ``(loss, metrics)`` as ppo_policy_loss, with ``entropy`` (the aggregated
    entropy of the policy) always present.
    """
    options = dict(zip(FIELDS, (clip_low, clip_high, dual_clip, agg, agg_scale, loss_type, kl_coef,
                                kl_estimator, entropy_coef), strict=True))  # fmt: skip
    config = resolve_config(config, options)
    hidden = _checks.float_tensor(hidden, "hidden", ndim=3)
    weight, bias = validate_lm_head(hidden, weight, bias)
    labels = validate_labels(labels, hidden.shape[:2], "(B, T) of hidden", hidden)
    ignore_index = _checks.ignore_index(ignore_index)
    validate_label_range(labels, weight.shape[0], ignore_index, None)
    old_logp = _checks.float_like(old_logp, "old_logp", labels, "labels")
    advantages = _checks.float_like(advantages, "advantages", labels, "labels")
    mask = _checks.mask(mask, "mask", labels, "labels")
    if is_weights is not None:
        is_weights = _checks.float_like(is_weights, "is_weights", labels, "labels")
    if ref_logp is not None:
        ref_logp = _checks.float_like(ref_logp, "ref_logp", labels, "labels")
    config.check_inputs(has_ref=ref_logp is not None, has_entropy=True)
    floor = validate_logit_floor(logit_floor, labels, _checks.accumulation_dtype(hidden))
    cu = packed_offsets(cu_seqlens, hidden, "hidden")
    run = _Run(
        config=config,
        temperature=_checks.positive(temperature, "temperature"),
        ignore_index=ignore_index,
        chunk_size=_checks.chunk_size(chunk_size),
        impl=_backend.resolve(backend, hidden.device),
        dtype=_checks.accumulation_dtype(hidden, old_logp, advantages, is_weights, ref_logp),
    )
    labels = labels.masked_fill(mask == 0, ignore_index)  # masked positions are not scored at all
    if floor is not None:  # a masked position's floor (garbage, NaN) is never read: -inf there
        floor = torch.where(labels.reshape(-1) != ignore_index, floor, -torch.inf).view(labels.shape)
    loss, *values = _FusedLinearPPOLoss.apply(
        hidden, weight, bias, labels, floor, old_logp, advantages, mask, is_weights, ref_logp, cu, run
    )
    return loss, select_metrics(values, with_kl=ref_logp is not None, with_entropy=True)
