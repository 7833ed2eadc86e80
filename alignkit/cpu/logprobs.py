"""Chunked-torch token log-probs and entropy (the CPU twins of kernels/logprobs.py and
kernels/fused_logprobs.py).

Formulas: docs/formulas.md ("Log-probs and entropy"). Per token, with ``z = x / T``::

    log p = log_softmax(z);  logp = log p[label];  H = -sum_j p_j log p_j;  lse = m + log s

(torch's fused log_softmax subtracts the max first: ``log p <= 0``, so ``logp <= 0`` and ``H``, a
sum of non-negative terms, ``>= 0`` hold in floating point; nothing cancels for logits of
magnitude 1e4; the entropy pass is skipped when it is not asked for). Gradient, per token::

    dz_j = g_logp (1[j = label] - p_j) - g_H p_j (log p_j + H),   d x = dz / T

(``z_j - (lse - H) = log p_j + H``). Rows are processed ``chunk_rows`` at a time, so at most one
(chunk_rows, V) block of logits exists at any moment (never the (N, V) matrix for the fused
form); the fused backward recomputes each chunk's logits from the saved ``lse`` and ``H``.

Works on any device (these are plain torch ops); it is also the fp64 path of the Triton backend.
"""

from __future__ import annotations

import torch

from .._checks import accumulation_dtype

# Elements of one (rows, V) logits chunk: 2**23 fp32 = 32 MiB per temporary.
CHUNK_ELEMENTS = 1 << 23

# Below this log-probability p = exp(log p) is 0 in every float dtype (fp64 underflows at -745), so
# clamping log p there changes no p * log p product with p > 0 and keeps 0 * log 0 (p = 0, e.g. a
# logit of -inf) at 0 instead of NaN.
LOG_P_FLOOR = -1.0e4


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _apply_floor_(z: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor | None:
    """Entries of the scaled logits z (rows, V) below the row's logit floor leave the distribution:
    set to -inf in place (p = 0, no gradient). Returns the kept entries, or None without a floor."""
    if floor is None:
        return None
    dropped = z < floor.to(z.dtype)[:, None]  # (NaN is kept: it must stay visible)
    z.masked_fill_(dropped, -float("inf"))
    return ~dropped


def _label_mask(labels: torch.Tensor, vocab: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, safe_labels): valid marks non-ignored rows; safe labels index inside [0, V)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).clamp(0, vocab - 1)
    return valid, safe


def _stats(z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, vocab: int, need_entropy: bool):
    """logp, entropy (zeros unless ``need_entropy``), lse of one chunk of scaled logits z (rows, V).

    Passes over the chunk: max, log_softmax (+ exp and a row dot for the entropy). ``lse`` is
    ``m - log_p[argmax]``, which is exactly ``m + log s`` as log_softmax computed it."""
    m, argmax = z.max(dim=-1)
    log_p = torch.log_softmax(z, dim=-1)  # (rows, V), <= 0
    lse = m - log_p.gather(-1, argmax[:, None]).squeeze(-1)
    logp = log_p.gather(-1, labels.clamp(0, vocab - 1)[:, None]).squeeze(-1)
    # An unchecked label outside [0, V) gives NaN, never a silently wrong number.
    out_of_range = valid & ((labels < 0) | (labels >= vocab))
    logp = torch.where(out_of_range, torch.full_like(logp, float("nan")), logp)
    zero = torch.zeros_like(logp)
    # H = -sum p log p, a sum of non-negative terms (vecdot: fused, and as exact as mul + sum)
    # (log p is clamped where p underflows to 0, e.g. logits of -inf: 0 * log 0 counts as 0, not NaN)
    ent = -torch.linalg.vecdot(log_p.exp(), log_p.clamp_(min=LOG_P_FLOOR)) if need_entropy else zero
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero), lse


def _dz_(z: torch.Tensor, labels: torch.Tensor, lse, ent, g_logp, g_ent, inv_temp: float) -> torch.Tensor:
    """d logits = dz / T for the scaled logits z (rows, V), which it overwrites (g_* zero on
    ignored rows); the result may live in z's buffer or in a new one.

    dz / T = -p (a log p + c) + 1[j = label] g_logp / T with a = g_H / T, c = (g_H H + g_logp) / T.
    """
    log_p = z.sub_(lse[:, None])
    p = log_p.exp()
    if bool((g_ent != 0).any()):
        log_p.clamp_(min=LOG_P_FLOOR)  # where p == 0 (logit -inf) the term is 0, not 0 * inf
        a = (g_ent * -inv_temp)[:, None]
        c = ((g_ent * ent + g_logp) * -inv_temp)[:, None]
        dz = log_p.mul_(a).add_(c).mul_(p)
    else:  # no entropy gradient (the common case): one pass fewer
        dz = p.mul_((g_logp * -inv_temp)[:, None])
    return dz.scatter_add_(-1, labels[:, None], (g_logp * inv_temp)[:, None])


