"""GAE and discounted returns as parallel affine scans (Triton).

Both carries of GAE (docs/formulas.md, "GAE") are affine maps applied in reverse time order::

    NV_t = a_t NV_{t+1} + b_t,  a_t = 1 - m_t,                 b_t = m_t V_t
    L_t  = c_t L_{t+1}  + d_t,  c_t = 1 - m_t + m_t gamma lam,  d_t = m_t (r_t + gamma NV_{t+1} - V_t)
    A_t = L_t,  R_t = L_t + V_t

Maps compose associatively, (a1, b1) then (a2, b2) = (a1 a2, b1 a2 + b2), so each tile of a row is
one ``tl.associative_scan``. Tiles are loaded in *descending* position order and scanned forward
(reverse scans with non-commutative combines have had backend bugs; a reversed load is equivalent
and as well coalesced). ``NV_{t+1}`` is an exclusive scan: it comes from a scan of the maps loaded
one position further on (``t + 1``), masked to the identity past the chunk's end.

Long rows are split into chunks so that few rows still fill the GPU (three launches):
  1. ``_gae_summary_kernel``: per (row, chunk), the chunk's map from the carries entering at its
     end, (nv_in, L_in), to the carries leaving at its start:
     ``nv_out = p nv_in + q``; ``L_out = c L_in + e nv_in + d`` (tracked symbolically).
  2. ``_gae_carry_kernel``: per row, compose the chunk maps from the last chunk to the first.
  3. ``_gae_fwd_kernel``: per (row, chunk), the scan again with the true carries; writes A and R.
A row that fits one chunk skips 1 and 2. Packed rows (``cu_seqlens``) use the same kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard, interpreter_active, mask_view, triton_dtype
from .scalars import join_float, split_float

# Largest tile a program scans at once; chunks are whole numbers of tiles.
BLOCK_GPU = 1024
BLOCK_INTERPRETER = 64  # the interpreter runs custom-combine scans element by element
MIN_CHUNK_GPU = 256


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) applied first, then (a2, b2): x -> a2 (a1 x + b1) + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _affine_combine3(c1, d1, e1, c2, d2, e2):
    # Two affine offsets (d, e) sharing the slope c.
    return c1 * c2, d1 * c2 + d2, e1 * c2 + e2


@triton.jit
def _row_extent(cu_ptr, row, T, stride_row, PACKED: tl.constexpr):
    # (base offset, length) of a row: padded rows are stride_row apart; packed rows come from cu_seqlens.
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        length = tl.load(cu_ptr + row + 1).to(tl.int64) - start
        return start, length
    else:
        return row * stride_row, row * 0 + T  # int64 even when T is specialised to a constant


@triton.jit
def _load_tile(
    r_ptr, v_ptr, m_ptr, base, hi, lo, chunk_end, gamma, lam, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # Positions hi-1, hi-2, ... (descending) of the tile [lo, hi); invalid slots are identity maps.
    # Rewards and values are read only where the mask is 1: padding may hold NaN/inf, which a
    # product with m = 0 would spread (0 * nan = nan); unread slots hold 0.
    offs = hi - 1 - tl.arange(0, BLOCK).to(tl.int64)
    valid = offs >= lo
    m = tl.load(m_ptr + base + offs, mask=valid, other=0).to(ACC)
    live = valid & (m != 0)
    r = tl.load(r_ptr + base + offs, mask=live, other=0.0).to(ACC)
    v = tl.load(v_ptr + base + offs, mask=live, other=0.0).to(ACC)
    nxt = offs + 1
    valid_next = valid & (nxt < chunk_end)
    m_next = tl.load(m_ptr + base + nxt, mask=valid_next, other=0).to(ACC)
    v_next = tl.load(v_ptr + base + nxt, mask=valid_next & (m_next != 0), other=0.0).to(ACC)
    # Maps of position t+1 for the exclusive NV scan.
    a_next = 1.0 - m_next
    b_next = m_next * v_next
    c = 1.0 - m + m * (gamma * lam)
    return offs, valid, r, v, m, a_next, b_next, c


@triton.jit
def _scalar(value, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # A 0-d tensor of dtype ACC (loop-carried values need a fixed type).
    return tl.max(tl.full([BLOCK], value, ACC), axis=0)


@triton.jit
def _last(x, BLOCK: tl.constexpr):
    # The inclusive scan's total over the tile (slot BLOCK-1; trailing invalid slots are identities).
    idx = tl.arange(0, BLOCK)
    return tl.sum(tl.where(idx == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _gae_fwd_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    adv_ptr,
    ret_ptr,
    carry_ptr,
    cu_ptr,
    T,
    stride_row,
    n_chunks,
    CHUNK,
    gamma_0,  # gamma and lam as three fp32 pieces each (scalars.split_float)
    gamma_1,
    gamma_2,
    lam_0,
    lam_1,
    lam_2,
    HAS_CARRY: tl.constexpr,
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid: rows x chunks can exceed the 65535 of axis 1
    row = pid // n_chunks
    chunk = pid % n_chunks
    gamma = join_float(gamma_0, gamma_1, gamma_2, ACC)
    lam = join_float(lam_0, lam_1, lam_2, ACC)
    base, length = _row_extent(cu_ptr, row, T, stride_row, PACKED)
    chunk_start = chunk * CHUNK
    if chunk_start < length:
        chunk_end = tl.minimum(chunk_start + CHUNK, length)
        if HAS_CARRY:
            nv = tl.load(carry_ptr + (row * n_chunks + chunk) * 2).to(ACC)
            gae = tl.load(carry_ptr + (row * n_chunks + chunk) * 2 + 1).to(ACC)
        else:
            nv = _scalar(0.0, ACC, BLOCK)
            gae = _scalar(0.0, ACC, BLOCK)
        hi = chunk_end
        while hi > chunk_start:
            lo = tl.maximum(hi - BLOCK, chunk_start)
            offs, valid, r, v, m, a_next, b_next, c = _load_tile(
                r_ptr, v_ptr, m_ptr, base, hi, lo, chunk_end, gamma, lam, ACC, BLOCK
            )
            A, B = tl.associative_scan((a_next, b_next), 0, _affine_combine)
            nv_next = A * nv + B  # NV_{t+1}
            d = m * (r + gamma * nv_next - v)
            C, D = tl.associative_scan((c, d), 0, _affine_combine)
            L = C * gae + D
            # R = A + V at every position, masked ones included (with the value as given there).
            v_all = tl.load(v_ptr + base + offs, mask=valid & (m == 0), other=0.0).to(ACC) + v
            tl.store(adv_ptr + base + offs, L, mask=valid)
            tl.store(ret_ptr + base + offs, L + v_all, mask=valid)
            nv = _last(nv_next, BLOCK)  # NV_{lo+1}: the next tile's shifted loads include position lo
            gae = _last(L, BLOCK)
            hi = lo


@triton.jit
def _gae_summary_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    summary_ptr,
    cu_ptr,
    T,
    stride_row,
    n_chunks,
    CHUNK,
    gamma_0,  # gamma and lam as three fp32 pieces each (scalars.split_float)
    gamma_1,
    gamma_2,
    lam_0,
    lam_1,
    lam_2,
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Symbolic carries: nv = p nv_in + q (p: coefficient of nv_in), L = cL L_in + eL nv_in + dL.
    pid = tl.program_id(0).to(tl.int64)  # 1-D grid: rows x chunks can exceed the 65535 of axis 1
    row = pid // n_chunks
    chunk = pid % n_chunks
    gamma = join_float(gamma_0, gamma_1, gamma_2, ACC)
    lam = join_float(lam_0, lam_1, lam_2, ACC)
    base, length = _row_extent(cu_ptr, row, T, stride_row, PACKED)
    chunk_start = chunk * CHUNK
    out = summary_ptr + (row * n_chunks + chunk) * 5
    if chunk_start < length:
        chunk_end = tl.minimum(chunk_start + CHUNK, length)
        p = _scalar(1.0, ACC, BLOCK)
        q = _scalar(0.0, ACC, BLOCK)
        cL = _scalar(1.0, ACC, BLOCK)
        eL = _scalar(0.0, ACC, BLOCK)
        dL = _scalar(0.0, ACC, BLOCK)
        nv_start_p = _scalar(1.0, ACC, BLOCK)
        nv_start_q = _scalar(0.0, ACC, BLOCK)
        hi = chunk_end
        while hi > chunk_start:
            lo = tl.maximum(hi - BLOCK, chunk_start)
            offs, _, r, v, m, a_next, b_next, c = _load_tile(
                r_ptr, v_ptr, m_ptr, base, hi, lo, chunk_end, gamma, lam, ACC, BLOCK
            )
            A, B = tl.associative_scan((a_next, b_next), 0, _affine_combine)
            nvn_p = A * p  # NV_{t+1} = nvn_p nv_in + nvn_q
            nvn_q = A * q + B
            d_const = m * (r - v + gamma * nvn_q)
            d_coef = m * gamma * nvn_p
            C, D, E = tl.associative_scan((c, d_const, d_coef), 0, _affine_combine3)
            # NV at chunk_start (only the last tile holds it): (1 - m) NV_{s+1} + m V_s.
            at_start = offs == chunk_start
            nv_start_p = tl.where(
                lo == chunk_start, tl.sum(tl.where(at_start, (1.0 - m) * nvn_p, 0.0), axis=0), nv_start_p
            )
            nv_start_q = tl.where(
                lo == chunk_start,
                tl.sum(tl.where(at_start, (1.0 - m) * nvn_q + m * v, 0.0), axis=0),
                nv_start_q,
            )
            C_last = _last(C, BLOCK)
            dL = C_last * dL + _last(D, BLOCK)
            eL = C_last * eL + _last(E, BLOCK)
            cL = C_last * cL
            p = _last(nvn_p, BLOCK)
            q = _last(nvn_q, BLOCK)
            hi = lo
        tl.store(out + 0, nv_start_p)
        tl.store(out + 1, nv_start_q)
        tl.store(out + 2, cL)
        tl.store(out + 3, eL)
        tl.store(out + 4, dL)


@triton.jit
def _gae_carry_kernel(
    summary_ptr,
    carry_ptr,
    cu_ptr,
    T,
    n_chunks,
    CHUNK,
    PACKED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Per row, from the last chunk to the first: carry_in[j] = state leaving chunk j + 1.
    row = tl.program_id(0).to(tl.int64)
    _, length = _row_extent(cu_ptr, row, T, 0, PACKED)
    row_chunks = tl.cdiv(length, CHUNK)
    nv = _scalar(0.0, ACC, BLOCK)
    gae = _scalar(0.0, ACC, BLOCK)
    j = row_chunks - 1
    while j >= 0:
        s = summary_ptr + (row * n_chunks + j) * 5
        tl.store(carry_ptr + (row * n_chunks + j) * 2, nv)
        tl.store(carry_ptr + (row * n_chunks + j) * 2 + 1, gae)
        p = tl.load(s)
        q = tl.load(s + 1)
        cL = tl.load(s + 2)
        eL = tl.load(s + 3)
        dL = tl.load(s + 4)
        gae = cL * gae + eL * nv + dL
        nv = p * nv + q
        j -= 1


@triton.jit
def _discounted_returns_kernel(
    r_ptr, m_ptr, out_ptr, cu_ptr, T, stride_row, gamma_0, gamma_1, gamma_2,
    PACKED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # ret_t = r_t + gamma K_{t+1}, where K_t = m_t ret_t = (gamma m_t) K_{t+1} + m_t r_t: an exclusive
    # affine scan, taken from the maps of position t+1 like NV in GAE. One program per row (padded)
    # or per sequence (packed: the recurrence restarts at every cu_seqlens boundary). Rewards at
    # mask-0 positions enter only their own output, so they are read only there.
    row = tl.program_id(0).to(tl.int64)
    gamma = join_float(gamma_0, gamma_1, gamma_2, ACC)
    base, length = _row_extent(cu_ptr, row, T, stride_row, PACKED)
    k = _scalar(0.0, ACC, BLOCK)
    hi = length
    while hi > 0:
        lo = tl.maximum(hi - BLOCK, 0)
        offs = hi - 1 - tl.arange(0, BLOCK).to(tl.int64)
        valid = offs >= lo
        r = tl.load(r_ptr + base + offs, mask=valid, other=0.0).to(ACC)
        nxt = offs + 1
        valid_next = valid & (nxt < length)
        m_next = tl.load(m_ptr + base + nxt, mask=valid_next, other=0).to(ACC)
        r_next = tl.load(r_ptr + base + nxt, mask=valid_next & (m_next != 0), other=0.0).to(ACC)
        A, B = tl.associative_scan((gamma * m_next, m_next * r_next), 0, _affine_combine)
        k_next = A * k + B
        tl.store(out_ptr + base + offs, r + gamma * k_next, mask=valid)
        k = _last(k_next, BLOCK)
        hi = lo


def _block() -> int:
    return BLOCK_INTERPRETER if interpreter_active() else BLOCK_GPU


def _chunk_and_tile(rows: int, length: int, device: torch.device) -> tuple[int, int]:
    """(chunk, tile): chunk length per program and the tile it scans at once.

    On CUDA, about 4 programs per SM: long rows are cut into power-of-two chunks of at least
    MIN_CHUNK_GPU, and a chunk shorter than BLOCK_GPU is scanned as one tile. Elsewhere (the
    interpreter) one chunk per row in tiles of BLOCK_INTERPRETER."""
    if device.type != "cuda" or interpreter_active():
        return max(BLOCK_INTERPRETER, triton.next_power_of_2(max(length, 1))), BLOCK_INTERPRETER
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks_per_row = max(1, -(-target // max(rows, 1)))
    chunk = max(MIN_CHUNK_GPU, triton.next_power_of_2(max(1, -(-length // chunks_per_row))))
    return chunk, min(BLOCK_GPU, chunk)


def _launch_gae(r, v, m, cu, rows, length, stride_row, gamma, lam, dtype, chunk_size):
    chunk, block = _chunk_and_tile(rows, length, r.device)
    if chunk_size is not None:  # any chunk works: the tile loop clips its last tile at the chunk start
        chunk = chunk_size
        block = min(block, triton.next_power_of_2(chunk))
    n_chunks = max(1, triton.cdiv(length, chunk))
    adv = torch.empty(r.shape, dtype=dtype, device=r.device)
    ret = torch.empty(r.shape, dtype=dtype, device=r.device)
    packed = cu is not None
    cu_arg = cu if packed else r  # unused when not packed
    acc = triton_dtype(dtype)
    scalars = split_float(gamma, lam)
    grid = (rows * n_chunks,)
    carry = None
    with device_guard(r):
        if n_chunks > 1:
            summary = torch.empty((rows, n_chunks, 5), dtype=dtype, device=r.device)
            carry = torch.zeros((rows, n_chunks, 2), dtype=dtype, device=r.device)
            _gae_summary_kernel[grid](
                r, v, m, summary, cu_arg, length, stride_row, n_chunks, chunk, *scalars,
                PACKED=packed, ACC=acc, BLOCK=block,
            )  # fmt: skip
            _gae_carry_kernel[(rows,)](
                summary, carry, cu_arg, length, n_chunks, chunk, PACKED=packed, ACC=acc, BLOCK=16
            )
        _gae_fwd_kernel[grid](
            r, v, m, adv, ret, carry if carry is not None else r, cu_arg,
            length, stride_row, n_chunks, chunk, *scalars,
            HAS_CARRY=carry is not None, PACKED=packed, ACC=acc, BLOCK=block,
        )  # fmt: skip
    return adv, ret


def gae_fwd(
    rewards, values, mask, gamma: float, lam: float, dtype: torch.dtype, chunk_size: int | None = None
):
    """(B, T) rewards/values/mask -> (advantages, returns) in ``dtype``. Inputs are validated by
    the caller (alignkit.gae); ``chunk_size`` overrides the split of T across programs."""
    r, v, m = rewards.contiguous(), values.contiguous(), mask_view(mask.contiguous())
    rows, length = r.shape
    if rows == 0 or length == 0:
        empty = torch.empty(r.shape, dtype=dtype, device=r.device)
        return empty, empty.clone()
    return _launch_gae(r, v, m, None, rows, length, length, gamma, lam, dtype, chunk_size)


def gae_packed_fwd(
    rewards,
    values,
    mask,
    cu_seqlens,
    gamma: float,
    lam: float,
    dtype: torch.dtype,
    chunk_size: int | None = None,
    max_seqlen: int | None = None,
):
    """(1, N) packed rewards/values/mask and ``cu_seqlens`` -> (advantages, returns).

    The grid is sized by ``max_seqlen``, a bound on the longest sequence. None reads the longest
    from ``cu_seqlens`` (validated, on the CPU: pass it there, a read of CUDA offsets is a device
    sync). With offsets already on the device and ``max_seqlen=N`` nothing is read back (no sync,
    capturable in a CUDA graph); programs past a sequence's end return at once."""
    r, v, m = rewards.contiguous(), values.contiguous(), mask_view(mask.contiguous())
    rows = cu_seqlens.numel() - 1
    if max_seqlen is None:
        cu_host = cu_seqlens.to(device="cpu", dtype=torch.int64)
        max_seqlen = int((cu_host[1:] - cu_host[:-1]).max()) if rows > 0 else 0
        cu_seqlens = cu_host
    if r.numel() == 0 or max_seqlen == 0:
        zeros = torch.zeros(r.shape, dtype=dtype, device=r.device)
        return zeros, zeros.clone()
    cu = _on_device(cu_seqlens, r.device)
    return _launch_gae(r, v, m, cu, rows, max_seqlen, 0, gamma, lam, dtype, chunk_size)


def _on_device(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` as the kernels read it: contiguous on ``device`` (copied only if elsewhere)."""
    return (cu_seqlens if cu_seqlens.device == device else cu_seqlens.to(device)).contiguous()


def discounted_returns_fwd(rewards, mask, gamma: float, dtype: torch.dtype, cu_seqlens=None) -> torch.Tensor:
    """(B, T) rewards/mask -> reward-to-go in ``dtype`` (one program per row); with validated
    ``cu_seqlens`` (CPU or already on the device: no host read either way), (1, N) packed rows, one
    program per sequence."""
    r, m = rewards.contiguous(), mask_view(mask.contiguous())
    out = torch.empty(r.shape, dtype=dtype, device=r.device)
    rows, length = r.shape
    packed = cu_seqlens is not None
    if packed:
        rows = cu_seqlens.numel() - 1
        cu = _on_device(cu_seqlens, r.device)
    if rows and length:
        with device_guard(r):
            _discounted_returns_kernel[(rows,)](
                r, m, out, cu if packed else r, length, length, *split_float(gamma),
                PACKED=packed, ACC=triton_dtype(dtype), BLOCK=_block(),
            )  # fmt: skip
    return out
