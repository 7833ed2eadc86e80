"""One protocol for reward functions and environments, in both directions.

A reward function (TRL's ``reward_fn(prompts, completions, **meta) -> list[float]``, async, a list
with weights, or a one-label reward model: anything ``alignkit.Trainer`` takes) and a single-turn
text env say the same thing: a prompt, a completion, a finite float. So:

- :func:`reward_env` turns a reward function and its prompts into a single-turn :class:`TextEnv`
  (``reset`` poses a prompt, ``step(completion)`` scores it and terminates), usable with
  :func:`collect_episodes` and anything Gymnasium;
- :func:`env_reward` turns an env into a reward function for today's ``Trainer(reward_fn=...)``:
  each completion is scored as the reply to the env's first observation, the env reset with the
  row's ``env_seed`` (and ``env_options``) columns, which :func:`env_prompts` writes::

      trainer = alignkit.Trainer(model, tokenizer, reward_fn=env_reward(env),
                                 prompts=env_prompts(env, count=1000, seed=0), config=config)

  A multi-turn env scored this way gives its first turn's reward only; multi-turn training goes
  through :func:`collect_episodes`.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium

from .. import _checks
from ..trainer.rewards import RewardError, RewardFunction
from .core import (
    DEFAULT_MAX_LENGTH,
    TextEnv,
    chat_space,
    check_observation,
    check_reward,
    env_name,
    is_messages,
)


class RewardEnv(TextEnv):
    """A reward function and its prompts as a single-turn env (built by :func:`reward_env`).

    ``reset`` poses a prompt chosen with ``self.np_random`` (or ``options={"index": i}``); a dict
    prompt's other keys reach the reward as ``meta`` columns, as in the trainer. ``step`` scores the
    reply and terminates; the final observation is empty (``""``, or ``()`` for chat prompts).
    """

    def __init__(
        self,
        reward_fn: object,
        prompts: Sequence[object],
        *,
        reward_weights: Sequence[float] | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(max_turns=1, max_length=max_length, render_mode=render_mode)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of prompts, got {prompts!r:.80}")
        rows = []
        for i, p in enumerate(prompts):
            row = dict(p) if isinstance(p, Mapping) else {"prompt": p}
            if "prompt" not in row:
                raise ValueError(f"prompts[{i}] is a dict without a 'prompt' key: {sorted(row)}")
            check_observation(row["prompt"], f"prompts[{i}]")
            rows.append(row)
        self.rows = rows
        if any(is_messages(r["prompt"]) for r in rows):
            self.observation_space = chat_space(max_length, string.printable)
        self.reward = RewardFunction(reward_fn, reward_weights=reward_weights)
        self.row: dict[str, Any] | None = None

    def start(self, options: dict[str, Any]):
        if "index" in options:
            index = _checks.non_negative_int(options["index"], "options['index']")
            if index >= len(self.rows):
                raise ValueError(f"options['index'] must be below {len(self.rows)}, got {index}")
        else:
            index = int(self.np_random.integers(len(self.rows)))
        self.row = self.rows[index]
        prompt = self.row["prompt"]
        return (tuple(dict(m) for m in prompt) if is_messages(prompt) else prompt), {"index": index}

    def respond(self, reply: str):
        meta = {k: [v] for k, v in self.row.items() if k != "prompt"}
        try:
            scores, per_function = self.reward([self.row["prompt"]], [reply], meta)
        except RewardError as exc:
            raise RewardError(f"{env_name(self)}: {exc}") from exc
        final = () if isinstance(self.observation_space, gymnasium.spaces.Sequence) else ""
        return final, float(scores[0]), True, dict(per_function)


def reward_env(
    reward_fn: object,
    prompts: Sequence[object],
    *,
    reward_weights: Sequence[float] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> RewardEnv:
    """``reward_fn`` (TRL's convention, as ``alignkit.Trainer`` takes it) over ``prompts`` (strings,
    chat messages, or dicts with a ``prompt`` key whose other keys are ``meta`` columns) as a
    single-turn :class:`TextEnv`."""
    return RewardEnv(reward_fn, prompts, reward_weights=reward_weights, max_length=max_length)


def _make(env: object) -> gymnasium.Env:
    if isinstance(env, str):
        return gymnasium.make(env)
    if callable(env) and not hasattr(env, "step"):
        env = env()
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise TypeError(f"env must be an env id, an env or a factory of envs, got {type(env).__name__}")
    return env


def env_prompts(
    env: object, count: int, *, seed: int, options: Mapping[str, Any] | None = None
) -> list[dict]:
    """``count`` trainer prompt rows ``{"prompt": first observation, "env_seed": s}`` (plus
    ``env_options`` when given) from resets of ``env`` (an id, an env or a factory) with the seeds
    ``seed, seed + 1, ...``: the columns :func:`env_reward` resets with."""
    count = _checks.positive_int(count, "count")
    seed = _checks.integer(seed, "seed")
    env = _make(env)
    rows = []
    for k in range(count):
        observation, _ = env.reset(seed=seed + k, options=dict(options) if options is not None else None)
        observation = check_observation(observation, f"{env_name(env)}.reset")
        row: dict[str, Any] = {"prompt": observation, "env_seed": seed + k}
        if options is not None:
            row["env_options"] = dict(options)
        rows.append(row)
    return rows


def env_reward(env: object) -> Callable[..., list[float]]:
    """A TRL-style reward function that scores each completion as the reply to ``env``'s first
    observation (``env``: an id, an env or a factory; one instance is reused row by row). Each row
    resets the env with its ``env_seed`` column (and ``env_options`` when present), so the prompt
    rows must come from :func:`env_prompts` (or carry those columns)."""
    instance = _make(env)
    name = env_name(instance)

    def reward(prompts: list, completions: list[str], **meta: Any) -> list[float]:
        seeds = meta.get("env_seed")
        if seeds is None:
            raise KeyError(f"env_reward({name}) needs an 'env_seed' column in the prompts (use env_prompts)")
        options = meta.get("env_options") or [None] * len(completions)
        scores = []
        for i, completion in enumerate(completions):
            instance.reset(seed=int(seeds[i]), options=options[i])
            _, value, *_ = instance.step(completion)
            scores.append(check_reward(value, f"{name}.step (row {i})"))
        return scores

    reward.__qualname__ = f"env_reward({name})"
    return reward
