"""Rollouts: batched sampling from Hugging Face causal LMs with the log-probs of the distribution
actually sampled (temperature, top-k, top-p) and the per-step logit floor the trainer needs to
recompute it (docs/formulas.md "Rollout log-probs", "Truncated sampling and the logit floor").

    engine = alignkit.RolloutEngine(model, tokenizer)
    out = engine.generate(prompts, n=4, max_new_tokens=256, temperature=0.8, top_p=0.95)
    out.response_ids, out.logprobs, out.logit_floor, out.finish_reason
"""

from __future__ import annotations

from .engine import RolloutEngine, RolloutRunner, TransformersRunner
from .sampling import SampleResult, sample, truncation_floor
from .types import FINISH_REASONS, Rollout, SamplingParams

__all__ = [
    "FINISH_REASONS",
    "Rollout",
    "RolloutEngine",
    "RolloutRunner",
    "SampleResult",
    "SamplingParams",
    "TransformersRunner",
    "sample",
    "truncation_floor",
]
