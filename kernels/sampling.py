"""Triton kernel for one rollout sampling step: the token, its log-prob and the logit floor, together.

Math (docs/formulas.md "Truncated sampling and the logit floor"; alignkit/rollout/sampling.py is
the torch twin). Per row, ``z = x / T`` in fp32:

    top-k:  t_k = the k-th largest z (ties kept): S_k = {z >= t_k}
    top-p:  with p = softmax over S_k and M(v) = sum_{z_j in S_k, z_j <= v} p_j (ascending mass),
            t_p = min {z_j in S_k : M(z_j) > 1 - top_p}   (HF drops the prefix with M <= 1 - top_p)
    S = {z >= t} (t = t_p, else t_k);  d = max {z_j < t};  floor = (t + d) / 2  (-inf if d = -inf;
            t itself when the midpoint rounds onto d)
    token = argmax_{z_j >= floor} (z_j + g_j),  g_j = -log(-log u_j)   (Gumbel-max: token ~ softmax)
    logp  = z_token - (m + log sum_{z_j >= floor} exp(z_j - m)),  m = max z

Thresholds are found by bisection on the float's order-preserving integer key (``_sort_key``): each
of at most 33 rounds counts (top-k) or sums the mass of (top-p) the entries above a candidate key in
one pass over the row, so the kernel needs no sort and no (B, V) scratch: a program per row, loops
over vocabulary tiles of BLOCK_V. Random numbers: Philox (``tl.rand``) keyed by the row's own key
``key[b]`` (int64, alignkit/rollout/random_streams.py) at counter ``step * V + j``, so a row's draw
depends on its key, the step and its logits only (not on the batch it is in) and a launch repeats
exactly. Greedy (GREEDY): ``argmax x`` (first index), log-prob at temperature 1, no floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard

MAX_BLOCK_V = 4096  # vocabulary tile of the row loops
BISECTION_ROUNDS = tl.constexpr(33)  # int keys span < 2**33: the interval closes within 33 halvings
NEG_BIG = tl.constexpr(-1.0e30)
U_MAX = tl.constexpr(0.99999994)  # largest fp32 below 1: tl.rand can round to 1.0, whose Gumbel is +inf


@triton.jit
def _sort_key(z):
    # fp32 -> int32 with the same order (negative floats: flip the magnitude bits).
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _load_z(row_ptr, start, V, inv_temp, BLOCK_V: tl.constexpr):
    offs_v = start + tl.arange(0, BLOCK_V)
    valid = offs_v < V
    z = tl.load(row_ptr + offs_v, mask=valid, other=-float("inf")).to(tl.float32) * inv_temp
    return offs_v, valid, z


@triton.jit(do_not_specialize=["step"])  # one compiled kernel for every step (no 1 / %16 variants)
def _sample_fwd_kernel(
    x_ptr, key_ptr, token_ptr, logp_ptr, floor_ptr,
    V, stride_xn, inv_temp, top_k, top_p, step,
    GREEDY: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + pid * stride_xn
    # Pass 1: max m, s = sum exp(z - m) (online), the key range, and the greedy argmax.
    m = tl.full((), NEG_BIG, tl.float32)  # finite: exp(m - m_new) stays 0, never NaN, on -inf tiles
    s = tl.zeros((), tl.float32)
    key_lo = tl.full((), 2147483647, tl.int32)
    key_hi = tl.full((), -2147483647 - 1, tl.int32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK_V):
        offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
        tile_max = tl.max(z, axis=0)
        if GREEDY:
            tile_idx = tl.argmax(z, axis=0).to(tl.int64) + start
            best_idx = tl.where(tile_max > m, tile_idx, best_idx)  # strict: the first max wins
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(z - m_new), 0.0), axis=0)
        m = m_new
        key = _sort_key(z)
        key_lo = tl.minimum(key_lo, tl.min(tl.where(valid, key, 2147483647), axis=0))
        key_hi = tl.maximum(key_hi, tl.max(tl.where(valid, key, -2147483647 - 1), axis=0))
    if GREEDY:
        z_best = tl.load(row_ptr + best_idx).to(tl.float32)
        tl.store(token_ptr + pid, best_idx)
        tl.store(logp_ptr + pid, (z_best - m) - tl.log(s))
        tl.store(floor_ptr + pid, -float("inf"))
    else:
        # Thresholds as int64 keys: S = {key >= t}.
        t = key_lo.to(tl.int64)
        if HAS_TOP_K:
            # Largest t with count(key >= t) >= top_k: the k-th largest key.
            lo = t
            hi = key_hi.to(tl.int64) + 1
            for _ in range(BISECTION_ROUNDS):
                mid = lo + (hi - lo) // 2
                count = tl.zeros((), tl.int32)
                for start in range(0, V, BLOCK_V):
                    offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
                    count += tl.sum((valid & (_sort_key(z) >= mid)).to(tl.int32), axis=0)
                take = count >= top_k
                lo = tl.where(take, mid, lo)
                hi = tl.where(take, hi, mid)
            t = lo
        if HAS_TOP_P:
            # Mass of S_k (relative to m), then the smallest key t' >= t whose ascending mass
            # M(t') = mass(t <= key <= t') exceeds (1 - top_p) * mass(S_k).
            mass_k = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
                mass_k += tl.sum(tl.where(valid & (_sort_key(z) >= t), tl.exp(z - m), 0.0), axis=0)
            cut = (1.0 - top_p) * mass_k
            lo = t - 1  # M(lo) = 0 <= cut
            hi = key_hi.to(tl.int64)  # M(hi) = mass_k > cut
            for _ in range(BISECTION_ROUNDS):
                mid = lo + (hi - lo) // 2
                mass = tl.zeros((), tl.float32)
                for start in range(0, V, BLOCK_V):
                    offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
                    key = _sort_key(z)
                    inside = valid & (key >= t) & (key <= mid)
                    mass += tl.sum(tl.where(inside, tl.exp(z - m), 0.0), axis=0)
                above = mass > cut
                hi = tl.where(above, mid, hi)
                lo = tl.where(above, lo, mid)
            t = hi
        floor = tl.full((), -float("inf"), tl.float32)
        if HAS_TOP_K or HAS_TOP_P:
            smallest_kept = tl.full((), float("inf"), tl.float32)
            largest_dropped = tl.full((), -float("inf"), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
                kept = _sort_key(z) >= t
                smallest_kept = tl.minimum(
                    smallest_kept, tl.min(tl.where(valid & kept, z, float("inf")), axis=0)
                )
                largest_dropped = tl.maximum(
                    largest_dropped, tl.max(tl.where(valid & ~kept, z, -float("inf")), axis=0)
                )
            mid_value = (smallest_kept + largest_dropped) * 0.5
            floor = tl.where(mid_value > largest_dropped, mid_value, smallest_kept)
            floor = tl.where(largest_dropped == -float("inf"), -float("inf"), floor)
        # Last pass: the normaliser over {z >= floor} and the Gumbel-max draw from it.
        key = tl.load(key_ptr + pid)  # int64, the row's stream
        counter0 = step.to(tl.int64) * V  # this step's counters: [step * V, (step + 1) * V)
        s_kept = tl.zeros((), tl.float32)
        best_score = tl.full((), -float("inf"), tl.float32)
        best_z = tl.zeros((), tl.float32)
        best_idx = tl.zeros((), tl.int64)
        for start in range(0, V, BLOCK_V):
            offs_v, valid, z = _load_z(row_ptr, start, V, inv_temp, BLOCK_V)
            kept = valid & (z >= floor)
            s_kept += tl.sum(tl.where(kept, tl.exp(z - m), 0.0), axis=0)
            u = tl.rand(key, counter0 + offs_v)
            u = tl.minimum(tl.maximum(u, 1.0e-30), U_MAX)
            score = tl.where(kept, z - tl.log(-tl.log(u)), -float("inf"))
            tile_best = tl.max(score, axis=0)
            tile_idx = tl.argmax(score, axis=0)
            tile_z = tl.sum(tl.where(tl.arange(0, BLOCK_V) == tile_idx, z, 0.0), axis=0)
            better = tile_best > best_score
            best_score = tl.where(better, tile_best, best_score)
            best_z = tl.where(better, tile_z, best_z)
            best_idx = tl.where(better, tile_idx.to(tl.int64) + start, best_idx)
        tl.store(token_ptr + pid, best_idx)
        tl.store(logp_ptr + pid, (best_z - m) - tl.log(s_kept))
        tl.store(floor_ptr + pid, floor)


def _row_block(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)


def sample_fwd(
    logits: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    step: int,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, V) with unit column stride (fp16 / bf16 / fp32), keys (B,) int64 (the rows' stream
    keys, >= 0) -> token (B,) int64, logp (B,) fp32, floor (B,) fp32 (-inf where nothing is dropped,
    and for greedy). ``temperature == 0`` is greedy; ``top_k`` 0 / >= V and ``top_p`` 1 are off;
    ``step`` an int in [0, 2**31)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be (B, V) with unit column stride, got {tuple(logits.shape)} {logits.stride()}"
        )
    rows, vocab = logits.shape
    if keys.shape != (rows,) or keys.dtype != torch.int64 or keys.device != logits.device:
        raise ValueError(
            f"keys must be int64 of shape ({rows},) on {logits.device}, got {keys.dtype} "
            f"{tuple(keys.shape)} on {keys.device}"
        )
    if not 0 <= step < 2**31:
        raise ValueError(f"step must be in [0, 2**31), got {step}")
    greedy = temperature == 0.0
    token = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    floor = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return token, logp, floor
    with device_guard(logits):
        _sample_fwd_kernel[(rows,)](
            logits, keys.contiguous(), token, logp, floor, vocab, logits.stride(0),
            1.0 if greedy else 1.0 / temperature, max(int(top_k), 1), float(top_p), int(step),
            GREEDY=greedy, HAS_TOP_K=not greedy and 0 < top_k < vocab, HAS_TOP_P=not greedy and top_p < 1.0,
            BLOCK_V=block_v or _row_block(vocab),
        )  # fmt: skip
    return token, logp, floor
