"""The trainer's rollouts from Gymnasium text environments (``Trainer(env=...)``) in place of prompts
and a reward function: one episode per sample, multi-turn, the env owning the reward.

Each iteration builds ``prompts_per_iteration x num_generations`` fresh envs (this rank's share);
the ``num_generations`` episodes of a group are reset with the same seed (the same problem, several
samples: GRPO's group), and :func:`alignkit.envs.collect_episodes` plays them all at once. The
episodes are a drop-in for a :class:`~alignkit.Rollout` (observation tokens are attended but carry
mask 0, so they are never trained on); the sequence score is the episode's return and token-level
algorithms (ppo, reinforce++) get each turn's reward on that turn's last token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from . import distributed


def env_factory(env: object) -> Callable[[], Any]:
    """A function making a fresh env from an env id (``gymnasium.make``), a factory, or an instance
    (deep-copied per episode)."""
    try:
        import gymnasium

        import alignkit.envs  # noqa: F401  (registers the built-in ids)
    except ImportError as exc:
        raise ImportError("Trainer(env=...) needs gymnasium: pip install 'alignkit[envs]'") from exc
    if isinstance(env, str):
        if env not in gymnasium.registry:
            known = sorted(k for k in gymnasium.registry if k.startswith("alignkit/"))
            raise ValueError(f"env {env!r} is not a registered Gymnasium id (alignkit's: {known})")
        return lambda: gymnasium.make(env)
    if isinstance(env, gymnasium.Env):
        return lambda: copy.deepcopy(env)
    if callable(env):
        return env
    raise TypeError(f"env must be a Gymnasium env id, an env instance or a factory, got {type(env).__name__}")


def collect(trainer, iteration: int):
    """This rank's episodes for ``iteration``: (episodes, scores (N,), per-function reward means,
    extra metrics)."""
    from ..envs import collect_episodes

    cfg = trainer.config
    groups = trainer.prompts_per_rank
    envs = [trainer.make_env() for _ in range(groups * cfg.num_generations)]
    first = trainer.rank * groups  # global group index: reset seeds do not depend on the rank count
    group_ids = torch.arange(first, first + groups).repeat_interleave(cfg.num_generations)
    try:
        episodes = collect_episodes(
            trainer.engine, envs, tokenizer=trainer.tokenizer, max_turns=cfg.max_turns,
            max_total_tokens=cfg.max_total_tokens, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop,
            seed=trainer.seed_for(iteration, 0), group_ids=group_ids,
        )  # fmt: skip
    finally:
        for env in envs:
            env.close()
    episodes.group_ids = episodes.group_ids - first  # the trainer's group ids are local
    # Totals over every rank (one all-reduce under torchrun): env steps = model replies.
    local = torch.tensor(
        [float(episodes.num_turns.sum()), float(sum(r == "terminated" for r in episodes.finish_reason)),
         float(len(episodes))]
    )  # fmt: skip
    steps, terminated, count = distributed.all_reduce_sum(local).tolist()
    extra: dict[str, Any] = {
        "env/steps": int(steps),
        "env/turns_mean": steps / count,
        "env/terminated": terminated / count,
    }
    return episodes, episodes.returns.float(), {}, extra
