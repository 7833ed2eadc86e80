"""The rollout sampling step (alignkit/rollout/sampling.py) and its Triton kernel (kernels/sampling.py).

Oracles: Hugging Face's own ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (the kept set the floor must
reproduce) and a float64 ``log_softmax`` over ``{z >= floor}``. The kernel runs under the Triton
interpreter on CPU (small sizes), compiled on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from alignkit.rollout import sample, truncation_floor

CASES = [  # (temperature, top_k, top_p)
    (1.0, 5, 1.0),
    (0.7, 0, 0.9),
    (1.3, 10, 0.8),
    (1.0, 1, 1.0),
    (0.5, 0, 0.05),
]


def _hf_kept(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The set HF's warpers keep (temperature already applied), top-k then top-p."""
    scores = z.clone()
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores)


def _ref_logprob(z: torch.Tensor, floor: torch.Tensor | None, token: torch.Tensor) -> torch.Tensor:
    z = z.double()
    if floor is not None:
        z = z.masked_fill(z < floor.double()[:, None], float("-inf"))
    return torch.log_softmax(z, -1).gather(-1, token[:, None]).squeeze(-1)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
@pytest.mark.parametrize("vocab", [7, 257, 50257])
def test_floor_reproduces_hf_kept_set(temperature, top_k, top_p, vocab):
    rows = 3 if vocab == 50257 else 16
    z = torch.randn(rows, vocab) * 3 * (1.0 / temperature)
    floor = truncation_floor(z, top_k=top_k, top_p=top_p)
    kept = _hf_kept(z, top_k, top_p)
    assert torch.equal(z >= floor[:, None], kept)
    # strictly between the kept and the dropped values, -inf when nothing is dropped
    dropped_max = z.masked_fill(kept, float("-inf")).amax(-1)
    kept_min = z.masked_fill(~kept, float("inf")).amin(-1)
    assert bool(((floor > dropped_max) | (dropped_max == float("-inf"))).all())
    assert bool((floor < kept_min).all())
    assert bool((floor[dropped_max == float("-inf")] == float("-inf")).all())


def test_floor_keeps_ties_and_handles_adjacent_floats():
    z = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    assert truncation_floor(z, top_k=2, top_p=1.0).item() == 1.5  # both 2.0 kept (HF keeps ties)
    assert truncation_floor(z, top_k=5, top_p=1.0).item() == float("-inf")
    a = torch.tensor(1.0)
    b = torch.nextafter(a, torch.tensor(0.0))  # adjacent floats: the midpoint rounds onto one
    floor = truncation_floor(torch.stack([a, b])[None], top_k=1, top_p=1.0)
    assert floor.item() > b.item() and floor.item() <= a.item()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [*CASES, (0.8, 0, 1.0)])
def test_cpu_sample_logprob_is_under_processed_distribution(temperature, top_k, top_p):
    logits = torch.randn(64, 300) * 2
    gen = torch.Generator().manual_seed(0)
    out = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, backend="cpu")
    z = logits * (1.0 / temperature)
    assert (out.floor is None) == (top_k == 0 and top_p == 1.0)
    if out.floor is not None:
        assert bool((z.gather(-1, out.token[:, None]).squeeze(-1) >= out.floor).all())
    torch.testing.assert_close(out.logprob.double(), _ref_logprob(z, out.floor, out.token), rtol=0, atol=1e-6)
    assert out.token.dtype == torch.int64 and out.logprob.dtype == torch.float32
    assert bool((out.logprob <= 0).all())


def test_cpu_sample_greedy_and_seed():
    logits = torch.randn(8, 50)
    gen = torch.Generator().manual_seed(0)
    out = sample(logits, temperature=0.0, generator=gen, backend="cpu")
    assert torch.equal(out.token, logits.argmax(-1)) and out.floor is None
    torch.testing.assert_close(out.logprob.double(), _ref_logprob(logits, None, out.token), rtol=0, atol=1e-6)
    draws = [sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(3), backend="cpu").token
             for _ in range(2)]  # fmt: skip
    assert torch.equal(*draws)


def test_cpu_sample_frequencies_match_the_distribution():
    # top-k 3 of 5 at temperature 0.5: the empirical frequencies follow the renormalised softmax.
    row = torch.tensor([1.0, 0.5, 0.2, -0.3, 2.0])
    out = sample(row.expand(20000, 5), temperature=0.5, top_k=3, generator=torch.Generator().manual_seed(1),
                 backend="cpu")  # fmt: skip
    freq = torch.bincount(out.token, minlength=5).double() / 20000
    probs = torch.softmax(
        (row * 2.0).double().masked_fill(torch.tensor([0, 0, 1, 1, 0]).bool(), float("-inf")), -1
    )
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)
    assert freq[2] == 0 and freq[3] == 0


# ----------------------------------------------------------------------------- the Triton kernel


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [*CASES, (0.8, 0, 1.0)])
def test_kernel_matches_the_torch_step(temperature, top_k, top_p, device):
    pytest.importorskip("triton")
    from alignkit.kernels.sampling import sample_fwd

    rows, vocab, block = (64, 300, 128) if device.type == "cuda" else (2, 40, 16)  # several tiles
    logits = torch.randn(rows, vocab, device=device) * 2
    token, logp, floor = sample_fwd(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=7, block_v=block
    )
    z = logits * (1.0 / temperature)
    expected_floor = truncation_floor(z, top_k=top_k, top_p=top_p)
    assert torch.equal(floor, expected_floor)
    assert bool((z.gather(-1, token[:, None]).squeeze(-1) >= floor).all())
    torch.testing.assert_close(logp.double(), _ref_logprob(z, floor, token), rtol=0, atol=1e-6)
    if top_k == 0 and top_p == 1.0:  # (the cheap case under the interpreter)
        again = sample_fwd(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=7, block_v=block)
        assert torch.equal(again[0], token)  # a seeded launch repeats


def test_kernel_greedy_and_frequencies(device):
    pytest.importorskip("triton")
    from alignkit.kernels.sampling import sample_fwd

    logits = torch.randn(5, 40, device=device)
    token, logp, floor = sample_fwd(logits, temperature=0.0, top_k=0, top_p=1.0, seed=0, block_v=16)
    assert torch.equal(token, logits.argmax(-1))
    torch.testing.assert_close(logp.double(), _ref_logprob(logits, None, token), rtol=0, atol=1e-6)
    assert bool((floor == float("-inf")).all())
    rows = 4000 if device.type == "cuda" else 300
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    token, _, _ = sample_fwd(
        probs.log().expand(rows, 4).contiguous(), temperature=1.0, top_k=0, top_p=1.0, seed=5
    )
    freq = torch.bincount(token, minlength=4).double() / rows
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.09 if rows < 1000 else 0.03)
