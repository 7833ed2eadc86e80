"""Plain-torch twins of the numba loss passes (alignkit/cpu/losses.py), for small CPU batches
(why and when: alignkit/cpu/__init__.py).

The same contract and the same per-token math (read that module's comments for the formulas): per
row, the statistics of alignkit.loss_layout as float64 sums of the per-token values, and the
per-token gradient of the row sums in the inputs' dtype. Masked positions are selected away (NaN in
padding does not leak), clamps propagate NaN and gate the gradient as ``torch.clamp`` does, ties
are not clipped.
"""

from __future__ import annotations

import torch

from .. import loss_layout as L


def _segments(cu_seqlens: torch.Tensor | None, shape: torch.Size):
    """(row sum function, per-row -> per-token broadcast) for a (B, T) batch or a packed (1, N) one."""
    if cu_seqlens is None:
        return (lambda x: x.sum(-1)), (lambda v: v[:, None])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths, output_size=shape[1])  # (N,)

    def row_sum(x):  # (1, N) -> (S,)
        return torch.zeros(len(lengths), dtype=x.dtype).index_add_(0, seq, x[0])

    return row_sum, (lambda v: v[seq][None, :])


def policy_fwd(
    logp, old, adv, mask, isw, ref, ent, *, config, write_grad: bool, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tensors of one float dtype (mask any dtype) -> (stats (rows, POLICY_STATS) float64, per-token
    gradient of the row sums w.r.t. logp or None); as :func:`alignkit.cpu.losses.policy_fwd`."""
    ft = logp.dtype
    row_sum, per_token = _segments(cu_seqlens, logp.shape)
    live = mask != 0
    counts = row_sum(live.double())
    zero = torch.zeros((), dtype=ft)
    one = torch.ones((), dtype=ft)

    def total(x):  # float64 row sums over the live tokens
        return row_sum(torch.where(live, x, zero).double())

    lo, hi = torch.tensor(1.0 - config.clip_low, dtype=ft), torch.tensor(1.0 + config.clip_high, dtype=ft)
    diff = logp - old
    lr = diff.clamp(-20.0, 20.0)
    if config.loss_code == L.LOSS_CODES["gspo"]:
        d = (logp.double() - old.double()).clamp(-20.0, 20.0)
        s = total(d) / counts.clamp(min=1.0)
        seq_ratio = s.clamp(max=10.0).exp().to(ft)
        ratio = per_token(seq_ratio).expand_as(logp)
        dratio = per_token(torch.where(s <= 10.0, seq_ratio, zero)).expand_as(logp)
    else:
        ratio = lr.exp()
        dratio = torch.where((diff >= -20.0) & (diff <= 20.0), ratio, zero)
    clamped = torch.minimum(torch.maximum(ratio, lo), hi)  # NaN stays NaN
    lower = torch.zeros_like(live)
    if config.loss_code == L.LOSS_CODES["cispo"]:
        clipped = (ratio > hi) | (ratio < lo)
        g = -adv * clamped
        loss = g * logp
    else:
        l1, l2 = -adv * ratio, -adv * clamped
        clipped = l2 > l1
        loss = torch.where(clipped, l2, l1)
        dual = config.active_dual_clip
        if dual is not None:
            l3 = -adv * torch.tensor(dual, dtype=ft)
            lower = (adv < 0) & (loss > l3)
            loss = torch.where(lower, l3, loss)
        g = torch.where(clipped | lower, zero, -adv * dratio)
    if isw is not None:
        loss, g = loss * isw, g * isw
    stats = torch.zeros(counts.shape[0], L.POLICY_STATS, dtype=torch.float64)
    if ref is not None:
        d = logp - ref
        kl_code = config.kl_code
        if kl_code == L.KL_CODES["k1"]:
            kl, dkl = d, one.expand_as(d)
        elif kl_code == L.KL_CODES["abs"]:
            kl, dkl = d.abs(), torch.where(d > 0, one, torch.where(d < 0, -one, zero))
        elif kl_code == L.KL_CODES["k2"]:
            kl, dkl = 0.5 * d * d, d
        else:  # k3: x = clamp(-d, -20, 20); clamp(exp(x) - 1 - x, -10, 10); d/dd = 1 - exp(x)
            x = (-d).clamp(-20.0, 20.0)
            em1 = torch.expm1(x)
            y = em1 - x
            inside = (-d >= -20.0) & (-d <= 20.0) & (y <= 10.0)
            kl, dkl = y.clamp(-10.0, 10.0), torch.where(inside, -em1, zero)
        stats[:, L.POLICY_KL] = total(kl)
        g = g + torch.tensor(config.kl_coef, dtype=ft) * dkl
    if ent is not None:
        stats[:, L.POLICY_ENTROPY] = total(ent)
    stats[:, L.POLICY_COUNT] = counts
    stats[:, L.POLICY_LOSS] = total(loss)
    stats[:, L.POLICY_NEG_LOGRATIO] = total(-lr)
    stats[:, L.POLICY_CLIP] = row_sum((live & clipped).double())
    stats[:, L.POLICY_CLIP_LOWER] = row_sum((live & lower).double())
    stats[:, L.POLICY_BAD_MASK] = row_sum((live & (mask != 1)).double())
    return stats, (torch.where(live, g, zero) if write_grad else None)


def value_fwd(
    values, old, ret, mask, *, clip: float, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) tensors -> (stats (B, VALUE_STATS) float64, per-token gradient or None), in float64
    math as :func:`alignkit.cpu.losses.value_fwd`."""
    live = mask != 0
    v, o, r = values.double(), old.double(), ret.double()
    delta = v - o
    vclip = torch.where(delta.abs() <= clip, v, o + delta.clamp(-clip, clip))  # inside: v itself
    e1, e2 = (v - r) ** 2, (vclip - r) ** 2
    clipped = e2 > e1
    zero = torch.zeros((), dtype=torch.float64)
    stats = torch.zeros(values.shape[0], L.VALUE_STATS, dtype=torch.float64)
    stats[:, L.VALUE_COUNT] = live.double().sum(-1)
    stats[:, L.VALUE_LOSS] = torch.where(live, torch.where(clipped, e2, e1), zero).sum(-1)
    stats[:, L.VALUE_CLIP] = (live & clipped).double().sum(-1)
    stats[:, L.VALUE_BAD_MASK] = (live & (mask != 1)).double().sum(-1)
    grad = torch.where(clipped | ~live, zero, 2.0 * (v - r)).to(values.dtype) if write_grad else None
    return stats, grad
