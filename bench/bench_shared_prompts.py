"""Scoring a GRPO batch (log-probs of every response token, forward + backward): each distinct
prompt forwarded once vs whole prompt + response rows.

Providers, side by side per case (``benchmark.group``):
* ``alignkit``: ``shared_prompt_logprobs`` (U prompts once, N responses attend to their states).
* ``whole_rows``: ``causal_lm_logprobs`` on the N (prompt + response) rows (alignkit's own fused
  log-probs, so the difference is the shared prompt alone).
* ``torch``: ``model(rows).logits`` -> ``log_softmax`` -> ``gather`` (what most trainers do).
* ``alignkit_checkpointed`` / ``whole_rows_checkpointed``: the first two with Hugging Face's
  gradient checkpointing on (non-reentrant, per layer; the model in training mode, no dropout):
  what memory-bound runs use, and TRL's default.

CPU cases: a random-init Llama (hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 8192), 8
prompts x 8 samples, prompts of 32 / 128 tokens (short chat turns / math problems), 64-token
responses, fp32. GPU case (``bench/gpu.sh``): a random-init model of Qwen2-0.5B's shape (hidden 896,
24 layers, vocab 151936), bf16, 8 prompts x 8 samples, 512-token prompts, 256-token responses.
The model FLOPs of forward + backward scale with the tokens each provider runs:
``N (P + T)`` for whole rows, ``U P + N (T - 1)`` shared (recorded as ``tokens`` in extra_info).

Run: ``python bench/run.py --device cpu -k shared_prompts --out bench/results/shared_prompts``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import alignkit

PROMPTS, SAMPLES, RESPONSE = 8, 8, 64
CPU_CASES = [32, 128]  # prompt tokens
PROVIDERS = ["alignkit", "whole_rows", "torch", "alignkit_checkpointed", "whole_rows_checkpointed"]


GPU_PROMPT, GPU_RESPONSE = 512, 256


@functools.cache
def _model(device: str = "cpu"):
    """One random-init model per device for every provider (built on the device: no CPU init of a
    0.5B model)."""
    torch.manual_seed(0)
    if device == "cpu":
        config = transformers.LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        dtype = torch.float32
    else:  # Qwen2-0.5B's shape
        config = transformers.Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True,
        )  # fmt: skip
        dtype = torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.train(False)


def _batch(prompt_tokens: int, response_tokens: int = RESPONSE, vocab: int = 8192, device: str = "cpu"):
    """Whole rows (the rollout layout: prompts left-padded, here all of one length) and their split."""
    prompts = torch.randint(0, vocab, (PROMPTS, prompt_tokens)).repeat_interleave(SAMPLES, dim=0)
    responses = torch.randint(0, vocab, (PROMPTS * SAMPLES, response_tokens))
    rows = torch.cat([prompts, responses], dim=1).to(device)
    mask = torch.ones_like(rows)
    start = torch.full((rows.shape[0],), prompt_tokens, device=device)
    return rows, mask, start, alignkit.split_shared_prompts(rows, mask, start)


def _for(provider: str, model):
    """The model as ``provider`` runs it: checkpointed providers turn gradient checkpointing on."""
    if provider.endswith("_checkpointed"):
        from alignkit.trainer.modeling import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
        model.train()  # checkpointing acts in training mode (these configs have no dropout)
    return model


def _step(provider, model, rows, mask, split, response_tokens=RESPONSE):
    provider = provider.removesuffix("_checkpointed")
    if provider == "alignkit":
        logp = alignkit.shared_prompt_logprobs(
            model, split.prompt_ids, split.prompt_mask, split.response_ids, split.response_mask,
            split.prompt_index,
        )  # fmt: skip
    elif provider == "whole_rows":
        logp = alignkit.causal_lm_logprobs(model, rows, mask, logits_to_keep=response_tokens)
    elif provider == "torch":
        logits = model(input_ids=rows, attention_mask=mask, logits_to_keep=response_tokens + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows[:, -response_tokens:, None])[..., 0]
    else:
        raise ValueError(f"unknown provider {provider!r}")
    model.zero_grad(set_to_none=True)
    logp.sum().backward()


def _measure(benchmark, provider, step, device, rows, prompt_tokens, response_tokens):
    """Warm up (on CUDA: Triton compilation, allocator), peak memory, 3 timed rounds, and the tokens
    the provider's forwards run (the shared layout's or the whole rows')."""
    step()
    peak = harness.peak_memory_bytes(step, device)
    benchmark.pedantic(step, rounds=3, iterations=1)
    shared = provider.startswith("alignkit")
    tokens = PROMPTS * prompt_tokens + rows.shape[0] * (response_tokens - 1) if shared else rows.numel()
    harness.record(benchmark, provider, peak_bytes=peak, tokens=int(tokens))


@pytest.mark.parametrize("prompt_tokens", CPU_CASES, ids=lambda p: f"P{p}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_shared_prompts_cpu(benchmark, provider, prompt_tokens):
    torch.set_num_threads(1)  # the trainer benchmark's setting; a quiet single core
    model = _for(provider, _model())
    rows, mask, _, split = _batch(prompt_tokens)
    benchmark.group = (
        f"GRPO batch scoring fwd+bwd {PROMPTS} prompts x {SAMPLES} samples, P={prompt_tokens} T={RESPONSE}"
    )

    def step():
        _step(provider, model, rows, mask, split)

    _measure(benchmark, provider, step, "cpu", rows, prompt_tokens, RESPONSE)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
def test_shared_prompts_gpu(benchmark, provider):
    model = _for(provider, _model("cuda"))
    rows, mask, _, split = _batch(GPU_PROMPT, GPU_RESPONSE, vocab=151936, device="cuda")
    benchmark.group = (
        f"GRPO batch scoring fwd+bwd Qwen2-0.5B shape bf16, {PROMPTS} prompts x {SAMPLES} samples, "
        f"P={GPU_PROMPT} T={GPU_RESPONSE}"
    )

    def step():
        _step(provider, model, rows, mask, split, GPU_RESPONSE)
        harness.sync("cuda")

    _measure(benchmark, provider, step, "cuda", rows, GPU_PROMPT, GPU_RESPONSE)
