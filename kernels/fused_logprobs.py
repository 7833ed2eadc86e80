"""Triton kernels for token log-probs and entropy fused with the lm_head: hidden states and the
lm_head weight in, logits tiles computed in registers and dropped, the (N, V) logits never formed.

Math: that of kernels/logprobs.py (docs/formulas.md, "Log-probs and entropy"). Each logits tile
folds into the same online statistics (m, s, u) through the helpers shared from there
(``online_update``, ``row_floor``, ``dz_tile``, ``NEG_BIG``).

Kernels:
* ``_fused_linear_logprobs_fwd_kernel``: (BLOCK_N tokens) x (a split of the vocabulary) per
  program; each logits tile is ``tl.dot`` over H in fp32 and folded into the online statistics,
  then dropped. Splits write partial (m, s, u, z_label), combined on the host (O(N) work). The
  number of splits keeps the last wave of programs full (:func:`forward_splits`), and a GROUP_N
  swizzle of the 1-D grid makes co-resident programs share row blocks of hidden.
* ``_fused_linear_logprobs_bwd_kernel``: recomputes a (BLOCK_N, BLOCK_V) logits tile from the
  saved lse / H and writes dz for one chunk of rows; the host turns the (chunk, V) dz block into
  d hidden = dz @ W and d weight += dz^T h with two matmuls, then reuses the buffer. d weight
  sums in an fp32 (V, H) buffer, cast to the weight's dtype once at the end.

Precision of the dots (:func:`dot_precision`): fp16 / bf16 operands multiply exactly into fp32
accumulators. fp32 operands follow ``torch.get_float32_matmul_precision()``, like torch's own fp32
matmuls: ``"highest"`` (torch's default) -> ``input_precision="ieee"`` (exact products, FMA units),
``"high"`` / ``"medium"`` -> ``"tf32"`` (tensor cores). The op resolves it once in the forward and
reuses it in the backward. fp32 autotunes over its own smaller tiles (``_CONFIGS_FP32``): the bf16
tiles spill registers with fp32 operands and compile slowly in ieee.

Labels outside [0, V) that are not ``ignore_index`` give NaN (never a plausible wrong number).
Inputs: fp16 / bf16 / fp32 (fp32 accumulation); fp64 is served by the CPU implementation.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import device_guard, interpreter_active, pinned_configs
from .logprobs import NEG_BIG, dz_tile, online_update, row_floor


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # z = (h @ W^T + b) / T for rows offs_n, columns offs_v, fp32 accumulation over H.
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        offs_k = k + tl.arange(0, BLOCK_H)
        h = tl.load(
            h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :],
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < H),
            other=0.0,
        )  # (BLOCK_N, BLOCK_H)
        w = tl.load(
            w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None],
            mask=(offs_v[None, :] < V) & (offs_k[:, None] < H),
            other=0.0,
        )  # (BLOCK_H, BLOCK_V): W^T tile
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _fused_linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, floor_ptr, m_ptr, s_ptr, u_ptr, zl_ptr,
    N, V, H, stride_hn, stride_wv, inv_temp, max_splits,
    HAS_BIAS: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # A 1-D grid of row_blocks x splits programs (the host picks splits: forward_splits). Program
    # (pid_n, split) takes rows [pid_n BLOCK_N, +BLOCK_N) over the split-th range of
    # ceil(tiles / splits) vocabulary tiles of BLOCK_V columns, and writes partial (m, s, u, z_label)
    # to row `split` of the (max_splits, N) buffers; the host combines the rows.
    #
    # GROUP_N swizzle (grouped ordering of Triton's matmul tutorial; Apple's CCE): consecutive
    # program ids, which run at the same time, walk GROUP_N row blocks fastest, then the splits, so
    # co-resident programs share GROUP_N row blocks of hidden (re-read from L2, not HBM, for every
    # vocabulary tile) and few weight splits. A bijection: the result does not depend on GROUP_N.
    #   pid -> group = pid // (GROUP_N splits), rows of the group = min(GROUP_N, row_blocks - first)
    #   pid_n = first + (pid mod GROUP_N splits) mod rows,  split = (pid mod GROUP_N splits) // rows
    pid = tl.program_id(0).to(tl.int64)
    row_blocks = tl.cdiv(N, BLOCK_N)
    splits = tl.num_programs(0).to(tl.int64) // row_blocks
    in_group = GROUP_N * splits
    first = (pid // in_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first, GROUP_N)
    pid_n = first + (pid % in_group) % group_rows
    split = (pid % in_group) // group_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    labels = tl.load(labels_ptr + offs_n, mask=offs_n < N, other=-1)
    floor = row_floor(floor_ptr, offs_n, offs_n < N, HAS_FLOOR)
    m = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    split_cols = tl.cdiv(tl.cdiv(V, BLOCK_V), splits) * BLOCK_V
    v_start = split * split_cols
    v_stop = tl.minimum(v_start + split_cols, V)  # an empty range (v_start >= V) leaves the neutral stats
    for v in range(v_start, v_stop, BLOCK_V):
        offs_v = v + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temp,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        z_label += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
        m, s, u = online_update(m, s, u, z, (offs_v < V)[None, :] & ~(z < floor[:, None]))
    keep = offs_n < N
    out = split * N + offs_n
    tl.store(m_ptr + out, m, mask=keep)
    tl.store(s_ptr + out, s, mask=keep)
    tl.store(u_ptr + out, u, mask=keep)
    tl.store(zl_ptr + out, z_label, mask=keep)
    # Buffer rows [splits, max_splits) belong to no program of this launch (the host sizes the
    # buffers for the autotune config with the most splits): they get the neutral statistics, which
    # drop out of the combine, at every launch (autotuning runs configs into the same buffers).
    for extra in range(split + splits, max_splits, splits):
        out = extra * N + offs_n
        tl.store(m_ptr + out, tl.full((BLOCK_N,), NEG_BIG, tl.float32), mask=keep)
        tl.store(s_ptr + out, tl.zeros((BLOCK_N,), tl.float32), mask=keep)
        tl.store(u_ptr + out, tl.zeros((BLOCK_N,), tl.float32), mask=keep)
        tl.store(zl_ptr + out, tl.zeros((BLOCK_N,), tl.float32), mask=keep)


@triton.jit
def _fused_linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, floor_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dz_ptr,
    N, V, H, stride_hn, stride_wv, stride_dzn, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # dz tile (rows offs_n, columns offs_v) from the recomputed logits and the saved lse / H.
    # Ignored rows and rows without upstream gradient get exactly 0 (their hidden states may be NaN).
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
    keep = row_ok & (labels != ignore_index)
    floor = row_floor(floor_ptr, offs_n, row_ok, HAS_FLOOR)
    g_logp = tl.load(g_logp_ptr + offs_n, mask=keep, other=0.0)
    g_ent = tl.load(g_ent_ptr + offs_n, mask=keep, other=0.0)
    active = (g_logp != 0) | (g_ent != 0)
    z = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv, inv_temp,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
    )  # fmt: skip
    dz = tl.where(active[:, None], dz_tile(z, lse, ent, g_logp, g_ent, labels, offs_v, inv_temp, floor), 0.0)
    tl.store(
        dz_ptr + offs_n[:, None] * stride_dzn + offs_v[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_v[None, :] < V),
    )


# Autotune configs of the fused kernels, (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); the
# first is the pinned one (ALIGNKIT_PIN_CONFIG). Each compiles for sm_90 without register spills
# (tests/compile_kernels_sm90.py fails on a spilling config; it reports registers per config): on
# sm_90 a (BLOCK_N, BLOCK_V) fp32 tile costs BLOCK_N * BLOCK_V / (32 * num_warps) registers per
# thread for each copy the online softmax keeps live, so 128 x 256 tiles spill at 8 warps and
# every 4-warp config with 8192-element tiles spills; they were dropped.
_CONFIGS_16BIT = [
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 8, 3),
]
# fp32 operands (input_precision "ieee" or "tf32", see dot_precision): smaller tiles. An ieee fp32
# dot is FMA-based and holds its operands in registers, so the bf16 tiles spill there by kilobytes
# and take seconds to compile; these compile quickly and spill in neither precision.
_CONFIGS_FP32 = [
    (64, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
]


def _matmul_configs(dtype: torch.dtype = torch.bfloat16) -> list:
    """Autotune configs for the fused kernels with ``dtype`` operands (fp16 shares bf16's list). The
    pipelined operand tiles take ``(stages - 1) * (BLOCK_N + BLOCK_V) * BLOCK_H * itemsize`` bytes
    of shared memory, within sm_90's 232,448 for every config."""
    table = _CONFIGS_FP32 if dtype == torch.float32 else _CONFIGS_16BIT
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=warps, num_stages=stages)
        for bn, bv, bh, warps, stages in table
    ]


