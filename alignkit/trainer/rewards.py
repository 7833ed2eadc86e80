"""Reward functions as the trainer calls them: TRL's convention, checked.

A reward is ``reward_fn(prompts, completions, **meta) -> list[float]`` (one score per completion;
``meta`` holds ``completion_ids`` and every extra column of dict prompts, one entry per row), an
``async def`` of the same shape, a list of such functions combined with ``reward_weights``, or a
sequence-classification model (``AutoModelForSequenceClassification`` with one label) that scores
``prompt + completion``. Several functions, async ones among them, run concurrently. A function
that raises, returns the wrong number of scores or a non-finite one stops the iteration with a
message naming the function and the sample.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _checks


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable (the message says which and where)."""


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class ModelReward:
    """A sequence-classification model with one output as a reward function: the score of
    ``prompt + completion`` (tokenized with ``tokenizer``, right-padded, in batches of ``batch_size``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 16) -> None:
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValueError(f"a reward model must have one output (config.num_labels == 1), got {labels}")
        if tokenizer is None:
            raise TypeError("a reward model needs a tokenizer to encode prompt + completion, got None")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.__qualname__ = f"{type(model).__name__} reward model"

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **meta: Any) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = slice(start, start + self.batch_size)
            texts = [p + c for p, c in zip(prompts[rows], completions[rows], strict=True)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


class RewardFunction:
    """Calls the user's reward function(s) on one batch and returns (N,) float32 scores, their
    weighted sum, and each function's mean (for the log)."""

    def __init__(self, reward_fn: object, *, reward_weights: Sequence[float] | None = None, tokenizer=None):
        if isinstance(reward_fn, torch.nn.Module):
            reward_fn = ModelReward(reward_fn, tokenizer)
        functions = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        if not functions:
            raise ValueError(
                "reward_fn must be a function or a non-empty list of functions, got an empty list"
            )
        for fn in functions:
            if not callable(fn):
                raise TypeError(f"reward_fn entries must be callable, got {type(fn).__name__}")
        if reward_weights is None:
            weights = [1.0] * len(functions)
        else:
            weights = [_checks.finite(w, "reward_weights") for w in reward_weights]
            if len(weights) != len(functions):
                raise ValueError(
                    f"reward_weights must hold one weight per reward function ({len(functions)}), "
                    f"got {len(weights)}"
                )
        self.functions: list[Callable] = functions
        self.weights = weights

    @property
    def names(self) -> list[str]:
        return [_name(fn) for fn in self.functions]

    def __call__(
        self, prompts: list[str], completions: list[str], meta: dict[str, list]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        results = _run_all(self.functions, prompts, completions, meta)
        total = torch.zeros(len(completions), dtype=torch.float32)
        per_function: dict[str, float] = {}
        for fn, weight, scores in zip(self.functions, self.weights, results, strict=True):
            values = _checked(fn, scores, prompts, completions)
            total += weight * values
            per_function[f"reward/{_name(fn)}"] = float(values.mean())
        return total, per_function


def _run_all(functions, prompts, completions, meta) -> list[object]:
    """Every function's raw result; coroutine functions (and async results) run concurrently."""
    results: list[object] = [None] * len(functions)
    pending: dict[int, Any] = {}
    for i, fn in enumerate(functions):
        try:
            out = fn(prompts, completions, **meta)
        except Exception as exc:
            raise RewardError(f"reward function {_name(fn)} raised {type(exc).__name__}: {exc}") from exc
        if inspect.isawaitable(out):
            pending[i] = out
        else:
            results[i] = out
    if pending:

        async def gather():
            return await asyncio.gather(*pending.values(), return_exceptions=True)

        for i, out in zip(pending, asyncio.run(gather()), strict=True):
            if isinstance(out, BaseException):
                raise RewardError(
                    f"reward function {_name(functions[i])} raised {type(out).__name__}: {out}"
                ) from out
            results[i] = out
    return results


def _checked(fn, scores: object, prompts: list[str], completions: list[str]) -> torch.Tensor:
    name = _name(fn)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().reshape(-1).tolist()
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)):
        raise RewardError(f"reward function {name} must return a list of floats, got {type(scores).__name__}")
    if len(scores) != len(completions):
        raise RewardError(
            f"reward function {name} returned {len(scores)} scores for {len(completions)} completions"
        )
    values = []
    for i, s in enumerate(scores):
        bad = isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s))
        if bad:
            raise RewardError(
                f"reward function {name} returned {s!r} for sample {i} (prompt {prompts[i]!r}, completion "
                f"{completions[i]!r}): scores must be finite numbers"
            )
        values.append(float(s))
    return torch.tensor(values, dtype=torch.float32)
