"""What a rollout returns (:class:`Rollout`) and the validated sampling settings of one call.

Both are plain dataclasses; every backend (the built-in decode loop, a future vLLM one) takes a
:class:`SamplingParams` and returns a :class:`Rollout`, so the trainer and the replay buffer never
see which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .. import _checks
from .random_streams import check_seed

FinishReason = Literal["eos", "stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("eos", "stop", "length")


@dataclass
class Rollout:
    """Samples of a batch of prompts, rows prompt-major (prompt i's n samples are contiguous).

    Positions follow the left-padded convention ``position_ids = cumsum(mask) - 1`` over
    ``cat(prompt_mask, response_mask)`` (:meth:`position_ids`). Tensors live on the model's device.
    """

    prompt_ids: torch.Tensor  # (N, P) int64, left-padded with the pad token
    prompt_mask: torch.Tensor  # (N, P) int64, 1 for prompt tokens, 0 for padding
    response_ids: torch.Tensor  # (N, T) int64, right-padded; exactly the sampled ids
    response_mask: torch.Tensor  # (N, T) int64, 1 for sampled tokens (the eos / stop token included)
    logprobs: torch.Tensor  # (N, T) float32, log-prob under the processed distribution, 0 at padding
    logit_floor: torch.Tensor | None  # (N, T) float32 per-step floor (-inf at padding); None untruncated
    finish_reason: list[str]  # (N,) "eos" | "stop" | "length"
    group_ids: torch.Tensor  # (N,) int64, the index of each row's prompt
    texts: list[str] | None = None  # (N,) decoded responses when the engine has a tokenizer

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        for name in ("prompt_mask", "response_ids", "response_mask", "logprobs", "group_ids"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"{name} must have {n} rows (as prompt_ids), got {tuple(getattr(self, name).shape)}"
                )
        if len(self.finish_reason) != n:
            raise ValueError(f"finish_reason must have {n} entries, got {len(self.finish_reason)}")
        bad = sorted(set(self.finish_reason) - set(FINISH_REASONS))
        if bad:
            raise ValueError(f"finish_reason must hold only {', '.join(FINISH_REASONS)}, got {bad}")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) int64 sampled tokens per row."""
        return self.response_mask.sum(-1)

    def input_ids(self) -> torch.Tensor:
        """(N, P + T) ``cat(prompt_ids, response_ids)``: what the trainer scores."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(N, P + T) ``cat(prompt_mask, response_mask)``."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """(N, P + T) ``cumsum(mask) - 1``, clamped at 0 on the left padding (where it is unused)."""
        return (self.attention_mask().cumsum(-1) - 1).clamp_min(0)


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of one ``generate`` call, validated in ``__post_init__``."""

    max_new_tokens: int  # response budget per row, >= 1
    n: int = 1  # samples per prompt, >= 1
    min_new_tokens: int = 0  # eos and stop tokens suppressed before this many tokens
    temperature: float = 1.0  # >= 0; 0 is greedy
    top_k: int = 0  # >= 0; 0 is off
    top_p: float = 1.0  # in (0, 1]; 1 is off
    stop_strings: tuple[str, ...] = ()  # a row stops once its decoded response contains one
    stop_token_ids: tuple[int, ...] = ()  # a row stops when it samples one (it is kept)
    seed: int | tuple[int, ...] | None = None  # one int >= 0 per prompt, an int, or None (drawn)

    def __post_init__(self) -> None:
        _checks.positive_int(self.max_new_tokens, "max_new_tokens")
        _checks.positive_int(self.n, "n")
        _checks.non_negative_int(self.min_new_tokens, "min_new_tokens")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        _checks.non_negative(self.temperature, "temperature")
        _checks.non_negative_int(self.top_k, "top_k")
        if not 0.0 < _checks.finite(self.top_p, "top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncated(self) -> bool:
        """Whether top-k / top-p truncation is active (then the rollout has a ``logit_floor``)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def split_stop(stop: object) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``stop`` (None, a string, a token id, or a sequence of them) as (stop strings, stop token ids)."""
    if stop is None:
        return (), ()
    items: Sequence[object] = [stop] if isinstance(stop, (str, int)) else stop
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise TypeError(
            f"stop must be None, a string, a token id or a list of them, got {type(stop).__name__}"
        )
    strings: list[str] = []
    ids: list[int] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError("stop must not contain an empty string")
            strings.append(item)
        elif isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"stop entries must be strings or token ids (int), got {type(item).__name__}")
        elif item < 0:
            raise ValueError(f"stop token ids must be >= 0, got {item}")
        else:
            ids.append(int(item))
    return tuple(dict.fromkeys(strings)), tuple(dict.fromkeys(ids))
