"""Triton kernels for the PPO losses: the policy loss of every ``loss_type`` (ppo_clip, gspo, cispo;
+ KL, entropy) and the clipped value loss.

Formulas: docs/formulas.md ("KL estimators", "Clipped policy loss", "CISPO", "Value loss").
Layout: every input is a contiguous (B, T) tensor; the grid is (B, cdiv(T, BLOCK_T)), one
program per tile of one row. Packed inputs (``PACKED``: one (1, N) row holding S sequences end to
end, ``cu_seqlens`` (S + 1,) their offsets) use the same kernels with one "row" per sequence: the
grid is (S, cdiv(longest, BLOCK_T)) and row ``b`` covers ``[cu[b], cu[b + 1])`` (``_row_span``).

* GSPO (``loss_type="gspo"``) first runs ``_seq_logratio_kernel`` (reads logp, old_logp and the
  mask once more) for the per-row mean log-ratio the per-token ratio needs.
* Forward reads each input once and writes, per (row, tile), the partial sums the host needs for
  any aggregation mode (the row's token count is one of them, so the per-row normalisers of
  seq-mean-token-mean are available without another pass). The host sums the tiles, scales rows,
  and adds rows up: B-sized work.
* Every aggregation mode is linear in the per-row sums, ``loss = sum_b c_b sum_t m_t L_t``, with
  ``c_b`` known only once the counts are. So the forward also writes the per-token gradient of the
  row sum (``is_w dL/dlogp + kl_coef dKL/dlogp``; ``d max(e1, e2)/dv``), one (B, T) buffer when
  grad is needed, and the backward is one pass scaling it by ``row_weight[b] = grad_output * c_b``
  (d entropy is ``-entropy_coef * row_weight[b] * m``). Traffic for policy forward + backward with
  KL and entropy: 6 reads + 1 write, then 2 reads + 2 writes (recomputing would re-read 5 inputs).

Ties are not clipped: a token counts as clipped only when ``L2 > L1`` (resp. ``Lc > L3``) holds
strictly, the same predicate as the clip-fraction metrics; at a tie the gradient is the unclipped
one. Masked positions are selected away with ``where`` (never multiplied), so NaN/inf in padding
cannot leak into the loss or the gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import loss_layout as L
from . import device_guard, mask_view, triton_dtype
from .scalars import join_float, split_float

MAX_BLOCK_T = 1024

# Columns of the per-row statistics (declared once, in alignkit/loss_layout.py).
_P_COUNT = tl.constexpr(L.POLICY_COUNT)
_P_LOSS = tl.constexpr(L.POLICY_LOSS)
_P_ENTROPY = tl.constexpr(L.POLICY_ENTROPY)
_P_KL = tl.constexpr(L.POLICY_KL)
_P_CLIP = tl.constexpr(L.POLICY_CLIP)
_P_CLIP_LOWER = tl.constexpr(L.POLICY_CLIP_LOWER)
_P_NEG_LOGRATIO = tl.constexpr(L.POLICY_NEG_LOGRATIO)
_P_BAD_MASK = tl.constexpr(L.POLICY_BAD_MASK)
_P_STATS = tl.constexpr(L.POLICY_STATS)
_V_COUNT = tl.constexpr(L.VALUE_COUNT)
_V_LOSS = tl.constexpr(L.VALUE_LOSS)
_V_CLIP = tl.constexpr(L.VALUE_CLIP)
_V_BAD_MASK = tl.constexpr(L.VALUE_BAD_MASK)
_V_STATS = tl.constexpr(L.VALUE_STATS)
# The estimator codes KL_EST branches on.
_K1 = tl.constexpr(L.KL_CODES["k1"])
_ABS = tl.constexpr(L.KL_CODES["abs"])
_K2 = tl.constexpr(L.KL_CODES["k2"])
# The loss-type codes LOSS_TYPE branches on.
_GSPO = tl.constexpr(L.LOSS_CODES["gspo"])
_CISPO = tl.constexpr(L.LOSS_CODES["cispo"])


@triton.jit
def _row_span(cu_ptr, row, T, PACKED: tl.constexpr):
    # (offset of the row's first token, its length): padded rows are T apart; a packed row is the
    # sequence [cu[row], cu[row + 1]) of the one (1, N) row (T is then the longest sequence).
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        return start, tl.load(cu_ptr + row + 1).to(tl.int64) - start
    else:
        return row * T, row * 0 + T  # int64 even when T is specialised to a constant


@triton.jit
def _clamp_keep_nan(x, lo, hi):
    # clamp(x, lo, hi) that keeps NaN (tl.minimum/maximum may drop it: divergence must stay visible).
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


# Series in nested (Horner) form with integer divisors only: every constant is exact in fp32 and
# fp64 alike (a literal such as 1/14! would be rounded to fp32 before meeting an fp64 tensor).


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation: x (1 + x/2 (1 + x/3 (... (1 + x/13)))) for |x| < 0.5, else direct.
    p = 1.0 + x / 13
    p = 1.0 + x * p / 12
    p = 1.0 + x * p / 11
    p = 1.0 + x * p / 10
    p = 1.0 + x * p / 9
    p = 1.0 + x * p / 8
    p = 1.0 + x * p / 7
    p = 1.0 + x * p / 6
    p = 1.0 + x * p / 5
    p = 1.0 + x * p / 4
    p = 1.0 + x * p / 3
    p = 1.0 + x * p / 2
    return tl.where(tl.abs(x) < 0.5, x * p, tl.exp(x) - 1.0)


@triton.jit
def _exp_minus_1_minus_x(x):
    # exp(x) - 1 - x without cancellation: x^2/2 (1 + x/3 (1 + x/4 (... (1 + x/16)))) for |x| < 1.
    p = 1.0 + x / 16
    p = 1.0 + x * p / 15
    p = 1.0 + x * p / 14
    p = 1.0 + x * p / 13
    p = 1.0 + x * p / 12
    p = 1.0 + x * p / 11
    p = 1.0 + x * p / 10
    p = 1.0 + x * p / 9
    p = 1.0 + x * p / 8
    p = 1.0 + x * p / 7
    p = 1.0 + x * p / 6
    p = 1.0 + x * p / 5
    p = 1.0 + x * p / 4
    p = 1.0 + x * p / 3
    return tl.where(tl.abs(x) < 1.0, 0.5 * x * x * p, tl.exp(x) - 1.0 - x)


@triton.jit
def _kl_value_and_grad(d, KL_EST: tl.constexpr):
    # d = logp - ref_logp. k1: d; abs: |d|; k2: d^2 / 2;
    # k3: x = clamp(-d, -20, 20), clamp(exp(x) - x - 1, -10, 10), d/dd = -(exp(x) - 1) inside
    # both clamps (torch.clamp passes the gradient at equality).
    if KL_EST == _K1:
        kl = d
        dkl = tl.full(d.shape, 1.0, d.dtype)
    elif KL_EST == _ABS:
        kl = tl.abs(d)
        dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)
    elif KL_EST == _K2:
        kl = 0.5 * d * d
        dkl = d
    else:
        x = _clamp_keep_nan(-d, -20.0, 20.0)
        y = _exp_minus_1_minus_x(x)
        kl = _clamp_keep_nan(y, -10.0, 10.0)
        inside = (-d >= -20.0) & (-d <= 20.0) & (y <= 10.0)
        dkl = tl.where(inside, -_expm1(x), 0.0).to(d.dtype)
    return kl, dkl


@triton.jit
def _policy_token(
    logp,
    old,
    adv,
    seq_lr,
    lo,
    hi,
    dual,
    HAS_DUAL: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
):
    # lr = clamp(logp - old, -20, 20); ratio = exp(lr)  (GSPO: exp(min(s_row, 10)))
    # ppo_clip / gspo: L1 = -A ratio; L2 = -A clamp(ratio, 1 - clip_low, 1 + clip_high);
    #   Lc = max(L1, L2); dual clip (ppo_clip only): L3 = -A dual_clip where A < 0 and Lc > L3.
    # cispo: w = stopgrad(clamp(ratio, 1 - clip_low, 1 + clip_high)); L = -w A logp; dL/dlogp = -w A;
    #   clipped where ratio is outside [lo, hi] (a ratio on a bound is not).
    # Returns the loss, the clip predicates, -lr, and d L / d logp (before IS weights).
    diff = logp - old
    lr = _clamp_keep_nan(diff, -20.0, 20.0)
    if LOSS_TYPE == _GSPO:
        # min(s, 10) as a select: tl.minimum may turn a NaN s (corrupt live data) into 10.
        ratio = tl.exp(tl.where(seq_lr > 10.0, 10.0, seq_lr)) + tl.zeros_like(logp)
        dratio = tl.where(seq_lr <= 10.0, ratio, 0.0)
    else:
        ratio = tl.exp(lr)
        dratio = tl.where((diff >= -20.0) & (diff <= 20.0), ratio, 0.0)
    lower = tl.zeros(logp.shape, tl.int1)
    if LOSS_TYPE == _CISPO:
        w = _clamp_keep_nan(ratio, lo, hi)  # NaN stays: a NaN old_logp must not turn into a bound
        clipped = (ratio > hi) | (ratio < lo)
        dloss = -adv * w
        loss = dloss * logp
    else:
        l1 = -adv * ratio
        l2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        clipped = l2 > l1
        loss = tl.where(clipped, l2, l1)
        if HAS_DUAL:
            l3 = -adv * dual
            lower = (adv < 0) & (loss > l3)
            loss = tl.where(lower, l3, loss)
            dloss = tl.where(clipped | lower, 0.0, -adv * dratio)
        else:
            dloss = tl.where(clipped, 0.0, -adv * dratio)
    return loss, clipped, lower, -lr, dloss


@triton.jit
def _seq_logratio_kernel(
    logp_ptr,
    old_ptr,
    mask_ptr,
    partial_ptr,  # (B, T) x3; (B, NT, 2)
    cu_ptr,  # (B + 1,) int64 sequence offsets, read only when PACKED
    T,
    NT,
    PACKED: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # GSPO pre-pass: per tile, sum_t m clamp(logp - old, -20, 20) and sum_t m.
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    base, length = _row_span(cu_ptr, row, T, PACKED)
    in_row = offs_t < length
    m = tl.load(mask_ptr + base + offs_t, mask=in_row, other=0).to(DTYPE)
    active = in_row & (m != 0)
    logp = tl.load(logp_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    old = tl.load(old_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    lr = _clamp_keep_nan(logp - old, -20.0, 20.0)
    out = partial_ptr + (row * NT + tile) * 2
    tl.store(out, tl.sum(tl.where(active, lr, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(active, 1.0, 0.0).to(DTYPE), axis=0))


@triton.jit
def _ppo_policy_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,  # (B, T)
    isw_ptr,
    ref_ptr,
    ent_ptr,  # (B, T) each, read only when HAS_IS / HAS_REF / HAS_ENT
    seq_lr_ptr,  # (B,) GSPO sequence log-ratio, read only when LOSS_TYPE is gspo
    partial_ptr,  # (B, NT, POLICY_STATS)
    grad_ptr,  # (B, T) out, written when WRITE_GRAD: is_w dL/dlogp + kl_coef dKL/dlogp (0 where masked)
    cu_ptr,  # (B + 1,) int64 sequence offsets, read only when PACKED
    T,
    NT,
    # 1 - clip_low, 1 + clip_high, dual_clip, kl_coef: three fp32 pieces each (scalars.split_float)
    lo_0,
    lo_1,
    lo_2,
    hi_0,
    hi_1,
    hi_2,
    dual_0,
    dual_1,
    dual_2,
    kl_0,
    kl_1,
    kl_2,
    HAS_IS: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    LOSS_TYPE: tl.constexpr,
    KL_EST: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    PACKED: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    base, length = _row_span(cu_ptr, row, T, PACKED)
    in_row = offs_t < length
    m = tl.load(mask_ptr + base + offs_t, mask=in_row, other=0).to(DTYPE)
    active = in_row & (m != 0)
    logp = tl.load(logp_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    old = tl.load(old_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    adv = tl.load(adv_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    lo = join_float(lo_0, lo_1, lo_2, DTYPE)
    hi = join_float(hi_0, hi_1, hi_2, DTYPE)
    dual = join_float(dual_0, dual_1, dual_2, DTYPE)
    kl_coef = join_float(kl_0, kl_1, kl_2, DTYPE)
    seq_lr = 0.0
    if LOSS_TYPE == _GSPO:
        seq_lr = tl.load(seq_lr_ptr + row).to(DTYPE)
    loss, clipped, lower, neg_lr, grad = _policy_token(
        logp, old, adv, seq_lr, lo, hi, dual, HAS_DUAL, LOSS_TYPE
    )
    if HAS_IS:
        isw = tl.load(isw_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
        loss = loss * isw
        grad = grad * isw
    zero = tl.zeros([BLOCK_T], DTYPE)
    one = zero + 1.0
    out = partial_ptr + (row * NT + tile) * _P_STATS
    tl.store(out + _P_COUNT, tl.sum(tl.where(active, one, zero), axis=0))
    tl.store(out + _P_LOSS, tl.sum(tl.where(active, loss, zero), axis=0))
    if HAS_ENT:
        ent = tl.load(ent_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
        tl.store(out + _P_ENTROPY, tl.sum(tl.where(active, ent, zero), axis=0))
    else:
        tl.store(out + _P_ENTROPY, tl.sum(zero, axis=0))
    if HAS_REF:
        ref = tl.load(ref_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
        kl, dkl = _kl_value_and_grad(logp - ref, KL_EST)
        tl.store(out + _P_KL, tl.sum(tl.where(active, kl, zero), axis=0))
        grad = grad + kl_coef * dkl
    else:
        tl.store(out + _P_KL, tl.sum(zero, axis=0))
    tl.store(out + _P_CLIP, tl.sum(tl.where(active & clipped, one, zero), axis=0))
    tl.store(out + _P_CLIP_LOWER, tl.sum(tl.where(active & lower, one, zero), axis=0))
    tl.store(out + _P_NEG_LOGRATIO, tl.sum(tl.where(active, neg_lr, zero), axis=0))
    tl.store(out + _P_BAD_MASK, tl.sum(tl.where(active & (m != 1.0), one, zero), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + base + offs_t, tl.where(active, grad, zero), mask=in_row)


@triton.jit
def _scale_rows_bwd_kernel(
    grad_ptr,  # (B, T) per-token gradient of the row sums (0 where masked)
    mask_ptr,  # (B, T), read only when HAS_ENT
    row_weight_ptr,  # (B,) grad_output * d loss / d row sum
    dx_ptr,
    dent_ptr,  # (B, T) outputs (dent only when HAS_ENT)
    cu_ptr,  # (B + 1,) int64 sequence offsets, read only when PACKED
    T,
    ent_coef_0,  # entropy_coef as three fp32 pieces (scalars.split_float)
    ent_coef_1,
    ent_coef_2,
    HAS_ENT: tl.constexpr,
    PACKED: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # d x = w_b g;  d H = -entropy_coef w_b m.
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    base, length = _row_span(cu_ptr, row, T, PACKED)
    in_row = offs_t < length
    w = tl.load(row_weight_ptr + row).to(DTYPE)
    g = tl.load(grad_ptr + base + offs_t, mask=in_row, other=0.0).to(DTYPE)
    tl.store(dx_ptr + base + offs_t, w * g, mask=in_row)
    if HAS_ENT:
        m = tl.load(mask_ptr + base + offs_t, mask=in_row, other=0).to(DTYPE)
        ent_coef = join_float(ent_coef_0, ent_coef_1, ent_coef_2, DTYPE)
        dent = tl.where(m != 0, -ent_coef * w, 0.0).to(DTYPE)
        tl.store(dent_ptr + base + offs_t, dent, mask=in_row)


@triton.jit
def _value_fwd_kernel(
    v_ptr,
    old_ptr,
    ret_ptr,
    mask_ptr,  # (B, T)
    partial_ptr,  # (B, NT, VALUE_STATS)
    grad_ptr,  # (B, T) out when WRITE_GRAD: d max(e1, e2) / dv (0 where masked)
    T,
    NT,
    clip_0,  # clip as three fp32 pieces (scalars.split_float)
    clip_1,
    clip_2,
    WRITE_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # vclip = old + clamp(v - old, -clip, clip); per token max(e1, e2), e1 = (v - R)^2,
    # e2 = (vclip - R)^2. Gradient: 2 (v - R) where unclipped; 0 where clipped (e2 > e1 means
    # |v - old| > clip, where the clamp passes no gradient).
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs_t < T
    base = row * T
    m = tl.load(mask_ptr + base + offs_t, mask=in_row, other=0).to(DTYPE)
    active = in_row & (m != 0)
    v = tl.load(v_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    old = tl.load(old_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    ret = tl.load(ret_ptr + base + offs_t, mask=active, other=0.0).to(DTYPE)
    clip = join_float(clip_0, clip_1, clip_2, DTYPE)
    # Inside the clip range vclip is v itself: old + (v - old) would round to a neighbour of v and
    # count a tie as clipped (and drop its gradient).
    delta = v - old
    vclip = tl.where(tl.abs(delta) <= clip, v, old + tl.minimum(tl.maximum(delta, -clip), clip))
    e1 = (v - ret) * (v - ret)
    e2 = (vclip - ret) * (vclip - ret)
    clipped = e2 > e1
    loss = tl.where(clipped, e2, e1)
    zero = tl.zeros([BLOCK_T], DTYPE)
    one = zero + 1.0
    out = partial_ptr + (row * NT + tile) * _V_STATS
    tl.store(out + _V_COUNT, tl.sum(tl.where(active, one, zero), axis=0))
    tl.store(out + _V_LOSS, tl.sum(tl.where(active, loss, zero), axis=0))
    tl.store(out + _V_CLIP, tl.sum(tl.where(active & clipped, one, zero), axis=0))
    tl.store(out + _V_BAD_MASK, tl.sum(tl.where(active & (m != 1.0), one, zero), axis=0))
    if WRITE_GRAD:
        grad = tl.where(active & (e2 <= e1), 2.0 * (v - ret), zero)
        tl.store(grad_ptr + base + offs_t, grad, mask=in_row)


# ----------------------------------------------------------------------------- host launchers


def _tiles(T: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(T, 1)), MAX_BLOCK_T)
    return block, triton.cdiv(max(T, 1), block)


def _rows(shape, cu_seqlens) -> tuple[int, int, torch.Tensor | None]:
    """(rows, their longest length, cu_seqlens on the device or None): the (B, T) grid, or one row
    per packed sequence (``cu_seqlens``: validated CPU int64 offsets of a (1, N) input)."""
    if cu_seqlens is None:
        return shape[0], shape[1], None
    cu_host = cu_seqlens.to(device="cpu", dtype=torch.int64)
    return cu_host.numel() - 1, int((cu_host[1:] - cu_host[:-1]).max()), cu_host


def _check_rows(*tensors: torch.Tensor) -> None:
    # Internal invariants (the public ops validate user input before calling the launchers).
    shape = tensors[0].shape
    assert tensors[0].dim() == 2, shape
    for t in tensors:
        assert t.shape == shape and t.is_contiguous(), (t.shape, shape)


def seq_logratio(logp, old_logp, mask, dtype: torch.dtype, cu_seqlens=None) -> torch.Tensor:
    """GSPO's per-row ``s = sum_t(m lr) / max(sum_t m, 1)``: (B,) in ``dtype`` ((S,): one per
    sequence of a packed (1, N) input with ``cu_seqlens``)."""
    _check_rows(logp, old_logp, mask)
    B, T, cu = _rows(logp.shape, cu_seqlens)
    cu = None if cu is None else cu.to(logp.device)
    block, nt = _tiles(T)
    partial = torch.empty((B, nt, 2), dtype=dtype, device=logp.device)
    with device_guard(logp):
        _seq_logratio_kernel[(B, nt)](
            logp, old_logp, mask_view(mask), partial, cu if cu is not None else partial, T, nt,
            PACKED=cu is not None, DTYPE=triton_dtype(dtype), BLOCK_T=block,
        )  # fmt: skip
    sums = partial.sum(1)
    return sums[:, 0] / sums[:, 1].clamp(min=1.0)


def policy_fwd(
    logp, old_logp, advantages, mask, is_weights, ref_logp, entropy, *, config, write_grad: bool,
    dtype: torch.dtype, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Contiguous (B, T) inputs and a :class:`alignkit.PolicyLossConfig` -> per-row statistics
    (B, POLICY_STATS) in ``dtype`` (columns of alignkit.loss_layout) and, when ``write_grad``, the
    per-token gradient of the row sums w.r.t. logp, (B, T) in ``dtype``. GSPO (``loss_type=
    "gspo"``) first runs the per-row log-ratio pre-pass. With ``cu_seqlens`` (validated offsets of
    S sequences packed in the (1, N) inputs) the rows are the sequences: statistics (S, ...)."""
    optional = [t for t in (is_weights, ref_logp, entropy) if t is not None]
    _check_rows(logp, old_logp, advantages, mask, *optional)
    B, T, cu = _rows(logp.shape, cu_seqlens)
    cu = None if cu is None else cu.to(logp.device)
    block, nt = _tiles(T)
    dual = config.active_dual_clip
    seq_lr = seq_logratio(logp, old_logp, mask, dtype, cu_seqlens) if config.sequence_ratio else None
    scalars = split_float(1.0 - config.clip_low, 1.0 + config.clip_high, dual or 0.0, config.kl_coef)
    partial = torch.empty((B, nt, L.POLICY_STATS), dtype=dtype, device=logp.device)
    grad = torch.empty(logp.shape, dtype=dtype, device=logp.device) if write_grad else None
    with device_guard(logp):
        _ppo_policy_fwd_kernel[(B, nt)](
            logp, old_logp, advantages, mask_view(mask),
            is_weights if is_weights is not None else logp,
            ref_logp if ref_logp is not None else logp,
            entropy if entropy is not None else logp,
            seq_lr if seq_lr is not None else partial,
            partial, grad if grad is not None else partial, cu if cu is not None else partial, T, nt,
            *scalars, HAS_IS=is_weights is not None, HAS_REF=ref_logp is not None,
            HAS_ENT=entropy is not None, HAS_DUAL=dual is not None, LOSS_TYPE=config.loss_code,
            KL_EST=config.kl_code, WRITE_GRAD=write_grad, PACKED=cu is not None, DTYPE=triton_dtype(dtype),
            BLOCK_T=block,
        )  # fmt: skip
    return partial.sum(1), grad


