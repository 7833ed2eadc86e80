"""causal_lm_logprobs on tiny Llama / Qwen2 / GPT-2 models (built from configs, saved and reloaded
with from_pretrained: no hub access) against log_softmax of the model's own logits, in float64."""

from __future__ import annotations

import pytest
import torch
import transformers
from oracles import IGNORE, ref_logprobs

import alignkit

VOCAB, HIDDEN = 96, 32


def _config(kind: str):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "llama":  # untied lm_head
        return transformers.LlamaConfig(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False
        )
    if kind == "qwen2":  # tied embeddings, GQA, qkv bias
        return transformers.Qwen2Config(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True
        )
    return transformers.GPT2Config(  # tied embeddings, learned positions
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True
    )


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = _config(request.param)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _load(path, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.train(False)


def _batch(batch=2, length=9):
    input_ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    return input_ids, mask


def _reference(model, input_ids, mask, temperature):
    """The float64 log-prob oracle on the model's own logits; padding tokens are not scored."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return ref_logprobs(logits, labels, temperature)


# backend goes through the conftest fixture (indirect): on a CUDA machine its triton case runs on CUDA.
@pytest.mark.parametrize(
    ("dtype", "backend"), [(torch.float64, "cpu"), (torch.float32, "triton")], indirect=["backend"]
)
def test_causal_lm_logprobs_matches_model_logits(model_dir, dtype, backend, backend_device):
    model = _load(model_dir, dtype).to(backend_device)
    input_ids, mask = (t.to(backend_device) for t in _batch())
    g_logp, g_ent = (torch.randn(2, 8, dtype=torch.float64, device=backend_device) for _ in range(2))
    params = [p for p in model.parameters() if p.requires_grad]

    logp, ent = alignkit.causal_lm_logprobs(
        model, input_ids, mask, temperature=0.9, return_entropy=True, backend=backend
    )
    fast = torch.autograd.grad((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum(), params)
    ref_logp, ref_ent = _reference(model, input_ids, mask, 0.9)
    ref = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), params)

    assert logp.shape == (2, 8) and logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=tol)
    assert (logp[1, -3:] == 0).all() and (ent[1, -3:] == 0).all()
    assert (logp <= 0).all() and (ent >= 0).all()
    gtol = 1e-9 if dtype == torch.float64 else 5e-4
    for p, a, b in zip(params, fast, ref, strict=True):
        scale = max(b.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() <= gtol * scale, p.shape


def test_causal_lm_logprobs_tied_embedding_gets_both_gradients(model_dir):
    model = _load(model_dir, torch.float64)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids, mask = _batch()
    alignkit.causal_lm_logprobs(model, input_ids, mask, backend="cpu").sum().backward()
    emb = model.get_input_embeddings().weight.grad
    # rows of tokens that appear in the input get an embedding gradient; with a tied head every
    # row also gets the softmax part of the output gradient
    assert emb is not None
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[input_ids.unique()] = False
    assert bool((emb[unused].abs().sum(-1) > 0).all()) == tied


def test_causal_lm_logprobs_logits_to_keep(model_dir):
    model = _load(model_dir, torch.float64)
    input_ids, mask = _batch()
    full = alignkit.causal_lm_logprobs(model, input_ids, mask, backend="cpu")
    last = alignkit.causal_lm_logprobs(model, input_ids, mask, logits_to_keep=4, backend="cpu")
    assert last.shape == (2, 4)
    torch.testing.assert_close(last, full[:, -4:], rtol=0, atol=1e-12)


def test_causal_lm_logprobs_return_hidden(model_dir):
    # The hidden states returned are the body's last states that predict the scored tokens, with
    # their graph (a value head on them trains the body), in float64.
    model = _load(model_dir, torch.float64)
    input_ids, mask = _batch()
    logp, entropy, hidden = alignkit.causal_lm_logprobs(
        model, input_ids, mask, logits_to_keep=4, return_entropy=True, return_hidden=True, backend="cpu"
    )
    states = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, states[:, -5:-1], rtol=0, atol=1e-12)
    plain = alignkit.causal_lm_logprobs(model, input_ids, mask, logits_to_keep=4, backend="cpu")
    torch.testing.assert_close(logp, plain, rtol=0, atol=0)
    assert entropy.shape == logp.shape
    hidden.sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="return_hidden"):
        alignkit.causal_lm_logprobs(model, input_ids, mask, return_hidden="yes")


def test_causal_lm_logprobs_bad_input(model_dir):
    model = _load(model_dir, torch.float32)
    input_ids, mask = _batch()
    with pytest.raises(ValueError, match="attention_mask"):
        alignkit.causal_lm_logprobs(model, input_ids, mask[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        alignkit.causal_lm_logprobs(model, input_ids[:, :1], mask[:, :1])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        alignkit.causal_lm_logprobs(model, input_ids.float(), mask)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 96\)"):
        alignkit.causal_lm_logprobs(model, torch.full_like(input_ids, VOCAB), mask)
    with pytest.raises(ValueError, match="position_ids"):
        alignkit.causal_lm_logprobs(model, input_ids, mask, position_ids=torch.zeros(3, 9, dtype=torch.long))
    with pytest.raises(TypeError):  # options are keyword-only
        alignkit.causal_lm_logprobs(model, input_ids, mask, None, 0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        alignkit.causal_lm_logprobs(model, input_ids, mask, logits_to_keep=-1)
    with pytest.raises(ValueError, match="temperature"):
        alignkit.causal_lm_logprobs(model, input_ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="model"):
        alignkit.causal_lm_logprobs(torch.nn.Linear(3, 3), input_ids, mask)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        alignkit.causal_lm_logprobs(model, input_ids, mask)
