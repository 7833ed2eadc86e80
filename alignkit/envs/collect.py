"""``collect_episodes``: many multi-turn episodes at once on top of ``RolloutEngine.generate``.

Each round generates one turn for every live episode in one ``engine.generate`` call whose prompts
are the episodes' full token histories (ids, used as given), then steps each env with its decoded
reply and appends the env's answer as token ids (alignkit/envs/turns.py: only the new observation
is tokenised)::

    reset every env (episodes of one group with the same seed) -> prompt ids
    for round in range(max_turns):
        out = engine.generate(histories of the live episodes, max_new_tokens=..., seed=...)
        for each live episode:
            keep the sampled ids / log-probs / floors exactly (cut at the episode's token budget)
            obs, reward, terminated, truncated, info = env.step(decoded reply)
            reward -> the last token of this model turn
            ended (terminated / truncated / the next observation does not fit)?  else append obs ids
    episodes still running after max_turns end with "max_turns"

Budgets, per episode: ``max_new_tokens`` per model turn; ``max_total_tokens`` over prompt + every
turn. A reply is cut where the total would pass ``max_total_tokens`` (it still reaches ``env.step``,
as a length-cut completion still reaches the reward in single-turn training); the episode ends with
``"max_total_tokens"`` when the next observation plus one model token would not fit (that
observation is not appended). Nothing loops past ``max_turns`` rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _checks
from .core import EnvError, check_flag, check_observation, check_reward, env_name
from .episodes import Episodes
from .turns import TurnEncoder


@dataclass
class _Episode:
    """One episode's growing state (host lists; tensors are built once at the end)."""

    env: Any
    index: int  # position in the envs given (keys its sampling stream)
    where: str
    chat: bool
    prompt: list[int]
    ids: list[int] = field(default_factory=list)  # the response span: model and observation tokens
    model: list[int] = field(default_factory=list)  # 1 on model tokens
    logprobs: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per token of ids
    replies: list[str] = field(default_factory=list)
    observations: list[Any] = field(default_factory=list)
    turn_reasons: list[str] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    end: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.ids)

    def history(self) -> list[int]:
        return self.prompt + self.ids


