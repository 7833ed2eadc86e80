"""The rollout sampling step (alignkit/rollout/sampling.py) and its Triton kernel (kernels/sampling.py).

Oracles: Hugging Face's own ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (the kept set the floor must
reproduce), a float64 ``log_softmax`` over ``{z >= floor}`` (``oracles.ref_rollout_logprobs``) and,
for the per-row random streams, splitmix64 on Python ints. The kernel runs under the Triton
interpreter on CPU (small sizes), compiled on CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from oracles import ref_rollout_logprobs
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from alignkit.rollout import random_streams, sample, truncation_floor

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


def _keys(rows: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Row keys of one prompt with ``rows`` samples."""
    return random_streams.row_keys([seed], rows, device)


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
    out = sample(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, keys=_keys(64), step=0, backend="cpu"
    )
    z = logits * (1.0 / temperature)
    assert (out.floor is None) == (top_k == 0 and top_p == 1.0)
    if out.floor is not None:
        assert bool((z.gather(-1, out.token[:, None]).squeeze(-1) >= out.floor).all())
    expected = ref_rollout_logprobs(z, out.token, out.floor)
    torch.testing.assert_close(out.logprob.double(), expected, rtol=0, atol=1e-6)
    assert out.token.dtype == torch.int64 and out.logprob.dtype == torch.float32
    assert bool((out.logprob <= 0).all())


def test_cpu_sample_greedy_and_seed():
    logits = torch.randn(8, 50)
    out = sample(logits, temperature=0.0, keys=_keys(8), step=0, backend="cpu")
    assert torch.equal(out.token, logits.argmax(-1)) and out.floor is None
    torch.testing.assert_close(
        out.logprob.double(), ref_rollout_logprobs(logits, out.token), rtol=0, atol=1e-6
    )
    draws = [sample(logits, temperature=1.0, keys=_keys(8, seed=3), step=4, backend="cpu").token
             for _ in range(2)]  # fmt: skip
    assert torch.equal(*draws)


@pytest.mark.parametrize("vocab", [50, 5000])  # one-level and two-level inverse CDF
def test_nan_rows_sample_an_id_inside_the_vocabulary(vocab):
    logits = torch.randn(6, vocab)
    logits[1] = float("nan")
    logits[4, 7] = float("inf")
    for settings in (
        {"temperature": 1.0},
        {"temperature": 0.8, "top_k": 5},
        {"temperature": 1.0, "top_p": 0.9},
    ):
        out = sample(logits, keys=_keys(6), step=2, backend="cpu", **settings)
        assert bool(((out.token >= 0) & (out.token < vocab)).all())
        assert torch.isnan(out.logprob[[1, 4]]).all()  # the engine reports these rows
        assert torch.isfinite(out.logprob[[0, 2, 3, 5]]).all()


def test_cpu_sample_frequencies_match_the_distribution():
    # top-k 3 of 5 at temperature 0.5: the empirical frequencies follow the renormalised softmax.
    row = torch.tensor([1.0, 0.5, 0.2, -0.3, 2.0])
    out = sample(row.expand(20000, 5), temperature=0.5, top_k=3, keys=_keys(20000, seed=1), step=0,
                 backend="cpu")  # fmt: skip
    freq = torch.bincount(out.token, minlength=5).double() / 20000
    probs = torch.softmax(
        (row * 2.0).double().masked_fill(torch.tensor([0, 0, 1, 1, 0]).bool(), float("-inf")), -1
    )
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)
    assert freq[2] == 0 and freq[3] == 0
    # one row over many steps follows it too (the stream along the step counter)
    key = _keys(1, seed=2)
    tokens = torch.cat([sample(row[None], temperature=0.5, top_k=3, keys=key, step=t, backend="cpu").token
                        for t in range(3000)])  # fmt: skip
    freq = torch.bincount(tokens, minlength=5).double() / 3000
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.03)


# ----------------------------------------------------------------------------- per-row random streams


def _mix64_reference(z: int) -> int:
    # splitmix64's finaliser, written from its definition on Python ints.
    z &= 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_streams_match_splitmix64_on_python_ints():
    rng = random.Random(0)
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, *(rng.getrandbits(64) for _ in range(200))]
    n = 3
    keys = random_streams.row_keys(seeds, n).tolist()
    gamma = 0x9E3779B97F4A7C15
    expected = [_mix64_reference(_mix64_reference(s + gamma) + j) % 2**63 for s in seeds for j in range(n)]
    assert keys == expected
    for step in (0, 1, 17, 2**31 - 1):
        u = random_streams.step_uniforms_no_sync(torch.tensor(keys), step)
        bits = [_mix64_reference(k + (step + 1) * gamma) >> 40 for k in keys]
        assert u.tolist() == [b / 2**24 for b in bits]
        assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert random_streams.prompt_seeds(7, 3) == [_mix64_reference(7 + (u + 1) * gamma) for u in range(3)]
    assert random_streams.prompt_seeds((4, 5), 2) == [4, 5]


