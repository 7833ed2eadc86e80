"""The built-in environments, registered as ``alignkit/Addition-v0`` and ``alignkit/GuessNumber-v0``.

- :class:`AdditionEnv` (single turn): the demo's fixed-width addition (``"07+38="`` -> ``"045"``,
  alignkit/demo/task.py), rewarded exactly as the demo rewards it: ``correctness + 0.1 * well_formed``.
- :class:`GuessNumberEnv` (multi turn): a secret integer in ``[low, high]``; each reply is a guess,
  answered ``"higher"`` (the secret is higher than the guess), ``"lower"`` or ``"correct"``. Solving on
  turn k pays ``1 - step_cost * (k - 1)``; a reply with no integer in it costs ``invalid_penalty``;
  with ``closeness > 0`` (shaping, default 0) a wrong guess earns ``closeness * (1 - |guess - secret|
  / (high - low))`` (clipped at 0), a dense signal for moving towards the secret.
  Every text is made of lower-case letters, digits, ``-`` and ``:`` only, so the demo's character
  tokenizer (alignkit.demo.char_tokenizer) encodes it, and one prompt with a handful of feedback
  words is small enough for a tiny model to learn binary search on a CPU.
"""

from __future__ import annotations

import re
from typing import Any

from .. import _checks
from ..demo import task
from .core import TextEnv

_INTEGER = re.compile(r"-?\d+")


class AdditionEnv(TextEnv):
    """The demo's addition task as a single-turn env: the observation is the prompt (``"07+38="``), the
    reply is scored by the demo's reward functions with the demo's weights, and the episode ends.

    ``reset(options={"a": 7, "b": 38})`` poses a given problem; otherwise both operands are drawn
    uniformly from ``[0, 10**digits)`` with ``self.np_random``. The final observation is the answer.
    """

    def __init__(self, *, digits: int = task.DIGITS, render_mode: str | None = None) -> None:
        super().__init__(max_turns=1, max_length=64, render_mode=render_mode)
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
            raise ValueError(f"digits must be an int in [1, 6], got {digits!r}")
        self.digits = digits
        self.problem: task.Problem | None = None

    def start(self, options: dict[str, Any]):
        top = 10**self.digits
        if "a" in options or "b" in options:
            a, b = (_checks.non_negative_int(options.get(k), f"options[{k!r}]") for k in ("a", "b"))
            if a >= top or b >= top:
                raise ValueError(
                    f"options a and b must be below {top} for digits={self.digits}, got {a}, {b}"
                )
        else:
            a, b = (int(x) for x in self.np_random.integers(0, top, size=2))
        self.problem = task.format_problem(a, b, digits=self.digits)
        return self.problem.prompt, {"answer": self.problem.answer}

    def respond(self, reply: str):
        problem = self.problem
        scores = [fn([problem.prompt], [reply], answer=[problem.answer])[0] for fn in task.REWARD_FUNCTIONS]
        reward = sum(w * s for w, s in zip(task.REWARD_WEIGHTS, scores, strict=True))
        info = {"answer": problem.answer, "correct": bool(scores[0] == 1.0)}
        return problem.answer, float(reward), True, info


class GuessNumberEnv(TextEnv):
    """Guess the secret integer in ``[low, high]`` (see the module docstring for the rewards).

    Observations: ``"guess 1-16:"`` at reset, then ``"higher:"``, ``"lower:"``, ``"invalid:"`` (no
    integer in the reply) and finally ``"correct"``. The guess is the first integer in the reply.
    ``reset(options={"secret": 5})`` fixes the secret (else drawn with ``self.np_random``).
    """

    def __init__(
        self,
        *,
        low: int = 1,
        high: int = 16,
        max_turns: int = 6,
        step_cost: float = 0.1,
        invalid_penalty: float = 0.1,
        closeness: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(max_turns=max_turns, max_length=256, render_mode=render_mode)
        self.low = _checks.integer(low, "low")
        self.high = _checks.integer(high, "high")
        if self.high <= self.low:
            raise ValueError(f"high must be greater than low ({self.low}), got {self.high}")
        self.step_cost = _checks.non_negative(step_cost, "step_cost")
        self.invalid_penalty = _checks.non_negative(invalid_penalty, "invalid_penalty")
        self.closeness = _checks.non_negative(closeness, "closeness")
        self.secret: int | None = None

    def start(self, options: dict[str, Any]):
        if "secret" in options:
            secret = _checks.integer(options["secret"], "options['secret']")
            if not self.low <= secret <= self.high:
                raise ValueError(f"options['secret'] must be in [{self.low}, {self.high}], got {secret}")
        else:
            secret = int(self.np_random.integers(self.low, self.high + 1))
        self.secret = secret
        return f"guess {self.low}-{self.high}:", {}

    def respond(self, reply: str):
        found = _INTEGER.search(reply)
        guess = int(found.group()) if found is not None else None
        if guess is None:
            return "invalid:", -self.invalid_penalty, False, {"guess": None, "solved": False}
        if guess == self.secret:
            reward = 1.0 - self.step_cost * (self.turn - 1)
            return "correct", reward, True, {"guess": guess, "solved": True}
        feedback = "higher:" if self.secret > guess else "lower:"
        # Shaping (closeness > 0): a wrong guess earns closeness x (1 - its distance / the range), at
        # most closeness x (1 - 1 / (high - low)) < step_cost when closeness <= step_cost, so solving
        # a turn earlier still pays more than a near miss.
        distance = min(abs(guess - self.secret), self.high - self.low)
        reward = self.closeness * (1.0 - distance / (self.high - self.low))
        return feedback, reward, False, {"guess": guess, "solved": False}