# Compiled (CUDA) launches autotune (the interpreter runs one small config, INTERPRETER_BLOCKS).
# One autotuner per (kernel, operand dtype, row bucket): fp32 gets its own config list, and the
# tuned choice is keyed on the rows of the launch bucketed to a power of two in
# [_MIN_N_BUCKET, _MAX_N_BUCKET] (a config picked on a tiny first call is not reused for large N).
# The autotuners wrap the same JIT functions, so buckets share compiled kernels.
_MIN_N_BUCKET = 64
_MAX_N_BUCKET = 16384
_AUTOTUNED: dict = {}


def _n_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), _MIN_N_BUCKET), _MAX_N_BUCKET)


def _autotuned(kernel, dtype: torch.dtype, n: int, precision: str):  # pragma: no cover - needs a GPU
    dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 shares bf16's list
    # The precision is a constexpr the autotuner's key does not see: one tuner per precision.
    key = (kernel.__name__, dtype, precision, _n_bucket(n))
    tuner = _AUTOTUNED.get(key)
    if tuner is None:
        # ALIGNKIT_PIN_CONFIG=1 keeps the first config (a first GPU run: no autotuning sweep).
        tuner = triton.autotune(configs=pinned_configs(_matmul_configs(dtype)), key=["V", "H", "HAS_BIAS"])(
            kernel
        )
        _AUTOTUNED[key] = tuner
    return tuner


INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}

# Row blocks per swizzle group of the forward grid (GROUP_N of _fused_linear_logprobs_fwd_kernel):
# 8 row blocks of 128 rows x H = 4096 in bf16 are 8 MiB of hidden shared by the programs in flight,
# well inside the 50 MiB L2 of an H100 / H200, as in Triton's matmul tutorial (GROUP_SIZE_M = 8).
GROUP_N = 8
# The SM count assumed where none can be read (no CUDA device, the interpreter): H100 / H200 SXM.
DEFAULT_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), else :data:`DEFAULT_SM_COUNT`."""
    if device.type == "cuda" and not interpreter_active():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


@functools.lru_cache(maxsize=1024)
def forward_splits(n_rows: int, vocab: int, block_n: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits of the fused forward for ``n_rows`` x ``vocab`` in (block_n, block_v) tiles
    on ``sm_count`` SMs: the grid has ``row_blocks x splits`` programs, each running
    ``ceil(tiles / splits)`` vocabulary tiles (``row_blocks = ceil(n_rows / block_n)``,
    ``tiles = ceil(vocab / block_v)``).

    Model: every program costs the same, one program is resident per SM (at 8 warps the pinned
    configs hold 180-200 registers per thread, over half the register file; a config of <= 128
    fits two, for which the model stays conservative), so a launch takes
    ``waves x ceil(tiles / splits)`` tile-times with ``waves = ceil(programs / sm_count)``. Picks the
    splits of least time, the fewest on ties, never a split with no tile: programs come out close
    to a whole number of waves (N = 4096, V = 152064, 128 x 128 tiles, 132 SMs: 32 x 33 = 1056
    programs, exactly 8 waves of 36 tiles, the ideal 32 x 1188 / 132 tile-times).
    """
    if min(block_n, block_v, sm_count) < 1 or n_rows < 0 or vocab < 1:
        raise ValueError(
            f"forward_splits needs n_rows >= 0, vocab >= 1 and positive block_n, block_v, sm_count; got "
            f"n_rows={n_rows}, vocab={vocab}, block_n={block_n}, block_v={block_v}, sm_count={sm_count}"
        )
    row_blocks = -(-n_rows // block_n)
    tiles = -(-vocab // block_v)
    best_splits, best_time = 1, None
    for splits in range(1, tiles + 1):  # O(tiles) integer steps (< 1 ms), cached per shape
        tiles_per_split = -(-tiles // splits)
        if -(-tiles // tiles_per_split) != splits:
            continue  # a split would be empty: fewer splits of as many tiles take the same time
        time = -(-row_blocks * splits // sm_count) * tiles_per_split
        if best_time is None or time < best_time:
            best_splits, best_time = splits, time
    return best_splits


DOT_PRECISIONS = ("ieee", "tf32")
# torch.get_float32_matmul_precision() -> the tl.dot input precision of fp32 operands.
_FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def dot_precision(dtype: torch.dtype, matmul_precision: str | None = None) -> str:
    """The ``tl.dot`` input precision of the fused kernels for ``dtype`` operands.

    fp32 follows ``matmul_precision`` (default: ``torch.get_float32_matmul_precision()``, read at
    the call), as torch's own fp32 matmuls do: ``"highest"`` (torch's default) -> ``"ieee"``
    (exact fp32 products, FMA units), ``"high"`` / ``"medium"`` -> ``"tf32"`` (tensor cores, 10-bit
    mantissa products, fp32 accumulation). fp16 / bf16 operands are exact in the fp32 accumulator
    whatever the setting: ``"tf32"`` is passed and has no effect on them.
    """
    if matmul_precision is None:
        matmul_precision = torch.get_float32_matmul_precision()
    if matmul_precision not in _FP32_DOT_PRECISION:
        raise ValueError(
            f"matmul_precision must be one of {sorted(_FP32_DOT_PRECISION)}, got {matmul_precision!r}"
        )
    return _FP32_DOT_PRECISION[matmul_precision] if dtype == torch.float32 else "tf32"


def _resolve_precision(dtype: torch.dtype, input_precision: str | None) -> str:
    if input_precision is None:
        return dot_precision(dtype)
    if input_precision not in DOT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {DOT_PRECISIONS} or None, got {input_precision!r}")
    return input_precision if dtype == torch.float32 else "tf32"


def _interpreter_operands(hidden, weight, bias):
    """Under the Triton interpreter, fp16/bf16 ``tl.dot`` operands are not emulated (the products
    come out wrong), so the launchers hand it fp32 copies; compiled launches use the inputs as is."""
    if not interpreter_active() or hidden.dtype == torch.float32:
        return hidden, weight, bias
    return hidden.float(), weight.float(), None if bias is None else bias.float()


def _blocks(blocks: dict | None) -> dict:
    if blocks is not None:
        return dict(blocks)
    return dict(INTERPRETER_BLOCKS) if interpreter_active() else {}


def fused_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    logit_floor: torch.Tensor | None = None,
    splits: int | None = None,
    blocks: dict | None = None,
    input_precision: str | None = None,
    group_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,), optional fp32 logit floor (N,)
    -> fp32 logp, entropy, lse.

    ``input_precision`` (``"ieee"`` / ``"tf32"``) of fp32 dots; default :func:`dot_precision`
    (``torch.get_float32_matmul_precision()``). Ignored for fp16 / bf16.

    ``splits`` cuts the vocabulary into that many ranges of whole BLOCK_V tiles, run by separate
    programs (at most one per tile); default: :func:`forward_splits` for the launch's tiles and
    :func:`sm_count` (no partial last wave). ``blocks`` (BLOCK_N / BLOCK_V / BLOCK_H) overrides the
    tile sizes (tests; disables autotuning). ``group_n``: row blocks per swizzle group of the grid
    (default :data:`GROUP_N`; any value gives the same result).
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and labels.is_contiguous()
    assert hidden.dtype == weight.dtype and hidden.dtype in (torch.float16, torch.bfloat16, torch.float32)
    precision = _resolve_precision(hidden.dtype, input_precision)
    hidden, weight, bias = _interpreter_operands(hidden, weight, bias)
    device = hidden.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone(), empty.clone()
    blk = _blocks(blocks)
    sms = sm_count(device)

    def splits_of(block_n: int, block_v: int) -> int:  # for one config's tiles
        tiles = triton.cdiv(vocab, block_v)
        if splits is None:
            return forward_splits(n, vocab, block_n, block_v, sms)
        return min(max(1, int(splits)), tiles)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]) * splits_of(meta["BLOCK_N"], meta["BLOCK_V"]),)

    kernel = _fused_linear_logprobs_fwd_kernel
    if blk:
        configs = [blk]
    else:  # pragma: no cover - autotuned, needs a GPU
        kernel = _autotuned(_fused_linear_logprobs_fwd_kernel, hidden.dtype, n, precision)
        configs = [cfg.kwargs for cfg in kernel.configs]
    # Sized for the config with the most splits; the kernel fills the rows its launch leaves.
    max_splits = max(splits_of(c["BLOCK_N"], c["BLOCK_V"]) for c in configs)
    partial = torch.empty((4, max_splits, n), dtype=torch.float32, device=device)
    m, s, u, z_label = partial.unbind(0)
    args = (
        hidden, weight, bias if bias is not None else hidden, labels,
        logit_floor if logit_floor is not None else m, m, s, u, z_label,
        n, vocab, hdim, hidden.stride(0), weight.stride(0), 1.0 / temperature, max_splits,
    )  # fmt: skip
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_FLOOR": logit_floor is not None,
        "GROUP_N": GROUP_N if group_n is None else group_n,
        "DOT_PRECISION": precision,
    }
    with device_guard(hidden):
        if blk:
            kernel[grid(blk)](*args, **flags, **blk)
        else:  # pragma: no cover - autotuned, needs a GPU
            kernel[grid](*args, **flags)
    return _combine(m, s, u, z_label, labels, vocab, ignore_index, logit_floor)