def _grads_in(labels, ignore_index, vocab, g_logp, g_ent, n, dtype, device):
    """(safe labels, g_logp, g_ent, active): upstream gradients zeroed on ignored rows, and the rows
    that have any (the others contribute exactly nothing, whatever their inputs hold)."""
    valid, safe = _label_mask(labels, vocab, ignore_index)
    zeros = torch.zeros(n, dtype=dtype, device=device)
    g_logp = zeros if g_logp is None else torch.where(valid, g_logp.to(dtype), zeros)
    g_ent = zeros if g_ent is None else torch.where(valid, g_ent.to(dtype), zeros)
    return safe, g_logp, g_ent, (g_logp != 0) | (g_ent != 0)


def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_rows: int | None = None,
    need_entropy: bool = True,
    logit_floor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,), optional logit floor (N,) -> logp, entropy, lse, each (N,) in the
    compute dtype (under the distribution truncated at the floor)."""
    n, vocab = logits.shape
    dtype = accumulation_dtype(logits)
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    logp, ent, lse = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(3))
    valid = labels != ignore_index
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        z = logits[rows].to(dtype) / temperature
        _apply_floor_(z, None if logit_floor is None else logit_floor[rows])
        logp[rows], ent[rows], lse[rows] = _stats(z, labels[rows], valid[rows], vocab, need_entropy)
    return logp, ent, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    out: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    logit_floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """d logits (N, V) in logits' dtype; ``out`` may be ``logits`` itself (in-place backward)."""
    n, vocab = logits.shape
    dtype = lse.dtype
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    safe, g_logp, g_ent, active = _grads_in(
        labels, ignore_index, vocab, g_logp, g_ent, n, dtype, logits.device
    )
    if out is None:
        out = torch.empty_like(logits)
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        z = logits[rows].to(dtype) / temperature
        kept = _apply_floor_(z, None if logit_floor is None else logit_floor[rows])
        dz = _dz_(z, safe[rows], lse[rows], ent[rows], g_logp[rows], g_ent[rows], 1.0 / temperature)
        live = active[rows, None] if kept is None else active[rows, None] & kept
        out[rows] = dz.masked_fill_(~live, 0.0)  # in place (no second block); padding may hold NaN
    return out


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """(h @ W^T + b) / T, the temperature folded into the matmul."""
    if bias is None:
        return h @ weight.T if temperature == 1.0 else torch.mm(h, weight.T).mul_(1.0 / temperature)
    return torch.addmm(bias, h, weight.T, beta=1.0 / temperature, alpha=1.0 / temperature)


def fused_linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_rows: int | None = None,
    need_entropy: bool = True,
    logit_floor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, optional logit floor (N,) -> logp, entropy,
    lse (N,), compute dtype.

    Logits exist one (chunk_rows, V) block at a time. Half-precision weights are upcast to fp32
    once (one weight-sized copy), so the matmul accumulates and rounds in fp32.
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dtype = accumulation_dtype(hidden)
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    logp, ent, lse = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(3))
    valid = labels != ignore_index
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        z = _linear(hidden[rows].to(dtype), w, b, temperature)  # (rows, V)
        _apply_floor_(z, None if logit_floor is None else logit_floor[rows])
        logp[rows], ent[rows], lse[rows] = _stats(z, labels[rows], valid[rows], vocab, need_entropy)
    return logp, ent, lse


def fused_linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
    chunk_rows: int | None = None,
    logit_floor: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias), recomputing each chunk's logits; ``needs`` selects which.

    d weight and d bias are accumulated in the compute dtype over chunks, then cast once.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    need_h, need_w, need_b = needs
    safe, g_logp, g_ent, active = _grads_in(
        labels, ignore_index, vocab, g_logp, g_ent, n, dtype, hidden.device
    )
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros_like(w) if need_w else None
    d_bias = torch.zeros(vocab, dtype=dtype, device=hidden.device) if need_b and bias is not None else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        if not bool(active[rows].any()):  # rows with no upstream gradient contribute nothing
            continue
        # Their hidden states may hold NaN (padding): selected away before any product.
        h = torch.where(
            active[rows, None], hidden[rows].to(dtype), torch.zeros((), dtype=dtype, device=hidden.device)
        )
        z = _linear(h, w, b, temperature)
        kept = _apply_floor_(z, None if logit_floor is None else logit_floor[rows])
        dz = _dz_(z, safe[rows], lse[rows], ent[rows], g_logp[rows], g_ent[rows], 1.0 / temperature)
        live = active[rows, None] if kept is None else active[rows, None] & kept
        dz.masked_fill_(~live, 0.0)  # in place (no second block): inactive rows' saved lse may be NaN
        if d_hidden is not None:
            d_hidden[rows] = dz @ w
        if d_weight is not None:
            d_weight.addmm_(dz.T, h)
        if d_bias is not None:
            d_bias += dz.sum(dim=0)
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias
