"""Observations to token ids, one turn at a time: the history is never re-tokenised.

An episode runs in one of two modes, fixed by its first observation:

- **plain text** (the first observation is a string): the prompt is ``tokenizer.encode(text)``
  (exactly as ``RolloutEngine`` encodes a string prompt) and each later observation is appended
  verbatim, ``tokenizer.encode(text, add_special_tokens=False)``: the env writes its own separators.
- **chat** (the first observation is chat messages, or ``chat=True``): the prompt is rendered as the
  engine renders chat prompts (the tokenizer's chat template with the generation prompt; without a
  template, ``"role: content\\n"`` lines then ``"assistant:"``). A later observation (a string is a
  ``user`` message) is appended as the template's *delta*:

      closing = what the template writes after an assistant message's content (e.g. "<|im_end|>\\n"),
                less the eos text when the model's turn ended with that eos token
      delta   = render(base + new, add_generation_prompt=True)[len(render(base)):]
      ids     = tokenizer.encode(closing + delta, add_special_tokens=False)

  with ``base`` a fixed two-message conversation. A template that renders ``base`` differently once
  a message follows it (so no delta exists) raises a ValueError naming the tokenizer.

Only the new text is tokenised, so the ids of turn k are a prefix of the ids of turn k + 1 and the
model's sampled ids stay exactly as sampled (the price: merges across a turn boundary, which a
re-tokenisation of the joined text might make, never happen; the model sees what it produced).
"""

from __future__ import annotations

from collections.abc import Sequence

_USER, _REPLY = "alignkit-user-sentinel", "alignkit-reply-sentinel"


def _plain_chat(messages: Sequence[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


class TurnEncoder:
    """Token ids of an episode's first observation (:meth:`prompt`) and of each later one
    (:meth:`observation`) for ``tokenizer`` (see the module docstring)."""

    def __init__(self, tokenizer) -> None:
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self._base_text = ""
        self._closing = "\n"  # the plain layout ends every message with a newline
        if self.template:
            base = self._base()
            text = self._render(base, generation_prompt=False)
            at = text.rfind(_REPLY)
            if at < 0:
                raise ValueError(
                    f"the chat template of {type(tokenizer).__name__} drops the assistant's content; "
                    "observations cannot be appended as a delta"
                )
            self._base_text, self._closing = text, text[at + len(_REPLY) :]

    @staticmethod
    def _base() -> list[dict[str, str]]:
        return [{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}]

    def _render(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def prompt(self, observation: str | list[dict[str, str]], *, chat: bool) -> list[int]:
        """The ids of the first observation (as RolloutEngine would encode the same prompt)."""
        if not chat:
            return list(self.tokenizer.encode(observation))
        messages = [{"role": "user", "content": observation}] if isinstance(observation, str) else observation
        if self.template:
            text = self._render(messages, generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(_plain_chat(messages) + "assistant:"))

    def observation(
        self, observation: str | list[dict[str, str]], *, chat: bool, eos_text: str | None, where: str
    ) -> list[int]:
        """The ids of a later observation. ``eos_text``: the decoded eos token that ended the model's
        turn (None when the turn ended otherwise: cut at the budget or on a stop string)."""
        if not chat:
            if not isinstance(observation, str):
                raise TypeError(
                    f"{where} returned chat messages in an episode that began with a plain-text "
                    "observation; return a string (or begin with chat messages)"
                )
            return list(self.tokenizer.encode(observation, add_special_tokens=False)) if observation else []
        messages = [{"role": "user", "content": observation}] if isinstance(observation, str) else observation
        closing = self._closing
        if eos_text and closing.startswith(eos_text):
            closing = closing[len(eos_text) :]  # the model already wrote the end of its turn
        if self.template:
            text = self._render([*self._base(), *messages], generation_prompt=True)
            if not text.startswith(self._base_text):
                raise ValueError(
                    f"the chat template of {type(self.tokenizer).__name__} renders earlier turns "
                    "differently once a new message follows; observations cannot be appended as a delta"
                )
            delta = text[len(self._base_text) :]
        else:
            delta = _plain_chat(messages) + "assistant:"
        return list(self.tokenizer.encode(closing + delta, add_special_tokens=False))
