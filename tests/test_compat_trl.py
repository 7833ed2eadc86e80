"""alignkit.compat.trl (TRL's log-prob helpers and GRPOTrainer's per-token log-probs, fused) against
the float64 oracles of tests/oracles.py, with TRL's argument conventions: ``index`` of shape
``(...)`` or ``(..., K)``, ``temperature``, ``row_mask``, and the per-token method's signature and
return structure. The GRPOTrainer part runs on a tiny Hugging Face causal LM (transformers is a
dependency) with a stand-in trainer whose own method is the materialised-logits computation;
patch()/restore() run against fake trl modules, so this file needs no TRL
(tests/test_compat_peers.py runs the real GRPOTrainer).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from oracles import IGNORE, assert_close, ref_logprobs

from alignkit.compat import PatchWarning
from alignkit.compat import trl as T

# ----------------------------------------------------------------------------- trl.trainer.utils


@pytest.mark.parametrize("shape,vocab", [((1,), 1), ((7,), 50257), ((3, 5), 101), ((2, 1, 4), 33)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_selective_log_softmax(shape, vocab, temperature):
    logits = (4 * torch.randn(*shape, vocab)).requires_grad_()
    index = torch.randint(0, vocab, shape)
    got = T.selective_log_softmax(logits, index, temperature)
    ref, _ = ref_logprobs(logits.detach(), index, temperature)
    plain, _ = ref_logprobs(logits.detach(), index, temperature, dtype=torch.float32)
    assert got.shape == index.shape and got.dtype == torch.float32
    assert (got <= 0).all()
    assert_close(got, ref, rtol=float((plain.double() - ref).abs().max()) + 1e-5)
    z64 = logits.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(got.sum(), logits)
    (ref_g,) = torch.autograd.grad(ref_logprobs(z64, index, temperature)[0].sum(), z64)
    assert_close(g, ref_g, rtol=1e-5)


def test_selective_log_softmax_row_mask_zeroes_and_blocks_gradient():
    logits = torch.randn(3, 6, 40).requires_grad_()
    index = torch.randint(0, 40, (3, 6))
    row_mask = torch.rand(3, 6) > 0.4
    got = T.selective_log_softmax(logits, index, row_mask=row_mask)
    ref, _ = ref_logprobs(logits.detach(), index.masked_fill(~row_mask, IGNORE))
    assert_close(got, ref, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), logits)
    assert torch.equal(g[~row_mask], torch.zeros_like(g[~row_mask]))


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_selective_log_softmax_top_k_index(K, with_mask):
    logits = (3 * torch.randn(4, 5, 64)).requires_grad_()
    index = torch.randint(0, 64, (4, 5, K))
    row_mask = (torch.rand(4, 5, K) > 0.3) if with_mask else None
    got = T.selective_log_softmax(logits, index, 0.8, row_mask)
    z64 = logits.detach().double().requires_grad_()
    ref = torch.log_softmax(z64 / 0.8, -1).gather(-1, index)
    if with_mask:
        ref = ref.masked_fill(~row_mask, 0.0)
    assert got.shape == (4, 5, K)
    assert_close(got, ref, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), logits)
    (ref_g,) = torch.autograd.grad(ref.sum(), z64)
    assert_close(g, ref_g, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (9,), (2, 3)])
def test_entropy_from_logits(shape):
    logits = (2 * torch.randn(*shape, 300)).requires_grad_()
    got = T.entropy_from_logits(logits, chunk_size=2)
    _, ref = ref_logprobs(logits.detach(), torch.zeros(shape, dtype=torch.int64))
    assert got.shape == shape and (got >= 0).all()
    assert_close(got, ref, rtol=1e-5)
    z64 = logits.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(got.sum(), logits)
    (ref_g,) = torch.autograd.grad(ref_logprobs(z64, torch.zeros(shape, dtype=torch.int64))[1].sum(), z64)
    assert_close(g, ref_g, rtol=1e-5)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy(entropy_requires_grad):
    logits = (3 * torch.randn(2, 7, 90)).requires_grad_()
    index = torch.randint(0, 90, (2, 7))
    row_mask = torch.rand(2, 7) > 0.3
    logps, entropy = T.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad, 1.3, row_mask)
    ref_logp, ref_ent = ref_logprobs(logits.detach(), index.masked_fill(~row_mask, IGNORE), 1.3)
    assert_close(logps, ref_logp, rtol=1e-5)
    assert_close(entropy, ref_ent, rtol=1e-5)
    assert entropy.requires_grad == entropy_requires_grad


def test_bad_input_raises():
    logits, index = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be positive"):  # TRL's message
            T.selective_log_softmax(logits, index, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be positive"):
            T.selective_log_softmax_and_entropy(logits, index, temperature=bad)
    with pytest.raises(ValueError, match="index must have the shape"):
        T.selective_log_softmax(logits, torch.randint(0, 10, (2, 4, 2)))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        T.selective_log_softmax(logits, index.float())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        T.selective_log_softmax(logits, index + 10)
    with pytest.raises(ValueError, match="row_mask must have the shape"):
        T.selective_log_softmax(logits, index, row_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        T.entropy_from_logits(logits, chunk_size=0)


# ----------------------------------------------------------------------------- GRPOTrainer


def tiny_causal_lm(vocab=257, **config):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    settings.update(config)
    return Qwen2ForCausalLM(Qwen2Config(**settings)).eval()


def logits_logprobs(model, input_ids, attention_mask, keep, temperature, dtype=torch.float32):
    """Per-token log-probs and entropies of the last ``keep`` tokens from materialised logits,
    0 at padding: TRL's own computation (``dtype`` float32) or the oracle (float64)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1][:, -keep:]
    labels = input_ids[:, -keep:].masked_fill(attention_mask[:, -keep:] == 0, IGNORE)
    return ref_logprobs(logits, labels, temperature, dtype=dtype)


