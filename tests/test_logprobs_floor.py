"""``logit_floor=``: log-probs under the sampler's truncated distribution (top-k / top-p), against a
float64 oracle, forward and gradients, on both backends (docs/formulas.md, "Truncated sampling and
the logit floor")."""

from __future__ import annotations

import pytest
import torch

import alignkit


def _oracle(z: torch.Tensor, labels: torch.Tensor, floor: torch.Tensor):
    """float64 log-prob and entropy of labels under softmax(z) restricted to {z >= floor}."""
    kept = z >= floor[:, None]
    log_p = torch.log_softmax(torch.where(kept, z, -torch.inf), dim=-1)
    logp = log_p.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(log_p.exp() * torch.where(kept, log_p, 0.0)).sum(-1)
    return logp, ent


def _top_k_floor(z: torch.Tensor, k: int) -> torch.Tensor:
    """Midpoint between the k-th and (k+1)-th largest z of each row (the rollout's floor)."""
    top = z.topk(k + 1, dim=-1).values
    return (top[:, k - 1] + top[:, k]) / 2


def _case(n: int, hidden: int, vocab: int, k: int, temperature: float):
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) / hidden**0.5
    z = (h @ w.T) / temperature
    floor = _top_k_floor(z, k)
    floor[::3] = -torch.inf  # rows without truncation
    # Labels drawn from the kept set, as a sampler's are.
    kept = z >= floor[:, None]
    labels = torch.multinomial(kept.double(), 1).squeeze(-1)
    return h, w, floor, labels


def _grads(logp, ent, inputs):
    weights = torch.randn(logp.shape, dtype=torch.float64).to(logp.dtype)
    return torch.autograd.grad((weights * logp).sum() - 0.7 * (weights * ent).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "hidden", "vocab", "k"), [(1, 8, 7, 1), (7, 16, 257, 5), (33, 8, 64, 40)])
def test_fused_linear_logprobs_with_floor_matches_oracle(backend, backend_device, dtype, n, hidden, vocab, k):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 is served by the CPU implementation on every backend")
    temperature = 1.3
    h, w, floor, labels = _case(n, hidden, vocab, k, temperature)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_logp, ref_ent = _oracle((ref_h @ ref_w.T) / temperature, labels, floor)
    torch.manual_seed(1)
    ref_grads = _grads(ref_logp, ref_ent, (ref_h, ref_w))

    d = backend_device
    hh = h.to(d, dtype).requires_grad_()
    ww = w.to(d, dtype).requires_grad_()
    logp, ent = alignkit.fused_linear_logprobs(
        hh, ww, labels.to(d), temperature=temperature, logit_floor=floor.to(d, dtype), return_entropy=True,
        backend=backend,
    )  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double().cpu(), ref_logp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double().cpu(), ref_ent.detach(), rtol=tol, atol=tol)
    assert (logp <= 0).all() and (ent >= 0).all()
    torch.manual_seed(1)
    for got, ref in zip(_grads(logp, ent, (hh, ww)), ref_grads, strict=True):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_logprobs_with_floor_matches_oracle(backend, backend_device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 is served by the CPU implementation on every backend")
    temperature = 0.7
    logits = torch.randn(2, 9, 50257 // 97, dtype=torch.float64) * 3  # odd vocabulary
    z = logits.reshape(-1, logits.shape[-1]) / temperature
    floor = _top_k_floor(z, 11)
    labels = torch.multinomial((z >= floor[:, None]).double(), 1).squeeze(-1)
    ref_x = logits.clone().requires_grad_()
    ref_logp, ref_ent = _oracle(ref_x.reshape(z.shape) / temperature, labels, floor)
    torch.manual_seed(2)
    (ref_grad,) = _grads(ref_logp, ref_ent, (ref_x,))

    d = backend_device
    x = logits.to(d, dtype).requires_grad_()
    logp, ent = alignkit.token_logprobs(
        x, labels.reshape(2, 9).to(d), temperature=temperature, logit_floor=floor.reshape(2, 9).to(d, dtype),
        return_entropy=True, backend=backend,
    )  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(logp.double().cpu().reshape(-1), ref_logp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double().cpu().reshape(-1), ref_ent.detach(), rtol=tol, atol=tol)
    torch.manual_seed(2)
    (grad,) = _grads(logp.reshape(-1), ent.reshape(-1), (x,))
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=10 * tol, atol=10 * tol)
    dropped = (z < floor[:, None]).reshape(x.shape)
    assert (grad.cpu()[dropped] == 0).all(), "entries below the floor must get no gradient"


def test_floor_of_minus_inf_changes_nothing(backend, backend_device):
    d = backend_device
    h, w = torch.randn(6, 8, device=d), torch.randn(20, 8, device=d)
    labels = torch.randint(0, 20, (6,), device=d)
    plain = alignkit.fused_linear_logprobs(h, w, labels, return_entropy=True, backend=backend)
    floored = alignkit.fused_linear_logprobs(
        h, w, labels, logit_floor=torch.full((6,), -torch.inf, device=d), return_entropy=True, backend=backend
    )
    for a, b in zip(plain, floored, strict=True):
        torch.testing.assert_close(a, b)


def test_a_label_below_its_floor_has_probability_zero(backend, backend_device):
    d = backend_device
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], device=d)
    floor = torch.tensor([1.5], device=d)  # keeps tokens 0 and 1
    logp = alignkit.token_logprobs(logits, torch.tensor([3], device=d), logit_floor=floor, backend=backend)
    assert logp.item() == -torch.inf
    logp = alignkit.token_logprobs(logits, torch.tensor([1], device=d), logit_floor=floor, backend=backend)
    torch.testing.assert_close(logp.cpu(), torch.log_softmax(torch.tensor([3.0, 2.0]), 0)[1:])


def test_causal_lm_logprobs_passes_the_floor_through():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1].double() / 0.9  # (2, 6, V)
    floor = _top_k_floor(z.reshape(-1, 61), 4).reshape(2, 6)
    labels = ids[:, 1:]
    logp = alignkit.causal_lm_logprobs(model, ids, temperature=0.9, logit_floor=floor.float())
    ref, _ = _oracle(z.reshape(-1, 61), labels.reshape(-1), floor.reshape(-1))
    ref = ref.reshape(2, 6)
    live = torch.isfinite(ref)
    torch.testing.assert_close(logp.double()[live], ref[live], rtol=1e-5, atol=1e-5)
    assert (logp.double()[~live] == -torch.inf).all()


@pytest.mark.parametrize(
    ("floor", "error", "pattern"),
    [
        (torch.zeros(5), ValueError, "logit_floor must have the shape of labels"),
        (torch.zeros(4, dtype=torch.long), TypeError, "logit_floor must be a floating-point tensor"),
        ([0.0] * 4, TypeError, "logit_floor must be a torch.Tensor"),
    ],
)
def test_bad_floor_names_the_argument(floor, error, pattern):
    with pytest.raises(error, match=pattern):
        alignkit.token_logprobs(torch.randn(4, 9), torch.zeros(4, dtype=torch.long), logit_floor=floor)