def mix_seeds(*parts: int) -> int:
    """A deterministic seed from integers (the reset seed of a group, the sampling seed of a round)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**31 - 1)
    return value


def _context(engine) -> int | None:
    config = getattr(getattr(engine, "model", None), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(tokenizer) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            return value
    return 0


def _check_envs(envs: object) -> list[Any]:
    if isinstance(envs, (str, bytes)) or not isinstance(envs, Sequence):
        raise TypeError(f"envs must be a list of environments (one per episode), got {type(envs).__name__}")
    if len(envs) == 0:
        raise ValueError("envs must hold at least one environment, got an empty list")
    for i, env in enumerate(envs):
        if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
            raise TypeError(f"envs[{i}] must be a gymnasium env (reset and step), got {type(env).__name__}")
    if len({id(env) for env in envs}) != len(envs):
        raise ValueError("envs must be distinct instances: each runs its own episode")
    return list(envs)


def _check_group_ids(group_ids: object, count: int) -> list[int]:
    if group_ids is None:
        return list(range(count))
    values = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else group_ids
    if not isinstance(values, Sequence) or len(values) != count:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise ValueError(f"group_ids must hold one id per env ({count}), got {got}")
    return [_checks.non_negative_int(g, "group_ids") for g in values]


def _reset(env, *, index: int, seed: int, where: str, encoder: TurnEncoder, chat: bool | None) -> _Episode:
    result = env.reset(seed=seed)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EnvError(f"{where}.reset must return (observation, info), got {type(result).__name__}")
    observation, info = result
    try:
        observation = check_observation(observation, f"{where}.reset")
    except TypeError as exc:
        raise EnvError(str(exc)) from exc
    if observation in ("", []):
        raise EnvError(f"{where}.reset returned an empty observation: the first turn needs text")
    is_chat = isinstance(observation, list) if chat is None else bool(chat)
    prompt = encoder.prompt(observation, chat=is_chat)
    episode = _Episode(env=env, index=index, where=where, chat=is_chat, prompt=prompt)
    if not episode.prompt:
        raise EnvError(f"{where}.reset returned {observation!r}, which encodes to no tokens")
    episode.observations.append(observation)
    episode.infos.append(dict(info) if isinstance(info, dict) else {"info": info})
    return episode


def _step(episode: _Episode, reply: str) -> tuple[Any, float, bool, bool, dict[str, Any]]:
    where = f"{episode.where}.step"
    result = episode.env.step(reply)
    if not (isinstance(result, tuple) and len(result) == 5):
        raise EnvError(
            f"{where} must return (observation, reward, terminated, truncated, info), "
            f"got {type(result).__name__} of length {len(result) if isinstance(result, tuple) else '-'}"
        )
    observation, reward, terminated, truncated, info = result
    try:
        return (
            check_observation(observation, where), check_reward(reward, where),
            check_flag(terminated, "terminated", where), check_flag(truncated, "truncated", where),
            dict(info) if isinstance(info, dict) else {"info": info},
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise EnvError(str(exc)) from exc


def collect_episodes(
    engine,
    envs: Sequence[Any],
    *,
    tokenizer,
    max_turns: int,
    max_total_tokens: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    stop=None,
    chat: bool | None = None,
) -> Episodes:
    """Run one episode in each of ``envs`` (distinct instances), all at once, and return them as
    :class:`Episodes` (the module docstring gives the loop and the budgets).

    Args:
        engine: an :class:`alignkit.RolloutEngine` (its public ``generate``).
        envs: one env per episode (a TextEnv, a ToolEnv, anything with Gymnasium's reset / step and
            text observations).
        tokenizer: the model's tokenizer (observation turns and decoded replies).
        max_turns: model turns per episode, >= 1.
        max_total_tokens: prompt + all turns, per episode (at most the model's context).
        max_new_tokens: tokens per model turn.
        temperature, top_k, top_p, stop: sampling, as in ``RolloutEngine.generate``.
        seed: None (drawn from torch's generator) or an int: resets and sampling repeat exactly.
        group_ids: (N,) ints; episodes of one group are reset with the same seed (a GRPO group: the
            same problem, different samples). Default: every episode its own group.
        chat: None: an episode is in chat mode when its first observation is chat messages; True: a
            string first observation becomes a user message (chat template); False: plain text.

    Raises:
        EnvError: an env returned a non-string observation, a non-finite or non-numeric reward, a
            non-bool flag or a malformed tuple (the message names the env and the value).
    """
    envs = _check_envs(envs)
    max_turns = _checks.positive_int(max_turns, "max_turns")
    max_total_tokens = _checks.positive_int(max_total_tokens, "max_total_tokens")
    max_new_tokens = _checks.positive_int(max_new_tokens, "max_new_tokens")
    if chat is not None:
        chat = _checks.flag(chat, "chat")
    context = _context(engine)
    if context is not None and max_total_tokens > context:
        raise ValueError(
            f"max_total_tokens must be at most the model's context ({context} positions), "
            f"got {max_total_tokens}"
        )
    groups = _check_group_ids(group_ids, len(envs))
    base = _checks.integer(seed, "seed") if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
    encoder = TurnEncoder(tokenizer)

    episodes = []
    for i, (env, group) in enumerate(zip(envs, groups, strict=True)):
        where = f"envs[{i}] ({env_name(env)})"
        episode = _reset(
            env, index=i, seed=mix_seeds(base, 0, group), where=where, encoder=encoder, chat=chat
        )
        if episode.length >= max_total_tokens:
            raise ValueError(
                f"{where}: the first observation has {episode.length} tokens, leaving no room for a reply "
                f"within max_total_tokens={max_total_tokens}"
            )
        episodes.append(episode)

    truncated_sampling = False
    for round_ in range(max_turns):
        live = [e for e in episodes if e.end is None]
        if not live:
            break
        budgets = [max_total_tokens - e.length for e in live]  # each >= 1
        out = engine.generate(
            [e.history() for e in live], n=1, max_new_tokens=min(max_new_tokens, max(budgets)),
            temperature=temperature, top_k=top_k, top_p=top_p, stop=stop,
            # One seed per episode: its samples do not depend on which other episodes are live.
            seed=[mix_seeds(base, 1 + round_, e.index) for e in live] if seed is not None else None,
        )  # fmt: skip
        truncated_sampling |= out.logit_floor is not None
        lengths = out.response_mask.sum(-1).tolist()
        ids_rows, logp_rows = out.response_ids.tolist(), out.logprobs.tolist()
        floor_rows = out.logit_floor.tolist() if out.logit_floor is not None else None
        for r, (episode, budget) in enumerate(zip(live, budgets, strict=True)):
            length = min(int(lengths[r]), budget)
            ids = ids_rows[r][:length]
            cut = length < int(lengths[r])
            reason = "length" if cut else out.finish_reason[r]
            reply = tokenizer.decode(ids, skip_special_tokens=True)
            episode.ids += ids
            episode.model += [1] * length
            episode.logprobs += logp_rows[r][:length]
            episode.floors += floor_rows[r][:length] if floor_rows is not None else [float("-inf")] * length
            observation, reward, terminated, truncated, info = _step(episode, reply)
            episode.rewards += [0.0] * (length - 1) + [reward]
            episode.replies.append(reply)
            episode.turn_reasons.append(reason)
            episode.observations.append(observation)
            episode.infos.append(info)
            if terminated or truncated:
                episode.end = "terminated" if terminated else "truncated"
                continue
            if round_ + 1 == max_turns:
                episode.end = "max_turns"
                continue
            eos_text = tokenizer.decode(ids[-1:], skip_special_tokens=False) if reason == "eos" else None
            delta = encoder.observation(
                observation, chat=episode.chat, eos_text=eos_text, where=f"{episode.where}.step"
            )
            if episode.length + len(delta) + 1 > max_total_tokens:
                episode.end = "max_total_tokens"
                continue
            episode.ids += delta
            episode.model += [0] * len(delta)
            episode.logprobs += [0.0] * len(delta)
            episode.floors += [float("-inf")] * len(delta)
            episode.rewards += [0.0] * len(delta)
    return _assemble(episodes, groups, tokenizer, truncated_sampling, device=_device(engine))


def _device(engine) -> torch.device:
    model = getattr(engine, "model", None)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _assemble(episodes: list[_Episode], groups: list[int], tokenizer, truncated: bool, *, device) -> Episodes:
    n = len(episodes)
    width = max(len(e.prompt) for e in episodes)
    steps = max(max(len(e.ids) for e in episodes), 1)
    pad = _pad_id(tokenizer)
    prompt_ids = torch.full((n, width), pad, dtype=torch.int64)
    prompt_mask = torch.zeros((n, width), dtype=torch.int64)
    response_ids = torch.full((n, steps), pad, dtype=torch.int64)
    response_mask = torch.zeros((n, steps), dtype=torch.int64)
    attention = torch.zeros((n, steps), dtype=torch.int64)
    logprobs = torch.zeros((n, steps), dtype=torch.float32)
    floor = torch.full((n, steps), float("-inf"), dtype=torch.float32)
    rewards = torch.zeros((n, steps), dtype=torch.float32)
    for i, e in enumerate(episodes):
        p, t = len(e.prompt), len(e.ids)
        prompt_ids[i, width - p :] = torch.tensor(e.prompt, dtype=torch.int64)
        prompt_mask[i, width - p :] = 1
        if t:
            response_ids[i, :t] = torch.tensor(e.ids, dtype=torch.int64)
            response_mask[i, :t] = torch.tensor(e.model, dtype=torch.int64)
            attention[i, :t] = 1
            logprobs[i, :t] = torch.tensor(e.logprobs, dtype=torch.float32)
            floor[i, :t] = torch.tensor(e.floors, dtype=torch.float32)
            rewards[i, :t] = torch.tensor(e.rewards, dtype=torch.float32)
    texts = [tokenizer.decode(e.ids, skip_special_tokens=True) for e in episodes]
    return Episodes(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
        response_ids=response_ids.to(device), response_mask=response_mask.to(device),
        response_attention=attention.to(device), logprobs=logprobs.to(device),
        logit_floor=floor.to(device) if truncated else None, turn_rewards=rewards.to(device),
        returns=rewards.sum(-1).to(device), group_ids=torch.tensor(groups, dtype=torch.int64, device=device),
        finish_reason=[e.end or "max_turns" for e in episodes], texts=texts,
        replies=[e.replies for e in episodes], observations=[e.observations for e in episodes],
        turn_finish_reasons=[e.turn_reasons for e in episodes], infos=[e.infos for e in episodes],
    )  # fmt: skip