class StandInTrainer:
    """GRPOTrainer's per-token method with TRL 1.16's signature, computed from materialised logits."""

    temperature = 0.7

    def __init__(self):
        self.original_calls = 0

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, pixel_values=None, image_grid_thw=None,
    ):  # fmt: skip
        self.original_calls += 1
        logps, entropies = logits_logprobs(model, input_ids, attention_mask, logits_to_keep, self.temperature)
        return logps, entropies if compute_entropy else None, None


def completion_batch(B=4, T=19, vocab=257):
    input_ids = torch.randint(0, vocab, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.int64)
    attention_mask[0, :4] = 0  # left-padded prompt
    attention_mask[1, -3:] = 0  # a completion that ended early (padding after EOS)
    return input_ids, attention_mask


def params_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_matches_the_logits_path(trainer, model, input_ids, attention_mask, keep, logps, entropies):
    """The fused method's log-probs, entropies and parameter gradients (of a random weighting of
    both) equal TRL's materialised-logits computation; returns TRL's log-probs."""
    weights = torch.randn(logps.shape)
    ((logps + 0.3 * entropies) * weights).sum().backward()
    grads = params_grad(model)
    model.zero_grad()
    ref_logps, ref_ent, _ = StandInTrainer._get_per_token_logps_and_entropies(
        trainer, model, input_ids, attention_mask, keep, compute_entropy=True
    )
    ((ref_logps + 0.3 * ref_ent) * weights).sum().backward()
    assert_close(logps, ref_logps, rtol=1e-5)
    assert_close(entropies, ref_ent, rtol=1e-5)
    assert_close(grads, params_grad(model), rtol=1e-4, name="parameter gradients")
    return ref_logps


@pytest.mark.parametrize("batch_size", [None, 3])
def test_fused_method_matches_the_logits_path(batch_size):
    model = tiny_causal_lm()
    trainer = StandInTrainer()
    fused = T.fused_per_token_logps_and_entropies(StandInTrainer._get_per_token_logps_and_entropies)
    input_ids, attention_mask = completion_batch()
    logps, entropies, aux = fused(
        trainer, model, input_ids, attention_mask, 11, batch_size=batch_size, compute_entropy=True
    )
    assert trainer.original_calls == 0 and aux is None
    assert logps.shape == entropies.shape == (4, 11)
    ref_logps = assert_matches_the_logits_path(
        trainer, model, input_ids, attention_mask, 11, logps, entropies
    )
    # against the float64 oracle, no worse than the plain fp32 computation (plus fp32 slack)
    with torch.no_grad():
        oracle, _ = logits_logprobs(
            model.double(), input_ids, attention_mask, 11, trainer.temperature, torch.float64
        )
    plain_err = float((ref_logps.detach().double() - oracle).abs().max())
    assert float((logps.detach().double() - oracle).abs().max()) <= plain_err + 1e-5
    assert torch.equal(logps[1, -3:], torch.zeros(3)) and torch.equal(entropies[1, -3:], torch.zeros(3))


