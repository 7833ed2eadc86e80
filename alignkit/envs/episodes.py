"""``Episodes``: multi-turn rollouts in the layout the trainer reads from a :class:`~alignkit.Rollout`.

One row per episode::

    prompt_ids    | response_ids (everything after the first observation)
    [pad pad p p] | [m m m e | o o o | m m e | o o | m e | pad pad]
                     model     obs     model  obs  model  padding
    response_mask    1 1 1 1   0 0 0   1 1 1   0 0  1 1   0 0      only the model's tokens
    response_attn    1 1 1 1   1 1 1   1 1 1   1 1  1 1   0 0      model and observation tokens
    turn_rewards     0 0 0 r1  0 0 0   0 0 r2  0 0  0 r3  0 0      on each model turn's last token

Positions follow the rollout convention ``cumsum(attention_mask) - 1`` over
``cat(prompt_mask, response_attention)``, so the scored sequence is exactly the one the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

EPISODE_END_REASONS: tuple[str, ...] = ("terminated", "truncated", "max_turns", "max_total_tokens")


@dataclass
class Episodes:
    """Episodes of text envs, rows in the order of the envs given to ``collect_episodes``."""

    prompt_ids: torch.Tensor  # (N, P) int64, the first observation's ids, left-padded
    prompt_mask: torch.Tensor  # (N, P) int64, 1 on prompt tokens
    response_ids: torch.Tensor  # (N, T) int64, model and observation turns interleaved, right-padded
    response_mask: torch.Tensor  # (N, T) int64, 1 ONLY on model-sampled tokens (the trained ones)
    response_attention: torch.Tensor  # (N, T) int64, 1 on model and observation tokens, 0 on padding
    logprobs: torch.Tensor  # (N, T) float32, the sampler's log-prob of each model token, 0 elsewhere
    logit_floor: (
        torch.Tensor | None
    )  # (N, T) float32 per-token floor (-inf off model tokens); None untruncated
    turn_rewards: torch.Tensor  # (N, T) float32, each turn's reward on the last token of that model turn
    returns: torch.Tensor  # (N,) float32, the sum of the turn rewards
    group_ids: torch.Tensor  # (N,) int64, episodes of a group start from the same reset seed
    finish_reason: list[str]  # (N,) why the episode ended: one of EPISODE_END_REASONS
    texts: list[str] | None = None  # (N,) the decoded response span (model and observation turns)
    replies: list[list[str]] = field(default_factory=list)  # (N, turns) each model reply, as env.step got it
    observations: list[list[Any]] = field(default_factory=list)  # (N, turns + 1) every observation
    turn_finish_reasons: list[list[str]] = field(default_factory=list)  # (N, turns) "eos" | "stop" | "length"
    infos: list[list[dict[str, Any]]] = field(default_factory=list)  # (N, turns + 1) reset and step infos

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        for name in ("prompt_mask", "response_ids", "response_mask", "response_attention", "logprobs",
                     "turn_rewards", "returns", "group_ids"):  # fmt: skip
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"{name} must have {n} rows (as prompt_ids), got {tuple(getattr(self, name).shape)}"
                )
        for name in ("response_mask", "response_attention", "logprobs", "turn_rewards"):
            if getattr(self, name).shape != self.response_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of response_ids {tuple(self.response_ids.shape)}, "
                    f"got {tuple(getattr(self, name).shape)}"
                )
        if len(self.finish_reason) != n:
            raise ValueError(f"finish_reason must have {n} entries, got {len(self.finish_reason)}")
        bad = sorted(set(self.finish_reason) - set(EPISODE_END_REASONS))
        if bad:
            raise ValueError(f"finish_reason must hold only {', '.join(EPISODE_END_REASONS)}, got {bad}")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) int64 model-sampled tokens per episode."""
        return self.response_mask.sum(-1)

    @property
    def num_turns(self) -> torch.Tensor:
        """(N,) int64 model turns per episode."""
        return torch.tensor([len(r) for r in self.replies], dtype=torch.int64)

    def input_ids(self) -> torch.Tensor:
        """(N, P + T) ``cat(prompt_ids, response_ids)``: what the trainer scores."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(N, P + T) ``cat(prompt_mask, response_attention)``: observation tokens are attended."""
        return torch.cat([self.prompt_mask, self.response_attention], dim=1)

    def position_ids(self) -> torch.Tensor:
        """(N, P + T) ``cumsum(mask) - 1``, clamped at 0 on the left padding (where it is unused)."""
        return (self.attention_mask().cumsum(-1) - 1).clamp_min(0)
