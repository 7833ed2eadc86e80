"""One sampling step: the next token, its log-prob and the logit floor, together.

The distribution (docs/formulas.md "Rollout log-probs", "Truncated sampling and the logit floor")::

    z      = logits / temperature                       # fp32, computed as logits * (1 / temperature)
    S      = top-k of z (ties at the k-th value kept), then top-p of the renormalised rest, as HF
             orders them: drop the ascending prefix whose cumulative probability is <= 1 - top_p
    floor  = (min_{j in S} z_j + max_{j not in S} z_j) / 2   # -inf when S is the whole vocabulary
    token  ~ softmax(z over {z_j >= floor})
    logp   = z[token] - logsumexp_{z_j >= floor} z_j

The floor sits strictly between the kept and the dropped values, so ``S = {j : z_j >= floor}`` and a
recomputation whose z differs by less than half the gap keeps the same set. Where the midpoint
rounds onto the largest dropped value (the two are adjacent floats) the floor is the smallest kept
value itself. Greedy (``temperature == 0``): ``token = argmax(logits)``, the log-prob at temperature
1 over the whole vocabulary, no floor.

Randomness is per row (alignkit/rollout/random_streams.py): each row brings an int64 key (from its
prompt's seed and its sample index) and the step is the counter, so a row's draw never depends on
the other rows of the batch, its size or which rows have finished.

Backends: on CUDA one Triton kernel does all of it (kernels/sampling.py, a row per program,
Gumbel-max with Philox keyed by the row's key, counter ``step * V + vocabulary index``); on CPU the
torch code below, which samples by inverse CDF (two-level for large vocabularies) with one uniform
per row and step
(``random_streams.step_uniforms_no_sync``: a counter-based hash, cheaper than the vocabulary-sized
exponential draw ``torch.multinomial`` makes). The two backends draw different random streams: keys
repeat exactly on the same backend and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backend as _backend
from .random_streams import step_uniforms_no_sync

_backend.register_op("rollout.sample")


@dataclass(frozen=True)
class SampleResult:
    """What one step returns, per row of the batch."""

    token: torch.Tensor  # (b,) int64 sampled (or greedy) token
    logprob: torch.Tensor  # (b,) float32 its log-prob under the processed distribution
    floor: torch.Tensor | None  # (b,) float32 logit floor; None without truncation (or greedy)


def truncation_floor(z: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """The logit floor (b,) of fp32 ``z`` (b, V) under top-k then top-p (-inf: nothing dropped).

    top-k keeps ``z >= k-th largest`` (HF's ``TopKLogitsWarper``); top-p sorts the survivors
    ascending and drops the prefix whose cumulative probability is <= 1 - top_p, keeping at least one
    (HF's ``TopPLogitsWarper``). Ties at the cut are kept: the kept set is always ``z >= floor``."""
    vocab = z.shape[-1]
    neg_inf = torch.tensor(float("-inf"), device=z.device, dtype=z.dtype)
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (b, 1)
    else:
        kth = None
    if top_p < 1.0:
        truncated = z if kth is None else z.masked_fill(z < kth, neg_inf)
        ascending = torch.sort(truncated, dim=-1).values
        cumulative = ascending.softmax(-1).cumsum(-1)
        removed = (cumulative <= 1.0 - top_p).sum(-1, keepdim=True).clamp_max(vocab - 1)  # a prefix
        smallest_kept = ascending.gather(-1, removed)
    elif kth is not None:
        smallest_kept = kth
    else:
        return torch.full(z.shape[:-1], float("-inf"), device=z.device, dtype=z.dtype)
    largest_dropped = z.masked_fill(z >= smallest_kept, neg_inf).amax(-1, keepdim=True)
    mid = (smallest_kept + largest_dropped) * 0.5
    # -inf when nothing is dropped (largest_dropped = -inf); the kept value when the midpoint rounds
    # onto the dropped one (adjacent floats).
    floor = torch.where(mid > largest_dropped, mid, smallest_kept)
    floor = torch.where(largest_dropped == neg_inf, neg_inf, floor)
    return floor.squeeze(-1)


_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF
_LOG2E = 1.4426950408889634


def _inverse_cdf_no_sync(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(b,) index of each row's first entry of ``mass`` (b, V), non-negative with positive rows,
    whose cumulative mass exceeds ``u * total`` (``u`` (b,) in [0, 1)): always an entry of positive
    mass. Two levels for large vocabularies (cumulative sums of 256-entry blocks, then of the chosen
    block only): a full-row ``cumsum`` is sequential, the block sums are vectorised. A row with NaN
    mass (a model that produced NaN logits) gets some index inside the vocabulary, never past it;
    the engine reports such rows."""
    rows, vocab = mass.shape
    zero = mass.new_zeros(())
    if vocab < 4 * _BLOCK:
        cdf = mass.cumsum(-1)
        total = cdf[:, -1:]
        x = torch.minimum(u[:, None] * total, torch.nextafter(total, zero))
        return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_max_(vocab - 1)
    if vocab % _BLOCK:
        mass = torch.nn.functional.pad(mass, (0, -vocab % _BLOCK))  # zero mass: never drawn
    blocks = mass.view(rows, -1, _BLOCK)
    sums = blocks.sum(-1)  # (b, nb)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, zero))  # (b, 1) in [0, total)
    j = torch.searchsorted(cdf, x, right=True)  # first block past x: cdf[j - 1] <= x < cdf[j]
    j = j.clamp_max_(cdf.shape[-1] - 1)  # only NaN rows reach past the last block
    before = torch.where(j > 0, cdf.gather(-1, (j - 1).clamp_min(0)), zero)
    inner = blocks.gather(1, j[:, :, None].expand(rows, 1, _BLOCK)).squeeze(1).cumsum(-1)  # (b, BLOCK)
    x = torch.minimum(x - before, torch.nextafter(inner[:, -1:], zero))  # >= 0, below the block's mass
    within = torch.searchsorted(inner, x, right=True).clamp_max_(_BLOCK - 1)
    return (j * _BLOCK + within).squeeze(-1).clamp_max_(vocab - 1)


def _sample_cpu(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, keys: torch.Tensor, step: int
) -> SampleResult:
    # logits (b, V); fp32 math throughout.
    z = logits.float()
    if temperature == 0.0:
        token = z.argmax(-1)
        logprob = torch.log_softmax(z, -1).gather(-1, token[:, None]).squeeze(-1)
        return SampleResult(token, logprob, None)
    if temperature != 1.0:
        z = z * (1.0 / temperature)  # as the kernel and the fused log-prob ops scale
    floor = None
    if top_k > 0 or top_p < 1.0:
        floor = truncation_floor(z, top_k=top_k, top_p=top_p)
        z = z.masked_fill(z < floor[:, None], float("-inf"))
    logp = torch.log_softmax(z, -1)  # (b, V) the processed distribution, -inf where dropped
    # Sampling mass: exp(logp) computed as exp2(logp * log2 e), a third of exp's cost on CPU; its
    # rounding (~1e-7 relative) moves the inverse-CDF boundaries only, the log-probs are logp's.
    mass = (logp * _LOG2E).exp2_()
    token = _inverse_cdf_no_sync(mass, step_uniforms_no_sync(keys, step))
    logprob = logp.gather(-1, token[:, None]).squeeze(-1)
    return SampleResult(token, logprob, floor)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    keys: torch.Tensor,
    step: int,
    backend: str | None = None,
) -> SampleResult:
    """Sample one token per row of ``logits`` (b, V) and return it with its log-prob and floor.

    Arguments are trusted (the engine validates them once per call). ``keys`` (b,) int64 in
    [0, 2**63), on ``logits``' device, are the rows' random-stream keys
    (``random_streams.row_keys``) and ``step`` (an int >= 0) the counter: row b's draw depends on
    ``(keys[b], step)`` and its own logits only. Returns a :class:`SampleResult`; ``floor`` is None
    unless top-k or top-p is active (and never for greedy)."""
    if _backend.resolve(backend, logits.device) == "triton":
        from ..kernels import sampling as _kernels

        token, logprob, floor = _kernels.sample_fwd(
            logits, keys, temperature=temperature, top_k=top_k, top_p=top_p, step=step
        )
        token = token.clamp_(0, logits.shape[-1] - 1)  # a NaN row's argmax: keep it a valid id
        truncated = temperature > 0 and (top_k > 0 or top_p < 1.0)
        return SampleResult(token, logprob, floor if truncated else None)
    return _sample_cpu(logits, temperature, top_k, top_p, keys, step)
