"""numba implementations of the PPO losses (CPU twins of kernels/ppo_loss.py).

Same contract as the Triton launchers: the forward writes per-row statistics (token count and the
masked sums every aggregation mode and metric needs) and, when asked, the per-token gradient of the
row sums; the backward (``scale_rows``) scales that by a per-row weight. Arithmetic is float64
whatever the storage dtype, so these are also the accurate reference for fp32 inputs.

Ties are not clipped (``L2 > L1`` and ``Lc > L3`` strictly, the clip-fraction predicates); masked
positions are skipped, never multiplied, so NaN/inf in padding does not leak.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import run_rows

# Columns as kernels/ppo_loss.py: the last counts mask values other than 0 and 1 (checked for free).
POLICY_STATS = 8  # count, loss, entropy, kl, clipped, dual-clipped, -lr, bad mask values
VALUE_STATS = 4  # count, max'd squared error, clipped, bad mask values


@numba.njit(cache=True, nogil=True, inline="always")
def _kl(d, kl_code):
    # (value, d value / d logp) of the estimator at d = logp - ref_logp (conventions.md).
    if kl_code == 0:
        return d, 1.0
    if kl_code == 1:
        return abs(d), (1.0 if d > 0 else (-1.0 if d < 0 else 0.0))
    if kl_code == 2:
        return 0.5 * d * d, d
    # float64 exp: exp(x) - 1 is exact to ~1e-16 absolute, far below fp32 resolution of the sums and
    # gradients it enters (and math.expm1 measured ~3x slower than math.exp here).
    x = min(max(-d, -20.0), 20.0)
    em1 = math.exp(x) - 1.0
    y = em1 - x
    inside = -d >= -20.0 and -d <= 20.0 and y <= 10.0
    return min(max(y, -10.0), 10.0), (-em1 if inside else 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _policy_token(logp, old, adv, seq_ratio, s, lo, hi, dual, has_dual):
    # (loss, clipped, dual-clipped, -lr, d loss / d logp) of one token (conventions.md).
    diff = logp - old
    lr = min(max(diff, -20.0), 20.0)
    if seq_ratio:
        ratio = math.exp(min(s, 10.0))
        dratio = ratio if s <= 10.0 else 0.0
    else:
        ratio = math.exp(lr)
        dratio = ratio if (diff >= -20.0 and diff <= 20.0) else 0.0
    l1 = -adv * ratio
    l2 = -adv * min(max(ratio, lo), hi)
    clipped = l2 > l1
    loss = l2 if clipped else l1
    lower = False
    if has_dual:
        l3 = -adv * dual
        lower = adv < 0 and loss > l3
        if lower:
            loss = l3
    grad = 0.0 if (clipped or lower) else -adv * dratio
    return loss, clipped, lower, -lr, grad


@numba.njit(cache=True, nogil=True)
def _seq_logratio_row(b, logp, old, mask):
    num = 0.0
    cnt = 0.0
    for t in range(logp.shape[1]):
        if mask[b, t] != 0:
            num += min(max(np.float64(logp[b, t]) - np.float64(old[b, t]), -20.0), 20.0)
            cnt += 1.0
    return num / max(cnt, 1.0)


@numba.njit(cache=True, nogil=True)
def _policy_fwd_row(
    b, logp, old, adv, mask, isw, ref, ent, flags, lo, hi, dual, kl_code, kl_coef, stats, seq_lr, grad
):
    # Row statistics, and (flags[5]) the per-token gradient of the row sum w.r.t. logp:
    # is_w dL/dlogp + kl_coef dKL/dlogp, 0 where masked.
    has_is, has_ref, has_ent, has_dual, seq_ratio = flags[0], flags[1], flags[2], flags[3], flags[4]
    write_grad = flags[5]
    s = 0.0
    if seq_ratio:
        s = _seq_logratio_row(b, logp, old, mask)
        seq_lr[b] = s
    cnt = 0.0
    s_loss = 0.0
    s_ent = 0.0
    s_kl = 0.0
    n_clip = 0.0
    n_lower = 0.0
    s_neg_lr = 0.0
    n_bad = 0.0
    for t in range(logp.shape[1]):
        mt = mask[b, t]
        if mt == 0:
            if write_grad:
                grad[b, t] = 0.0
            continue
        if mt != 1:
            n_bad += 1.0
        lp = np.float64(logp[b, t])
        loss, clipped, lower, neg_lr, g = _policy_token(
            lp, np.float64(old[b, t]), np.float64(adv[b, t]), seq_ratio, s, lo, hi, dual, has_dual
        )
        if has_is:
            w = np.float64(isw[b, t])
            loss *= w
            g *= w
        cnt += 1.0
        s_loss += loss
        s_neg_lr += neg_lr
        if clipped:
            n_clip += 1.0
        if lower:
            n_lower += 1.0
        if has_ent:
            s_ent += np.float64(ent[b, t])
        if has_ref:
            kl, dkl = _kl(lp - np.float64(ref[b, t]), kl_code)
            s_kl += kl
            g += kl_coef * dkl
        if write_grad:
            grad[b, t] = g
    stats[b, 0] = cnt
    stats[b, 1] = s_loss
    stats[b, 2] = s_ent
    stats[b, 3] = s_kl
    stats[b, 4] = n_clip
    stats[b, 5] = n_lower
    stats[b, 6] = s_neg_lr
    stats[b, 7] = n_bad


@numba.njit(cache=True, nogil=True)
def _policy_fwd_serial(
    logp, old, adv, mask, isw, ref, ent, flags, lo, hi, dual, kl_code, kl_coef, stats, seq_lr, grad
):
    for b in range(logp.shape[0]):
        _policy_fwd_row(
            b, logp, old, adv, mask, isw, ref, ent, flags, lo, hi, dual, kl_code, kl_coef, stats, seq_lr, grad
        )


@numba.njit(cache=True, nogil=True, parallel=True)
def _policy_fwd_parallel(
    logp, old, adv, mask, isw, ref, ent, flags, lo, hi, dual, kl_code, kl_coef, stats, seq_lr, grad
):
    for b in numba.prange(logp.shape[0]):
        _policy_fwd_row(
            b, logp, old, adv, mask, isw, ref, ent, flags, lo, hi, dual, kl_code, kl_coef, stats, seq_lr, grad
        )


@numba.njit(cache=True, nogil=True)
def _value_row(b, values, old, ret, mask, clip, stats, grad, write_grad):
    # vclip = old + clamp(v - old, -clip, clip); per token max((v - R)^2, (vclip - R)^2);
    # gradient 2 (v - R) where unclipped, 0 where clipped (|v - old| > clip there).
    cnt = 0.0
    s_loss = 0.0
    n_clip = 0.0
    n_bad = 0.0
    for t in range(values.shape[1]):
        mt = mask[b, t]
        if mt == 0:
            if write_grad:
                grad[b, t] = 0.0
            continue
        if mt != 1:
            n_bad += 1.0
        v = np.float64(values[b, t])
        r = np.float64(ret[b, t])
        o = np.float64(old[b, t])
        delta = v - o  # inside the clip range vclip is v itself (no rounding through old + delta)
        vclip = v if abs(delta) <= clip else o + min(max(delta, -clip), clip)
        e1 = (v - r) * (v - r)
        e2 = (vclip - r) * (vclip - r)
        clipped = e2 > e1
        cnt += 1.0
        s_loss += e2 if clipped else e1
        if clipped:
            n_clip += 1.0
        if write_grad:
            grad[b, t] = 0.0 if clipped else 2.0 * (v - r)
    stats[b, 0] = cnt
    stats[b, 1] = s_loss
    stats[b, 2] = n_clip
    stats[b, 3] = n_bad


@numba.njit(cache=True, nogil=True)
def _value_serial(values, old, ret, mask, clip, stats, grad, write_grad):
    for b in range(values.shape[0]):
        _value_row(b, values, old, ret, mask, clip, stats, grad, write_grad)


@numba.njit(cache=True, nogil=True, parallel=True)
def _value_parallel(values, old, ret, mask, clip, stats, grad, write_grad):
    for b in numba.prange(values.shape[0]):
        _value_row(b, values, old, ret, mask, clip, stats, grad, write_grad)


@numba.njit(cache=True, nogil=True)
def _scale_rows(grad, mask, row_weight, ent_coef, dx, dent, with_entropy):
    # d x = w_b g;  d H = -entropy_coef w_b m  (the backward of every loss here). Serial: a prange
    # twin measured slower here (6 ms vs 3 ms at 256x4096), called from autograd's backward.
    for b in range(dx.shape[0]):
        w = row_weight[b]
        for t in range(dx.shape[1]):
            dx[b, t] = w * grad[b, t]
            if with_entropy:
                dent[b, t] = -ent_coef * w if mask[b, t] != 0 else 0.0


def _flags(is_weights, ref_logp, entropy, dual_clip, seq_ratio: bool, write_grad: bool) -> np.ndarray:
    return np.array(
        [
            is_weights is not None,
            ref_logp is not None,
            entropy is not None,
            dual_clip is not None,
            seq_ratio,
            write_grad,
        ],
        dtype=np.bool_,
    )


def _or_dummy(a: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    return like if a is None else a


def policy_fwd(
    logp,
    old_logp,
    advantages,
    mask,
    is_weights,
    ref_logp,
    entropy,
    seq_ratio: bool,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_code: int,
    kl_coef: float,
    write_grad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, T) arrays of one float dtype (mask bool/uint8/that dtype) -> per-row statistics (B, 8)
    float64, the GSPO per-row log-ratio (B,) float64 (zeros unless ``seq_ratio``), and when
    ``write_grad`` the per-token gradient of the row sums w.r.t. logp, (B, T) in logp's dtype."""
    stats = np.empty((logp.shape[0], POLICY_STATS), dtype=np.float64)
    seq_lr = np.zeros(logp.shape[0], dtype=np.float64)
    grad = np.empty(logp.shape, dtype=logp.dtype) if write_grad else np.empty((1, 1), dtype=logp.dtype)
    run_rows(
        _policy_fwd_serial, _policy_fwd_parallel, logp.size,
        logp, old_logp, advantages, mask, _or_dummy(is_weights, logp), _or_dummy(ref_logp, logp),
        _or_dummy(entropy, logp), _flags(is_weights, ref_logp, entropy, dual_clip, seq_ratio, write_grad),
        1.0 - clip_low, 1.0 + clip_high, dual_clip or 0.0, kl_code, kl_coef, stats, seq_lr, grad,
    )  # fmt: skip
    return stats, seq_lr, (grad if write_grad else None)


