"""Advantage estimators by algorithm name: a small registry (verl's ``register_adv_est`` idea), so
algorithms differ by a registered function, not by branches through the training loop.

Each estimator takes the iteration's :class:`Scored` samples and the config and returns per-token
advantages (N, T) over the response tokens (0 elsewhere), or ``(advantages, returns)`` when the
algorithm also trains a value function (ppo). Whitening over the batch is over the whole global
batch when training data-parallel (alignkit.trainer.distributed). The math is alignkit's ops
(docs/formulas.md, "Group (outcome) advantages", "Discounted returns", "Masked whitening").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops.advantages import discounted_returns, gae
from ..ops.group_advantages import group_advantages
from ..ops.losses import kl_penalty
from .config import RLConfig
from .distributed import masked_whiten


@dataclass
class Scored:
    """One iteration's samples after the reward and the no-grad scoring pass (response positions)."""

    scores: torch.Tensor  # (N,) float32 sequence rewards
    group_ids: torch.Tensor  # (N,) int64 prompt index of each row
    mask: torch.Tensor  # (N, T) float32 response mask
    old_logp: torch.Tensor  # (N, T) float32 log-probs of the policy that sampled
    ref_logp: torch.Tensor | None  # (N, T) float32 reference log-probs, None without a reference
    values: torch.Tensor | None = None  # (N, T) float32 values of the rollout's states (ppo)
    turn_rewards: torch.Tensor | None = None  # (N, T) per-turn rewards of env episodes, else None


Estimator = Callable[[Scored, RLConfig], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
ESTIMATORS: dict[str, Estimator] = {}


def register_advantage(name: str) -> Callable[[Estimator], Estimator]:
    """Register ``fn(scored, config) -> (N, T) advantages`` under an algorithm name."""

    def register(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return register


def advantages_for(
    algorithm: str, scored: Scored, config: RLConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages, returns)``; returns are None for algorithms without a value function."""
    out = ESTIMATORS[algorithm](scored, config)
    return out if isinstance(out, tuple) else (out, None)


def _group(method: str):
    def estimate(scored: Scored, config: RLConfig) -> torch.Tensor:
        return group_advantages(
            scored.scores, scored.group_ids, method=method, eps=config.group_eps, mask=scored.mask
        )

    return estimate


register_advantage("grpo")(_group("grpo"))
register_advantage("dapo")(_group("grpo"))  # DAPO: GRPO advantages; clip-higher and dynamic sampling
register_advantage("dr_grpo")(_group("dr_grpo"))
register_advantage("rloo")(_group("rloo"))
register_advantage("reinforce++-baseline")(_group("reinforce++-baseline"))


def token_rewards(scored: Scored, config: RLConfig) -> torch.Tensor:
    """(N, T) rewards: the sequence score on each row's last response token (env episodes: each
    turn's reward on the last token of that turn), minus ``kl_coef * k1(old, ref)`` on every
    response token when the KL goes into the reward."""
    mask = scored.mask
    if scored.turn_rewards is not None:
        rewards = scored.turn_rewards.to(mask.dtype)
    else:
        last = (mask * torch.arange(mask.shape[1], dtype=mask.dtype)).argmax(-1)  # (N,) last response token
        rewards = torch.zeros_like(mask).scatter_(1, last[:, None], scored.scores[:, None].to(mask.dtype))
    if config.kl_in_reward and config.kl_coef > 0 and scored.ref_logp is not None:
        k1 = kl_penalty(scored.old_logp, scored.ref_logp, kl_estimator="k1")
        rewards = rewards - config.kl_coef * torch.where(mask != 0, k1, 0.0)
    return rewards


@register_advantage("reinforce++")
def _reinforce_plus_plus(scored: Scored, config: RLConfig) -> torch.Tensor:
    # REINFORCE++: per-token reward-to-go, whitened over the batch's response tokens.
    returns = discounted_returns(token_rewards(scored, config), scored.mask, gamma=config.gamma)
    return torch.where(scored.mask != 0, masked_whiten(returns, scored.mask), 0.0)


@register_advantage("ppo")
def _ppo(scored: Scored, config: RLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # PPO: GAE over the per-token rewards with the rollout's values; the returns (the value
    # targets) are taken before the advantages are whitened over the batch (verl's default).
    if scored.values is None:
        raise ValueError("algorithm='ppo' needs the rollout's values (Scored.values), got None")
    advantages, returns = gae(
        token_rewards(scored, config), scored.values, scored.mask, gamma=config.gamma, lam=config.gae_lambda
    )
    return torch.where(scored.mask != 0, masked_whiten(advantages, scored.mask), 0.0), returns