def _combine(m, s, u, z_label, labels, vocab: int, ignore_index: int, logit_floor=None):
    """Merge per-split (splits, N) statistics into logp, entropy, lse (N,). Empty splits have
    m = NEG_BIG, s = u = 0 and drop out (weight exp(m - M) = 0, (m - M) s = 0). A label below the
    logit floor has probability 0: logp = -inf."""
    m_all = m.amax(dim=0)
    alpha = torch.exp(m - m_all)
    s_all = (alpha * s).sum(dim=0)
    u_all = (alpha * (u + (m - m_all) * s)).sum(dim=0)
    log_s = torch.log(s_all)
    ent = log_s - u_all / s_all
    z_label = z_label.sum(dim=0)
    logp = (z_label - m_all) - log_s
    if logit_floor is not None:
        logp = torch.where(z_label < logit_floor, -float("inf"), logp)
    keep = labels != ignore_index
    logp = torch.where(keep & ((labels < 0) | (labels >= vocab)), float("nan"), logp)
    zero = torch.zeros_like(logp)
    return torch.where(keep, logp, zero), torch.where(keep, ent, zero), m_all + log_s


def default_chunk_rows(n: int, hdim: int, vocab: int) -> int:
    """Rows per backward chunk: a (chunk, V) dz block about the size of hidden (N, H), at least
    1024 rows (the reduction depth of the d weight matmul), a multiple of 128."""
    rows = max(1024, triton.cdiv(n * hdim, vocab))
    return min(triton.cdiv(rows, 128) * 128, max(n, 1))


