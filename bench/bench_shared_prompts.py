"""Scoring a GRPO batch (log-probs of every response token, forward + backward): each distinct
prompt forwarded once vs whole prompt + response rows.

Providers, side by side per case (``benchmark.group``):
* ``alignkit``: ``shared_prompt_logprobs`` (U prompts once, N responses attend to their states).
* ``whole_rows``: ``causal_lm_logprobs`` on the N (prompt + response) rows (alignkit's own fused
  log-probs, so the difference is the shared prompt alone).
* ``torch``: ``model(rows).logits`` -> ``log_softmax`` -> ``gather`` (what most trainers do).

Cases: a random-init Llama (hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 8192), 8 prompts
x 8 samples, prompts of 32 / 128 tokens (short chat turns / math problems), 64-token responses, CPU
fp32. The model FLOPs of forward + backward scale with the tokens each provider runs:
``N (P + T)`` for whole rows, ``U P + N (T - 1)`` shared (recorded as ``tokens`` in extra_info).

Run: ``python bench/run.py --device cpu -k shared_prompts --out bench/results/shared_prompts``.
"""

from __future__ import annotations

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
PROVIDERS = ["alignkit", "whole_rows", "torch"]


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train(False)


def _batch(prompt_tokens: int):
    """Whole rows (the rollout layout: prompts left-padded, here all of one length) and their split."""
    prompts = torch.randint(0, 8192, (PROMPTS, prompt_tokens)).repeat_interleave(SAMPLES, dim=0)
    responses = torch.randint(0, 8192, (PROMPTS * SAMPLES, RESPONSE))
    rows = torch.cat([prompts, responses], dim=1)
    mask = torch.ones_like(rows)
    start = torch.full((rows.shape[0],), prompt_tokens)
    return rows, mask, start, alignkit.split_shared_prompts(rows, mask, start)


def _step(provider, model, rows, mask, split):
    if provider == "alignkit":
        logp = alignkit.shared_prompt_logprobs(
            model, split.prompt_ids, split.prompt_mask, split.response_ids, split.response_mask,
            split.prompt_index,
        )  # fmt: skip
    elif provider == "whole_rows":
        logp = alignkit.causal_lm_logprobs(model, rows, mask, logits_to_keep=RESPONSE)
    elif provider == "torch":
        logits = model(input_ids=rows, attention_mask=mask, logits_to_keep=RESPONSE + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows[:, -RESPONSE:, None])[..., 0]
    else:
        raise ValueError(f"unknown provider {provider!r}")
    model.zero_grad(set_to_none=True)
    logp.sum().backward()


@pytest.mark.parametrize("prompt_tokens", CPU_CASES, ids=lambda p: f"P{p}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_shared_prompts_cpu(benchmark, provider, prompt_tokens):
    torch.set_num_threads(1)  # the trainer benchmark's setting; a quiet single core
    model = _model()
    rows, mask, _, split = _batch(prompt_tokens)
    benchmark.group = (
        f"GRPO batch scoring fwd+bwd {PROMPTS} prompts x {SAMPLES} samples, P={prompt_tokens} T={RESPONSE}"
    )

    def step():
        _step(provider, model, rows, mask, split)

    step()  # warm-up
    peak = harness.peak_memory_bytes(step, "cpu")
    benchmark.pedantic(step, rounds=3, iterations=1)
    n = rows.shape[0]
    tokens = PROMPTS * prompt_tokens + n * (RESPONSE - 1) if provider == "alignkit" else rows.numel()
    harness.record(benchmark, provider, peak_bytes=peak, tokens=int(tokens))
