"""Triton kernels for token log-probs and entropy of given logits, and the online-softmax helpers
they share with the fused lm_head kernels (kernels/fused_logprobs.py).

Math (docs/formulas.md, "Log-probs and entropy"), per token with ``z = x / T``. Online
over vocabulary tiles, keeping the running max ``m``, ``s = sum exp(z - m)`` and
``u = sum exp(z - m) (z - m)`` (taken relative to the max: ``z - m <= 0`` and ``s >= 1`` make
``logp <= 0`` and ``H >= 0`` hold in floating point). A new tile with max ``m'`` rescales::

    a = exp(m - m');  u <- a (u + (m - m') s) + sum exp(z - m') (z - m');  s <- a s + sum exp(z - m')

    lse = m + log s;  logp = (z_label - m) - log s;  H = log s - u / s
    dz_j = g_logp (1[j = label] - p_j) - g_H p_j (log p_j + H);  d x = dz / T

Shared ``@triton.jit`` helpers (public: kernels/fused_logprobs.py imports them): ``online_update``
folds a tile into the running (m, s, u), ``row_floor`` loads each row's logit floor, ``dz_tile``
writes dz / T of a tile; constants ``NEG_BIG`` (the finite initial running max) and ``NAN``.

Kernels:
* ``_token_logprobs_fwd_kernel`` / ``_token_logprobs_bwd_kernel``: one program per row of given
  logits, looping over V tiles; the backward may write d logits over the logits (in place).

Labels outside [0, V) that are not ``ignore_index`` give NaN (never a plausible wrong number).
Inputs: fp16 / bf16 / fp32 (fp32 accumulation); fp64 is served by the CPU implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard

# Row kernels loop over the vocabulary in tiles of at most this many columns.
MAX_BLOCK_V_ROW = 4096
# Running-max initial value: finite, so (m - m') * s stays 0 * finite = 0 on empty rows/splits.
NEG_BIG = tl.constexpr(-1.0e30)
NAN = tl.constexpr(float("nan"))


@triton.jit
def online_update(m, s, u, z, valid):
    # Fold a (ROWS, BLOCK_V) tile of scaled logits into the running (m, s, u) of each row. Invalid
    # entries become -inf, so exp gives exactly 0 for them and `valid` dies here (registers: on
    # sm_90 each (BLOCK_N, BLOCK_V) fp32 temporary held across the row reductions costs
    # BLOCK_N * BLOCK_V / threads registers per thread). m starts finite (NEG_BIG), so
    # z - m_new is never inf - inf.
    z = tl.where(valid, z, -float("inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shifted = z - m_new[:, None]
    e = tl.exp(shifted)
    alpha = tl.exp(m - m_new)
    # 0 * log 0 = 0: a logit of -inf (masked vocabulary) must not turn the sum into NaN.
    u = alpha * (u + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, shifted, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, u


@triton.jit
def row_floor(floor_ptr, rows, row_ok, HAS_FLOOR: tl.constexpr):
    # The logit floor of each row (z below it is outside the sampled distribution), or -inf.
    if HAS_FLOOR:
        return tl.load(floor_ptr + rows, mask=row_ok, other=-float("inf")).to(tl.float32)
    else:
        return tl.full(rows.shape, -float("inf"), tl.float32)


@triton.jit
def dz_tile(z, lse, ent, g_logp, g_ent, labels, offs_v, inv_temp, floor):
    # dz / T for a tile: g_logp (1[j = label] - p) - g_H p (log p + H); 0 for entries below the floor
    # (outside the distribution: p = 0 and no gradient).
    kept = ~(z < floor[:, None])  # (NaN is kept: it must stay visible)
    z = tl.where(kept, z, -float("inf"))
    logp = z - lse[:, None]
    p = tl.exp(logp)
    onehot = (offs_v[None, :] == labels[:, None]).to(tl.float32)
    ent_term = p * (tl.where(p > 0, logp, 0.0) + ent[:, None])  # p log p -> 0 as p -> 0 (logit -inf)
    dz = g_logp[:, None] * (onehot - p) - g_ent[:, None] * ent_term
    return tl.where(kept, dz * inv_temp, 0.0)


# ---------------------------------------------------------------------------------------------
# Log-probs of given logits (row kernels)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, labels_ptr, floor_ptr, logp_ptr, ent_ptr, lse_ptr,
    V, stride_xn, inv_temp, ignore_index,
    HAS_FLOOR: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row = x_ptr + pid * stride_xn
    label = tl.load(labels_ptr + pid + tl.zeros((1,), dtype=tl.int64))  # (1,)
    pid_1 = pid + tl.zeros((1,), dtype=tl.int64)  # (1,)
    floor = row_floor(floor_ptr, pid_1, pid_1 >= 0, HAS_FLOOR)  # (1,)
    m = tl.full((1,), NEG_BIG, tl.float32)
    s = tl.zeros((1,), tl.float32)
    u = tl.zeros((1,), tl.float32)
    z_label = tl.zeros((1,), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        valid = offs_v < V
        z = tl.load(row + offs_v, mask=valid, other=0.0).to(tl.float32)[None, :] * inv_temp
        z_label += tl.sum(tl.where(offs_v[None, :] == label[:, None], z, 0.0), axis=1)
        m, s, u = online_update(m, s, u, z, valid[None, :] & ~(z < floor[:, None]))
    log_s = tl.log(s)
    logp = tl.where(z_label < floor, -float("inf"), (z_label - m) - log_s)
    ent = log_s - u / s
    keep = label != ignore_index
    logp = tl.where((label < 0) | (label >= V), NAN, logp)
    tl.store(logp_ptr + pid + tl.arange(0, 1), tl.where(keep, logp, 0.0))
    tl.store(ent_ptr + pid + tl.arange(0, 1), tl.where(keep, ent, 0.0))
    tl.store(lse_ptr + pid + tl.arange(0, 1), m + log_s)


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, dx_ptr, labels_ptr, floor_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    V, stride_xn, stride_dxn, inv_temp, ignore_index,
    HAS_FLOOR: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # dx may alias x: every element is read before the same program overwrites it.
    pid = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    label = tl.load(labels_ptr + pid + one)
    floor = row_floor(floor_ptr, pid + one, one >= 0, HAS_FLOOR)
    keep = label != ignore_index
    lse = tl.load(lse_ptr + pid + one)
    ent = tl.load(ent_ptr + pid + one)
    g_logp = tl.where(keep, tl.load(g_logp_ptr + pid + one), 0.0)
    g_ent = tl.where(keep, tl.load(g_ent_ptr + pid + one), 0.0)
    # A row with no upstream gradient (ignored, or unused downstream) gets exactly 0, whatever its
    # logits hold (padding may be NaN: 0 * NaN would be NaN).
    active = (g_logp != 0) | (g_ent != 0)
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        valid = offs_v < V
        z = tl.load(x_ptr + pid * stride_xn + offs_v, mask=valid, other=0.0).to(tl.float32)[None, :]
        dz = dz_tile(z * inv_temp, lse, ent, g_logp, g_ent, label, offs_v, inv_temp, floor)
        dz = tl.where(active[:, None], dz, 0.0)
        tl.store(
            dx_ptr + pid * stride_dxn + offs_v[None, :],
            dz.to(dx_ptr.dtype.element_ty),
            mask=valid[None, :],
        )


def _row_block(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V_ROW)


def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    logit_floor: torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) with unit column stride, labels (N,), optional fp32 logit floor (N,) -> fp32
    logp, entropy, lse (N,)."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1 and labels.is_contiguous()
    logp, ent, lse = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n == 0:
        return logp, ent, lse
    with device_guard(logits):
        _token_logprobs_fwd_kernel[(n,)](
            logits, labels, logit_floor if logit_floor is not None else lse, logp, ent, lse, vocab,
            logits.stride(0), 1.0 / temperature, ignore_index,
            HAS_FLOOR=logit_floor is not None, BLOCK_V=block_v or _row_block(vocab),
        )  # fmt: skip
    return logp, ent, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor,
    temperature: float,
    ignore_index: int,
    logit_floor: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """d logits (N, V) in logits' dtype; ``out`` may be ``logits`` (written in place)."""
    n, vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    assert out.shape == logits.shape and out.stride(1) == 1
    if n == 0:
        return out
    with device_guard(logits):
        _token_logprobs_bwd_kernel[(n,)](
            logits, out, labels, logit_floor if logit_floor is not None else lse, lse, ent,
            g_logp.contiguous(), g_ent.contiguous(), vocab, logits.stride(0), out.stride(0),
            1.0 / temperature, ignore_index, HAS_FLOOR=logit_floor is not None,
            BLOCK_V=block_v or _row_block(vocab),
        )  # fmt: skip
    return out