def fused_linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor,
    temperature: float,
    ignore_index: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
    chunk_rows: int | None = None,
    logit_floor: torch.Tensor | None = None,
    blocks: dict | None = None,
    input_precision: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) from the upstream ``g_logp`` / ``g_ent`` (N,) fp32. Rows whose
    label is ``ignore_index`` or whose upstream gradients are both 0 contribute exactly nothing,
    whatever their hidden states hold (the same contract as the CPU implementation).

    Per chunk of rows the kernel writes dz (chunk, V) in the input dtype (fp32 products for
    fp32, in ``input_precision`` as in the forward); d hidden = dz @ W and d weight += dz^T h are
    matmuls on that block. d bias and d weight accumulate over the chunks in fp32 and are cast to
    the parameters' dtype once at the end (:func:`accumulate_weight_grad`): for 16-bit weights
    that is a transient fp32 (V, H) buffer, twice the weight's size.
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs
    device = hidden.device
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    precision = _resolve_precision(hidden.dtype, input_precision)
    hidden, weight, bias = _interpreter_operands(hidden, weight, bias)
    d_hidden = torch.empty_like(hidden) if need_h else None
    # Rounding the running sum to bf16 once per chunk (16 times at N = 16k) would lose the small
    # late contributions and read-modify-write the whole bf16 weight each time: the sum is fp32.
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
    need_b = need_b and bias is not None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    chunk_rows = chunk_rows or default_chunk_rows(n, hdim, vocab)
    blk = _blocks(blocks)
    dz_buffer = torch.empty((min(chunk_rows, n), vocab), dtype=hidden.dtype, device=device)
    g_logp, g_ent = g_logp.contiguous(), g_ent.contiguous()
    active = (labels != ignore_index) & ((g_logp != 0) | (g_ent != 0))  # (N,)
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_FLOOR": logit_floor is not None,
        "DOT_PRECISION": precision,
    }
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        rows = stop - start
        h = hidden[start:stop]
        dz = dz_buffer[:rows]
        args = (
            h, weight, bias if bias is not None else hidden, labels[start:stop],
            logit_floor[start:stop] if logit_floor is not None else lse, lse[start:stop],
            ent[start:stop], g_logp[start:stop], g_ent[start:stop], dz,
            rows, vocab, hdim, hidden.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature,
            ignore_index,
        )  # fmt: skip
        with device_guard(hidden):
            if blk:
                _fused_linear_logprobs_bwd_kernel[
                    (triton.cdiv(rows, blk["BLOCK_N"]), triton.cdiv(vocab, blk["BLOCK_V"]))
                ](*args, **flags, **blk)
            else:  # pragma: no cover - autotuned, needs a GPU
                kernel = _autotuned(_fused_linear_logprobs_bwd_kernel, hidden.dtype, rows, precision)
                kernel[
                    lambda meta, r=rows: (
                        triton.cdiv(r, meta["BLOCK_N"]),
                        triton.cdiv(vocab, meta["BLOCK_V"]),
                    )
                ](*args, **flags)
        if d_hidden is not None:
            torch.mm(dz, weight, out=d_hidden[start:stop])
        if d_weight is not None:  # inactive rows of h may hold NaN: 0 * NaN must not reach d weight
            accumulate_weight_grad(d_weight, dz, torch.where(active[start:stop, None], h, h.new_zeros(())))
        if d_bias is not None:
            d_bias += dz.sum(dim=0, dtype=torch.float32)
    if d_hidden is not None:
        d_hidden = d_hidden.to(dtypes[0])
    if d_weight is not None:
        d_weight = d_weight.to(dtypes[1])
    if d_bias is not None:
        d_bias = d_bias.to(dtypes[2])
    return d_hidden, d_weight, d_bias