def test_streams_are_uniform():
    u = random_streams.step_uniforms_no_sync(_keys(50000, seed=9), 3).double()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert len(set(u.tolist())) > 49000  # 24 random bits: few collisions among 50000 draws


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_sample_is_batch_invariant(backend, backend_device):
    # A row's draw depends on its key, the step and its logits only: any sub-batch, in any order,
    # samples the same tokens, log-probs and floors as the full batch.
    if backend == "triton":
        pytest.importorskip("triton")
    rows, vocab = (64, 300) if backend_device.type == "cuda" or backend == "cpu" else (6, 24)
    logits = torch.randn(rows, vocab, device=backend_device) * 2
    keys = random_streams.row_keys([3, 8], rows // 2, backend_device)
    part = torch.tensor([rows - 1, 2, 0], device=backend_device)
    for temperature, top_k, top_p, step in [(1.0, 0, 1.0, 0), (0.8, 5, 0.9, 5)]:
        full = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, keys=keys, step=step,
                      backend=backend)  # fmt: skip
        sub = sample(logits[part], temperature=temperature, top_k=top_k, top_p=top_p, keys=keys[part],
                     step=step, backend=backend)  # fmt: skip
        assert torch.equal(sub.token, full.token[part])
        assert torch.equal(sub.logprob, full.logprob[part])
        if top_k:
            assert torch.equal(sub.floor, full.floor[part])
    steps = [sample(logits, temperature=1.0, keys=keys, step=t, backend=backend).token for t in (0, 1)]
    assert not torch.equal(*steps)  # the step moves the stream


# ----------------------------------------------------------------------------- the Triton kernel


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [*CASES, (0.8, 0, 1.0)])
def test_kernel_matches_the_torch_step(temperature, top_k, top_p, device):
    pytest.importorskip("triton")
    from alignkit.kernels.sampling import sample_fwd

    rows, vocab, block = (64, 300, 128) if device.type == "cuda" else (2, 40, 16)  # several tiles
    logits = torch.randn(rows, vocab, device=device) * 2
    keys = _keys(rows, seed=7, device=device)
    token, logp, floor = sample_fwd(
        logits, keys, temperature=temperature, top_k=top_k, top_p=top_p, step=3, block_v=block
    )
    z = logits * (1.0 / temperature)
    expected_floor = truncation_floor(z, top_k=top_k, top_p=top_p)
    assert torch.equal(floor, expected_floor)
    assert bool((z.gather(-1, token[:, None]).squeeze(-1) >= floor).all())
    torch.testing.assert_close(logp.double(), ref_rollout_logprobs(z, token, floor), rtol=0, atol=1e-6)
    if top_k == 0 and top_p == 1.0:  # (the cheap case under the interpreter)
        again = sample_fwd(
            logits, keys, temperature=temperature, top_k=top_k, top_p=top_p, step=3, block_v=block
        )
        assert torch.equal(again[0], token)  # a keyed launch repeats


def test_kernel_greedy_and_frequencies(device):
    pytest.importorskip("triton")
    from alignkit.kernels.sampling import sample_fwd

    logits = torch.randn(5, 40, device=device)
    token, logp, floor = sample_fwd(logits, _keys(5, device=device), temperature=0.0, top_k=0, top_p=1.0,
                                    step=0, block_v=16)  # fmt: skip
    assert torch.equal(token, logits.argmax(-1))
    torch.testing.assert_close(logp.double(), ref_rollout_logprobs(logits, token), rtol=0, atol=1e-6)
    assert bool((floor == float("-inf")).all())
    rows = 4000 if device.type == "cuda" else 300
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device)
    token, _, _ = sample_fwd(
        probs.log().expand(rows, 4).contiguous(), _keys(rows, seed=5, device=device), temperature=1.0,
        top_k=0, top_p=1.0, step=2,
    )  # fmt: skip
    freq = torch.bincount(token, minlength=4).double() / rows
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.09 if rows < 1000 else 0.03)


def test_kernel_refuses_bad_keys_and_step():
    pytest.importorskip("triton")
    from alignkit.kernels.sampling import sample_fwd

    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="keys must be int64"):
        sample_fwd(logits, torch.zeros(2, dtype=torch.int64), temperature=1.0, top_k=0, top_p=1.0, step=0)
    with pytest.raises(ValueError, match="keys must be int64"):
        sample_fwd(logits, torch.zeros(3, dtype=torch.int32), temperature=1.0, top_k=0, top_p=1.0, step=0)
    with pytest.raises(ValueError, match="step must be"):
        sample_fwd(logits, _keys(3), temperature=1.0, top_k=0, top_p=1.0, step=-1)