def grpo_batch(prompts=3, n=4, prompt_len=7, completion_len=9, vocab=257):
    """TRL's GRPO layout: each prompt (left-padded, lengths differ) repeated n times, then
    right-padded completions (some end early)."""
    rows = prompts * n
    input_ids = torch.randint(0, vocab, (rows, prompt_len + completion_len))
    attention_mask = torch.ones_like(input_ids)
    for p in range(prompts):
        group = slice(p * n, (p + 1) * n)
        input_ids[group, :prompt_len] = torch.randint(0, vocab, (prompt_len,))
        attention_mask[group, : 2 * p] = 0  # prompt p has 2p padding tokens
    for r in range(rows):
        attention_mask[r, prompt_len + 1 + r % completion_len :] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize(("batch_size", "checkpointing"), [(None, False), (5, False), (None, True)])
def test_fused_method_forwards_each_prompt_once(monkeypatch, batch_size, checkpointing):
    """GRPO's repeated prompts run once per chunk, with the values and gradients of TRL's whole
    rows (at TRL's positions: the columns, no position ids); also under gradient checkpointing
    (TRL's default), as transformers turns it on (non-reentrant)."""
    calls = []
    real = T.alignkit.shared_prompt_logprobs

    def counting(lm, prompt_ids, *args, **kwargs):
        calls.append((prompt_ids.shape[0], args[1].shape[0]))
        return real(lm, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(T.alignkit, "shared_prompt_logprobs", counting)
    model = tiny_causal_lm()
    if checkpointing:
        model.activation_checkpointing_enable()
        model.train()  # checkpointing acts in training only (the tiny model has no dropout)
    trainer = StandInTrainer()
    fused = T.fused_per_token_logps_and_entropies(StandInTrainer._get_per_token_logps_and_entropies)
    input_ids, attention_mask = grpo_batch()
    logps, entropies, _ = fused(
        trainer, model, input_ids, attention_mask, 9, batch_size=batch_size, compute_entropy=True
    )
    assert calls and all(prompts < rows for prompts, rows in calls) and trainer.original_calls == 0
    assert calls[0] == ((3, 12) if batch_size is None else (2, 5))
    assert logps.shape == (12, 9)
    assert_matches_the_logits_path(trainer, model, input_ids, attention_mask, 9, logps, entropies)


def test_fused_method_without_entropy_and_the_two_value_return():
    def two_values(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False
    ):
        raise AssertionError("not called for a text-only model")

    model = tiny_causal_lm()
    input_ids, attention_mask = completion_batch()
    fused = T.fused_per_token_logps_and_entropies(two_values)
    logps, entropies = fused(StandInTrainer(), model, input_ids, attention_mask, 5)
    assert entropies is None and logps.shape == (4, 5)
    with torch.no_grad():
        ref, _ = logits_logprobs(model, input_ids, attention_mask, 5, StandInTrainer.temperature)
    assert_close(logps, ref, rtol=1e-5)


def test_fused_method_with_an_original_taking_kwargs():
    def with_kwargs(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        raise AssertionError("not called for a text-only model without extra inputs")

    fused = T.fused_per_token_logps_and_entropies(with_kwargs)
    input_ids, attention_mask = completion_batch()
    logps, _ = fused(StandInTrainer(), tiny_causal_lm(), input_ids, attention_mask, 3, compute_entropy=False)
    assert logps.shape == (4, 3)
    with pytest.raises(AssertionError, match="not called"):
        T.FALLBACK_REASONS_WARNED.add("extra model inputs ['pixel_values']")  # already warned
        fused(StandInTrainer(), tiny_causal_lm(), input_ids, attention_mask, 3, pixel_values=torch.zeros(1))


class DataParallelWrapper(torch.nn.Module):
    """Stands in for DDP / DeepSpeed: the work must run inside its forward (hooks, gradient sync)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.forward_calls = 0

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        return self.module(*args, **kwargs)


def test_fused_method_runs_inside_a_wrapper_forward():
    model = tiny_causal_lm()
    wrapper = DataParallelWrapper(model)
    trainer = StandInTrainer()
    trainer.accelerator = types.SimpleNamespace(
        unwrap_model=lambda m: m.module if isinstance(m, DataParallelWrapper) else m,
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )
    input_ids, attention_mask = completion_batch()
    fused = T.fused_per_token_logps_and_entropies(StandInTrainer._get_per_token_logps_and_entropies)
    logps, _, _ = fused(trainer, wrapper, input_ids, attention_mask, 7, batch_size=2)
    assert wrapper.forward_calls == 2  # one per chunk of batch_size
    assert "forward" not in model.__dict__  # the redirection is undone
    with torch.no_grad():
        ref, _ = logits_logprobs(model, input_ids, attention_mask, 7, trainer.temperature)
    assert_close(logps, ref, rtol=1e-5)


@pytest.mark.parametrize("case", ["images", "aux_loss", "softcapping"])
def test_fused_method_leaves_unsupported_calls_to_trl(case):
    model = tiny_causal_lm()
    kwargs = {}
    if case == "images":
        kwargs["pixel_values"] = torch.zeros(1)
    elif case == "aux_loss":
        kwargs["compute_aux_loss"] = True
    else:
        model.config.final_logit_softcapping = 30.0
    trainer = StandInTrainer()
    fused = T.fused_per_token_logps_and_entropies(StandInTrainer._get_per_token_logps_and_entropies)
    input_ids, attention_mask = completion_batch()
    T.FALLBACK_REASONS_WARNED.clear()
    with pytest.warns(PatchWarning, match="fused log-probs not used"):
        fused(trainer, model, input_ids, attention_mask, 5, **kwargs)
    assert trainer.original_calls == 1


# ----------------------------------------------------------------------------- patch()


def _fake(module_name, name):
    def function(*args, **kwargs):
        return ("trl", name)

    function.__name__ = function.__qualname__ = name
    function.__module__ = module_name
    return function


@pytest.fixture
def fake_trl(monkeypatch):
    """A fake trl in sys.modules: trainer.utils, a grpo_trainer module that re-imported the helpers
    and holds a GRPOTrainer class, and trl.kernels with a different function of the same name."""
    modules = {name: types.ModuleType(name) for name in ("trl", "trl.trainer", "trl.kernels")}
    utils = modules[T.UTILS] = types.ModuleType(T.UTILS)
    for name in T.UTILS_FUNCTIONS:
        setattr(utils, name, _fake(T.UTILS, name))
    grpo = modules[T.GRPO_TRAINER] = types.ModuleType(T.GRPO_TRAINER)
    grpo.selective_log_softmax, grpo.entropy_from_logits = (
        utils.selective_log_softmax,
        utils.entropy_from_logits,
    )
    grpo.GRPOTrainer = type("GRPOTrainer", (StandInTrainer,), {})
    grpo.GRPOTrainer._get_per_token_logps_and_entropies = StandInTrainer._get_per_token_logps_and_entropies
    modules["trl.kernels"].selective_log_softmax_and_entropy = _fake(
        "trl.kernels", "selective_log_softmax_and_entropy"
    )
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_patch_replaces_helpers_and_the_trainer_method(fake_trl):
    utils, grpo, kernels = fake_trl[T.UTILS], fake_trl[T.GRPO_TRAINER], fake_trl["trl.kernels"]
    originals = {name: getattr(utils, name) for name in T.UTILS_FUNCTIONS}
    kernel = kernels.selective_log_softmax_and_entropy
    method = grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD]
    with T.patch() as handle:
        for name in T.UTILS_FUNCTIONS:
            assert getattr(utils, name) is getattr(T, name)
        assert grpo.selective_log_softmax is T.selective_log_softmax
        assert grpo.entropy_from_logits is T.entropy_from_logits
        assert kernels.selective_log_softmax_and_entropy is kernel  # same name, not the same function
        patched = grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD]
        assert patched is not method and patched.__wrapped__ is method
        assert T.patch().replaced == []  # a second patch wraps nothing twice
        # a trainer created after patch() scores from hidden states, never calling the original
        trainer = grpo.GRPOTrainer()
        input_ids, attention_mask = completion_batch()
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            tiny_causal_lm(), input_ids, attention_mask, 4
        )
        assert trainer.original_calls == 0 and logps.shape == (4, 4)
        assert f"{T.GRPO_TRAINER}.GRPOTrainer" not in handle.replaced
        assert f"GRPOTrainer.{T.PER_TOKEN_METHOD}" in handle.replaced
    assert {name: getattr(utils, name) for name in T.UTILS_FUNCTIONS} == originals
    assert grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD] is method


def test_patch_without_trl_warns_and_does_nothing(monkeypatch):
    for name in [n for n in sys.modules if n == "trl" or n.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.warns(PatchWarning, match="trl is not installed"):
        handle = T.patch()
    assert not handle.active