# Per device type: whether torch.addmm(out_dtype=torch.float32) runs (16-bit operands, fp32 C:
# cuBLAS adds the product into the fp32 sum in its epilogue). CUDA builds of recent torch have
# it; CPU builds and older torch do not.
_MIXED_ADDMM: dict[str, bool] = {}


def _mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = f"{device.type}:{dtype}"
    if key not in _MIXED_ADDMM:
        try:  # a 2 x 2 probe, once per process and device type: the result is checked, not trusted
            a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device, dtype=dtype)
            acc = torch.ones(2, 2, device=device, dtype=torch.float32)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            expected = torch.tensor([[8.0, 11.0], [16.0, 23.0]], device=device)
            _MIXED_ADDMM[key] = bool(torch.equal(acc, expected))
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM[key] = False
    return _MIXED_ADDMM[key]


def accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += dz^T h`` in place: acc (V, H) fp32, dz (rows, V) and h (rows, H) in the operands'
    dtype. fp32 operands: one addmm. 16-bit operands: a 16-bit GEMM with an fp32 output that adds
    into ``acc`` (``torch.addmm(..., out_dtype=torch.float32)``) where torch supports it, else the
    chunk's product rounded once to 16 bits and added in fp32 (each chunk's contribution rounds,
    never the running sum)."""
    assert acc.dtype == torch.float32 and dz.dtype == h.dtype
    if dz.dtype == torch.float32:
        acc.addmm_(dz.T, h)
    elif _mixed_addmm_works(acc.device, dz.dtype):
        torch.addmm(acc, dz.T, h, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(dz.T, h)