def value_fwd(
    values, old_values, returns, mask, clip: float, write_grad: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row statistics (B, 4) float64 (count, sum of max'd squared errors, clipped count, bad mask
    values) and, when ``write_grad``, the per-token gradient of the row sums, (B, T) in values' dtype."""
    stats = np.empty((values.shape[0], VALUE_STATS), dtype=np.float64)
    grad = np.empty(values.shape, dtype=values.dtype) if write_grad else np.empty((1, 1), dtype=values.dtype)
    run_rows(
        _value_serial, _value_parallel, values.size,
        values, old_values, returns, mask, clip, stats, grad, write_grad,
    )  # fmt: skip
    return stats, (grad if write_grad else None)


def scale_rows(grad, mask, row_weight, entropy_coef: float, with_entropy: bool):
    """(``row_weight[:, None] * grad``, ``-entropy_coef * row_weight[:, None] * (mask != 0)`` or None),
    in grad's dtype; ``mask`` is read only ``with_entropy``."""
    dx = np.empty(grad.shape, dtype=grad.dtype)
    dent = np.empty(grad.shape, dtype=grad.dtype) if with_entropy else dx
    _scale_rows(grad, mask if with_entropy else grad, row_weight, entropy_coef, dx, dent, with_entropy)
    return dx, (dent if with_entropy else None)
