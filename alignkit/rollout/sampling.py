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

Backends: on CUDA one Triton kernel does all of it (kernels/sampling.py, a row per program, random
numbers from Philox seeded per step from the call's generator); on CPU the torch code below, which
samples by inverse CDF (one uniform per row: cheaper than the vocabulary-sized exponential draw
``torch.multinomial`` makes). The two backends draw different random streams: a seed repeats
exactly on the same backend and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backend as _backend

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


def _sample_cpu(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> SampleResult:
    # logits (b, V); fp32 math throughout.
    z = logits.float()
    if temperature == 0.0:
        token = z.argmax(-1)
        logprob = z.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        return SampleResult(token, logprob, None)
    if temperature != 1.0:
        z = z * (1.0 / temperature)  # as the kernel and the fused log-prob ops scale
    floor = None
    if top_k > 0 or top_p < 1.0:
        floor = truncation_floor(z, top_k=top_k, top_p=top_p)
        z = z.masked_fill(z < floor[:, None], float("-inf"))
    peak = z.amax(-1, keepdim=True)  # (b, 1)
    cdf = torch.exp(z - peak).cumsum_(-1)  # (b, V) unnormalised cumulative mass
    total = cdf[:, -1:]
    # u in [0, total): the first index whose cumulative mass exceeds u has positive mass.
    u = torch.rand(total.shape, generator=generator, device=z.device, dtype=z.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    logprob = z.gather(-1, token[:, None]).squeeze(-1) - (peak + torch.log(total)).squeeze(-1)
    return SampleResult(token, logprob, floor)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator,
    backend: str | None = None,
) -> SampleResult:
    """Sample one token per row of ``logits`` (b, V) and return it with its log-prob and floor.

    Arguments are trusted (the engine validates them once per call). ``generator`` is a CPU
    ``torch.Generator`` for CUDA logits (it seeds the kernel; no device sync) and a generator on
    ``logits``' device otherwise. Returns a :class:`SampleResult`; ``floor`` is None unless top-k or
    top-p is active (and never for greedy)."""
    if _backend.resolve(backend, logits.device) == "triton":
        from ..kernels import sampling as _kernels

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        token, logprob, floor = _kernels.sample_fwd(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        truncated = temperature > 0 and (top_k > 0 or top_p < 1.0)
        return SampleResult(token, logprob, floor if truncated else None)
    return _sample_cpu(logits, temperature, top_k, top_p, generator)
