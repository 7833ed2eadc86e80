"""``TextEnv``: a Gymnasium environment whose observation is text and whose action is the model's reply.

One episode is a conversation::

    obs, info = env.reset(seed=0)            # the first user turn: a string (or chat messages)
    obs, reward, terminated, truncated, info = env.step(reply)   # obs: what the env says next

``step`` returns the environment's *new* turn, not the whole conversation: the collector
(:func:`alignkit.envs.collect_episodes`) keeps the history as token ids and appends each new turn to
it. A subclass implements two hooks, :meth:`TextEnv.start` and :meth:`TextEnv.respond`; ``reset`` and
``step`` add the seeding, the turn count (``truncated=True`` once ``max_turns`` replies have been
answered without the episode terminating) and the checks on what the hooks return.

Spaces: ``gymnasium.spaces.Text`` over :data:`CHARSET` (printable ASCII: letters, digits,
punctuation, space, tab and newline), ``min_length=0``, ``max_length`` characters (default 4096),
for both the observation and the action. Chat-message observations use :func:`chat_space`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from .. import _checks

CHARSET: str = string.printable  # printable ASCII: the documented charset of the text spaces
DEFAULT_MAX_LENGTH = 4096  # characters per observation / action


class EnvError(RuntimeError):
    """An environment returned something the collector cannot use (the message names the env)."""


def text_space(max_length: int = DEFAULT_MAX_LENGTH, charset: str = CHARSET) -> spaces.Text:
    """``spaces.Text(max_length, min_length=0, charset=charset)``: any string of at most
    ``max_length`` characters drawn from ``charset`` (the empty string included)."""
    return spaces.Text(_checks.positive_int(max_length, "max_length"), min_length=0, charset=charset)


def chat_space(max_length: int = DEFAULT_MAX_LENGTH, charset: str = CHARSET) -> spaces.Sequence:
    """Chat messages: a tuple of ``{"role": str, "content": str}`` dicts (Gymnasium's ``Sequence``
    space holds tuples, so a chat env returns ``tuple(messages)``)."""
    text = text_space(max_length, charset)
    role = spaces.Text(32, min_length=1, charset=string.ascii_letters + "_")
    return spaces.Sequence(spaces.Dict({"role": role, "content": text}))


def env_name(env: object) -> str:
    """A readable name for ``env`` in messages: its spec id when it has one, else its class."""
    spec = getattr(env, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        return str(spec.id)
    inner = getattr(env, "unwrapped", env)
    return type(inner).__name__


def is_messages(value: object) -> bool:
    """Whether ``value`` is a non-empty list / tuple of mappings (chat messages)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def check_observation(value: object, where: str) -> str | list[dict[str, str]]:
    """``value`` itself when it is a string or chat messages (each a mapping with string ``role``
    and ``content``; returned as a list of plain dicts); else TypeError naming ``where``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return []  # no new messages (a chat env's final observation)
    if is_messages(value):
        messages = []
        for j, message in enumerate(value):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise TypeError(
                    f"{where} returned chat message {j} without string 'role' and 'content': "
                    f"{dict(message)!r}"
                )
            messages.append({"role": role, "content": content})
        return messages
    raise TypeError(
        f"{where} must return a string or a list of chat messages as the observation, "
        f"got {type(value).__name__}: {value!r:.80}"
    )


def check_reward(value: object, where: str) -> float:
    """``value`` as a float when it is a finite real number (bools refused); else ValueError / TypeError
    naming ``where`` and the value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} returned a reward of type {type(value).__name__} ({value!r:.80}): "
                        "rewards must be finite floats")  # fmt: skip
    if not math.isfinite(float(value)):
        raise ValueError(f"{where} returned the reward {value!r}: rewards must be finite floats")
    return float(value)


def check_flag(value: object, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} returned {name}={value!r} ({type(value).__name__}): it must be a bool")
    return bool(value)


class TextEnv(gymnasium.Env):
    """A text environment: observations are strings (or chat messages), actions are replies (str).

    Subclasses implement :meth:`start` (the first observation, drawn with ``self.np_random``) and
    :meth:`respond` (the reply's consequence). ``reset``/``step`` follow Gymnasium's API.

    Args:
        max_turns: replies per episode; the ``max_turns``-th reply that does not terminate the
            episode returns ``truncated=True``.
        max_length: characters of the observation and action spaces.
        charset: characters of the spaces (default :data:`CHARSET`, printable ASCII).
        render_mode: None or ``"ansi"`` (``render()`` returns the conversation so far as text).
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012

    def __init__(
        self,
        *,
        max_turns: int = 1,
        max_length: int = DEFAULT_MAX_LENGTH,
        charset: str = CHARSET,
        render_mode: str | None = None,
    ) -> None:
        self.max_turns = _checks.positive_int(max_turns, "max_turns")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.observation_space = text_space(max_length, charset)
        self.action_space = text_space(max_length, charset)
        self.turn = 0  # replies answered in this episode
        self.transcript: list[tuple[str, object]] = []  # (speaker, text) of this episode
        self._done = True

    # ------------------------------------------------------------------------- the two hooks

    def start(self, options: dict[str, Any]) -> tuple[str | Sequence[Mapping[str, str]], dict[str, Any]]:
        """The first observation and its info (draw randomness from ``self.np_random``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement start(options)")

    def respond(self, reply: str) -> tuple[str | Sequence[Mapping[str, str]], float, bool, dict[str, Any]]:
        """(next observation, reward, terminated, info) after the model's ``reply``."""
        raise NotImplementedError(f"{type(self).__name__} must implement respond(reply)")

    # ------------------------------------------------------------------------- Gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
        self.turn = 0
        observation, info = self.start(dict(options or {}))
        where = f"{env_name(self)}.reset"
        observation = check_observation(observation, where)
        if isinstance(observation, list):
            observation = tuple(observation)  # what chat_space contains
        self.transcript = [("env", observation)]
        self._done = False
        return observation, {**dict(info), "turn": 0}

    def step(self, action: str):
        where = f"{env_name(self)}.step"
        if not isinstance(action, str):
            raise TypeError(f"{where} takes the model's reply as a string, got {type(action).__name__}")
        if self._done:
            raise RuntimeError(f"{where} called on a finished episode: call reset() first")
        self.turn += 1
        observation, reward, terminated, info = self.respond(action)
        observation = check_observation(observation, where)
        if isinstance(observation, list):
            observation = tuple(observation)
        reward = check_reward(reward, where)
        terminated = check_flag(terminated, "terminated", where)
        truncated = not terminated and self.turn >= self.max_turns
        self._done = terminated or truncated
        self.transcript += [("model", action), ("env", observation)]
        return observation, reward, terminated, truncated, {**dict(info), "turn": self.turn}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        lines = []
        for speaker, text in self.transcript:
            body = text if isinstance(text, str) else "\n".join(f"{m['role']}: {m['content']}" for m in text)
            lines.append(f"[{speaker}] {body}")
        return "\n".join(lines)