def scale_rows_bwd(
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    row_weight: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    entropy_coef: float = 0.0,
    entropy_dtype: torch.dtype | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(row_weight[:, None] * grad`` in ``out_dtype``, ``-entropy_coef * row_weight * m`` in
    ``entropy_dtype`` or None)``: the backward of both losses (with ``cu_seqlens``: a packed (1, N)
    ``grad``, one weight per sequence)."""
    assert entropy_dtype is None or mask is not None
    _check_rows(grad, *(() if mask is None else (mask,)))
    B, T, cu = _rows(grad.shape, cu_seqlens)
    cu = None if cu is None else cu.to(grad.device)
    block, nt = _tiles(T)
    dx = torch.empty(grad.shape, dtype=out_dtype, device=grad.device)
    dent = None if entropy_dtype is None else torch.empty(grad.shape, dtype=entropy_dtype, device=grad.device)
    with device_guard(grad):
        _scale_rows_bwd_kernel[(B, nt)](
            grad, grad if mask is None else mask_view(mask), row_weight.to(grad.dtype).contiguous(), dx,
            dent if dent is not None else dx, cu if cu is not None else grad, T, *split_float(entropy_coef),
            HAS_ENT=dent is not None, PACKED=cu is not None, DTYPE=triton_dtype(grad.dtype), BLOCK_T=block,
        )  # fmt: skip
    return dx, dent


def value_fwd(
    values, old_values, returns, mask, *, clip: float, write_grad: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row statistics (B, VALUE_STATS) in ``dtype`` (columns of alignkit.loss_layout) and, when
    ``write_grad``, the per-token gradient of the row sums w.r.t. values, (B, T) in ``dtype``."""
    _check_rows(values, old_values, returns, mask)
    B, T = values.shape
    block, nt = _tiles(T)
    partial = torch.empty((B, nt, L.VALUE_STATS), dtype=dtype, device=values.device)
    grad = torch.empty((B, T), dtype=dtype, device=values.device) if write_grad else None
    with device_guard(values):
        _value_fwd_kernel[(B, nt)](
            values, old_values, returns, mask_view(mask), partial, grad if grad is not None else partial,
            T, nt, *split_float(clip), WRITE_GRAD=write_grad, DTYPE=triton_dtype(dtype), BLOCK_T=block,
        )  # fmt: skip
    return partial.sum(1), grad
