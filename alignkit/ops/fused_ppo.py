"""From the policy's last hidden states to the PPO actor loss in one chunked pass, logits never
held whole: ``fused_linear_ppo_loss``.

Math: ``logits = hidden @ weight.T (+ bias)``, ``z = logits / temperature``,
``logp = z[label] - logsumexp(z)``, ``H = logsumexp(z) - sum softmax(z) z`` (alignkit.ops.logprobs),
then the loss of :func:`alignkit.ppo_policy_loss` with ``entropy = H``. It equals
``ppo_policy_loss(*fused_linear_logprobs(..., return_entropy=True))`` in value and gradients.

The loss is terminal, so its gradients for hidden / weight / bias are computed during the
forward, chunk by chunk, and handed out by backward scaled by ``grad_output`` (in place: the graph
can be back-propagated once). The aggregation normalisers (global token count, per-row counts)
come from the mask before the chunk loop, so every per-token gradient is final when its chunk is
processed. Two schedules:

* single pass (CPU, token-level ratio): per chunk of tokens, logits = one matmul, log-prob and
  entropy, the loss terms and their gradients (alignkit/cpu/losses.py on the chunk), d logits in
  place, then d hidden = dz @ W and d weight += dz^T h. Three matmuls per chunk; peak memory about
  one (chunk, V) logits block plus the gradients.
* two phases (Triton, and GSPO whose per-row ratio needs the whole row's log-probs first):
  kernels/logprobs.py's fused forward (logits tiles folded into online statistics in registers,
  never stored) for every token, the fused PPO kernels on the (B, T) log-probs, then the fused
  backward, which recomputes logits tiles chunk by chunk. Peak memory is that of
  ``fused_linear_logprobs`` plus B x T-sized vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _checks
from .. import backend as _backend
from ..cpu import logprobs as _cpu_logprobs
from ..cpu import losses as _cpu_losses
from . import logprobs as _logprobs
from . import losses as _losses

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


def _single_pass_cpu(
    hidden, weight, bias, labels, old_logp, advantages, mask, is_weights, ref_logp, cfg, needs
):
    """Token-level ratio on the CPU implementation: returns (stats (B, 8), d hidden, d weight, d bias)."""
    B, T, H = hidden.shape
    V = weight.shape[0]
    dtype = cfg["dtype"]
    temperature, ignore_index = cfg["temperature"], cfg["ignore_index"]
    np_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    old, adv, isw, ref = (_losses._numpy(t, np_dtype) for t in (old_logp, advantages, is_weights, ref_logp))
    m = _losses._mask_numpy(mask, np_dtype)
    counts = torch.from_numpy((m != 0).sum(-1)).to(dtype)
    row_weight = _losses._row_scale(counts, cfg["agg"], cfg["agg_scale"], T).contiguous()  # (B,)
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    need_h, need_w, need_b = needs
    any_grad = need_h or need_w or need_b
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros_like(w) if need_w else None
    d_bias = torch.zeros(V, dtype=dtype) if need_b and bias is not None else None
    stats = np.zeros((B, _cpu_losses.POLICY_STATS), dtype=np.float64)
    # A quarter of fused_linear_logprobs' CPU block: the logits block plus the three block-sized
    # temporaries of token_logprobs_fwd/bwd then stay within the unfused op's peak memory.
    chunk_tokens = cfg["chunk_size"] or max(1, _cpu_logprobs.default_chunk_rows(V) // 4)
    for rows, cols in _chunks(B, T, chunk_tokens):
        h = hidden[rows, cols].detach().reshape(-1, H).to(dtype)  # (n, H)
        lab = labels[rows, cols].reshape(-1).to(torch.int64)
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (n, V): the one logits block
        logp, ent, lse = _cpu_logprobs.token_logprobs_fwd(logits, lab, temperature, ignore_index, len(lab))
        block = (rows.stop - rows.start, cols.stop - cols.start)
        sub = [None if a is None else np.ascontiguousarray(a[rows, cols]) for a in (old, adv, m, isw, ref)]
        chunk_stats, _, grad = _cpu_losses.policy_fwd(
            logp.reshape(block).numpy(), *sub, ent.reshape(block).numpy(), False,
            cfg["clip_low"], cfg["clip_high"], cfg["dual_clip"], cfg["kl_code"], cfg["kl_coef"], any_grad,
        )  # fmt: skip
        stats[rows] += chunk_stats
        if not any_grad:
            continue
        g_logp, g_ent = _losses._scale_rows(
            "cpu", torch.from_numpy(grad), torch.from_numpy(sub[2]), row_weight[rows], dtype,
            cfg["entropy_coef"], dtype,
        )  # fmt: skip
        g_logp, g_ent = g_logp.reshape(-1), g_ent.reshape(-1)
        dz = _cpu_logprobs.token_logprobs_bwd(
            logits, lab, lse, ent, g_logp, g_ent, temperature, ignore_index, out=logits, chunk_rows=len(lab)
        )  # d logits, in place of the logits block
        if d_hidden is not None:
            d_hidden[rows, cols] = (dz @ w).reshape(*block, H).to(hidden.dtype)
        if d_weight is not None:
            d_weight.addmm_(dz.T, h)
        if d_bias is not None:
            d_bias += dz.sum(dim=0)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return torch.from_numpy(stats).to(dtype), d_hidden, d_weight, d_bias


def _two_phase(hidden, weight, bias, labels, old_logp, advantages, mask, is_weights, ref_logp, cfg, needs):
    """Log-probs of every token (fused, logits never stored), the fused PPO pass on them, then the
    fused log-prob backward with the PPO gradients: (stats (B, 8), d hidden, d weight, d bias)."""
    B, T, H = hidden.shape
    flat = hidden.detach().reshape(B * T, H)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    w = weight.detach() if weight.stride(-1) == 1 else weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    lab = labels.reshape(-1).to(torch.int64).contiguous()
    temperature, ignore_index, chunk = cfg["temperature"], cfg["ignore_index"], cfg["chunk_size"]
    triton_lp = cfg["impl"] == "triton" and hidden.dtype != torch.float64
    if triton_lp:
        from ..kernels import logprobs as _kernels_logprobs

        logp, ent, lse = _kernels_logprobs.fused_linear_logprobs_fwd(
            flat, w, b, lab, temperature, ignore_index
        )
    else:
        logp, ent, lse = _cpu_logprobs.fused_linear_logprobs_fwd(
            flat, w, b, lab, temperature, ignore_index, chunk
        )
    logp2, ent2 = logp.view(B, T), ent.view(B, T)
    stats, grad = _losses._policy_stats(
        cfg["impl"], logp2, ent2, old_logp, advantages, mask, is_weights, ref_logp, cfg, write_grad=any(needs)
    )
    if not any(needs):
        return stats, None, None, None
    row_scale = _losses._row_scale(stats[:, _losses._COUNT], cfg["agg"], cfg["agg_scale"], T)
    g_logp, g_ent = _losses._scale_rows(
        cfg["impl"], grad, mask, row_scale, logp.dtype, cfg["entropy_coef"], ent.dtype
    )
    g_logp, g_ent = g_logp.reshape(-1), g_ent.reshape(-1)
    if triton_lp:
        keep = lab != ignore_index  # the Triton backward expects zero upstream grads on ignored rows
        g_logp = torch.where(keep, g_logp, 0.0).contiguous()
        g_ent = torch.where(keep, g_ent, 0.0).contiguous()
        d_flat, d_weight, d_bias = _kernels_logprobs.fused_linear_logprobs_bwd(
            flat, w, b, lab, lse, ent, g_logp, g_ent, temperature, needs, chunk
        )
    else:
        d_flat, d_weight, d_bias = _cpu_logprobs.fused_linear_logprobs_bwd(
            flat, w, b, lab, lse, ent, g_logp, g_ent, temperature, ignore_index, needs, chunk
        )
    d_hidden = None if d_flat is None else d_flat.reshape(hidden.shape)
    return stats, d_hidden, d_weight, d_bias


class _FusedLinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old_logp, advantages, mask, is_weights, ref_logp, cfg):
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        single_pass = cfg["impl"] == "cpu" and cfg["ratio_level"] == "token" and hidden.device.type == "cpu"
        run = _single_pass_cpu if single_pass else _two_phase
        stats, d_hidden, d_weight, d_bias = run(
            hidden, weight, bias, labels, old_logp, advantages, mask, is_weights, ref_logp, cfg, needs
        )
        stats = stats.to(device=hidden.device)
        loss, metrics, _ = _losses._policy_combine(stats, cfg, hidden.shape[1])
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.used = False
        metrics = tuple(t.to(cfg["dtype"]) for t in metrics)
        ctx.mark_non_differentiable(*metrics)
        return (loss.to(cfg["dtype"]), *metrics)

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
        return (*grads, None, None, None, None, None, None, None)


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
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    agg_scale: float | None = None,
    ratio_level: str = "token",
    is_weights: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO actor loss straight from the last hidden states; the (B, T, V) logits never exist.

    Equals ``ppo_policy_loss(logp, old_logp, advantages, mask, entropy=H, ...)`` with
    ``logp, H = fused_linear_logprobs(hidden, weight, labels, bias, temperature, ignore_index,
    return_entropy=True)``; see :func:`alignkit.ppo_policy_loss` for the loss options.

    Args:
        hidden: (B, T, H) float tensor; weight: (V, H) lm_head weight (hidden's dtype);
            bias: optional (V,).
        labels: (B, T) integer token ids; ``ignore_index`` positions give logp = H = 0.
        old_logp, advantages, mask (and is_weights, ref_logp): (B, T).
        chunk_size: tokens per logits block (default on CPU: an 8 MiB fp32 block, a quarter of
            fused_linear_logprobs' block, which keeps the peak below the unfused pair's; on GPU the
            Triton backward's own default).

    Gradients flow to hidden, weight and bias; they are computed in forward, so ``backward``
    may run once. Returns ``(loss, metrics)`` as ppo_policy_loss, with ``entropy`` (the aggregated
    entropy of the policy) always present.
    """
    hidden = _checks.float_tensor(hidden, "hidden", ndim=3)
    weight, bias = _logprobs._check_lm_head(hidden, weight, bias)
    labels = _logprobs._check_labels(labels, hidden.shape[:2], "(B, T) of hidden", hidden)
    ignore_index = _logprobs._ignore_index(ignore_index)
    _logprobs._label_range(labels, weight.shape[0], ignore_index, None)
    old_logp = _losses._like(old_logp, "old_logp", labels, "labels")
    advantages = _losses._like(advantages, "advantages", labels, "labels")
    mask = _checks.mask(mask, "mask", labels, "labels")
    if is_weights is not None:
        is_weights = _losses._like(is_weights, "is_weights", labels, "labels")
    if ref_logp is not None:
        ref_logp = _losses._like(ref_logp, "ref_logp", labels, "labels")
    _logprobs._check_chunk_size(chunk_size)
    cfg = _losses._policy_config(
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, agg_scale=agg_scale,
        ratio_level=ratio_level, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
        has_ref=ref_logp is not None, has_entropy=True,
    )  # fmt: skip
    cfg.update(
        temperature=_checks.positive(temperature, "temperature"),
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        impl=_backend.resolve(backend, hidden.device),
        dtype=_checks.accumulation_dtype(hidden, old_logp, advantages, is_weights, ref_logp),
    )
    loss, *metrics = _FusedLinearPPOLoss.apply(
        hidden, weight, bias, labels, old_logp, advantages, mask, is_weights, ref_logp, cfg
    )
    return loss, _losses._metrics_dict(metrics, ref_logp is not None, True)
