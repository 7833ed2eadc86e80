"""Prompts in, token ids out; stop strings; the special tokens of a model.

A prompt is a string (encoded with the tokenizer), a token-id list or 1-D integer tensor (used as
given: never re-tokenised, so multi-turn RL can feed back exactly the ids it sampled), or a list of
chat messages (``{"role": ..., "content": ...}``), rendered with the tokenizer's chat template when
it has one (with the generation prompt appended) and with a plain ``role: content`` layout when it
has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _is_chat(prompt: object) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


def _render_chat(messages: Sequence[Mapping], tokenizer, where: str) -> list[int]:
    for j, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(
                f"{where}[{j}] must be a chat message with 'role' and 'content', got {dict(message)}"
            )
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))  # the template has its specials
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text))


def encode_prompts(prompts: object, tokenizer, *, vocab_size: int, context: int | None) -> list[list[int]]:
    """Each prompt of ``prompts`` as a list of token ids, checked against the model.

    Raises TypeError for a prompt of the wrong kind (or text without a tokenizer) and ValueError for
    an empty list, an empty prompt, an id outside [0, vocab_size), or a prompt that leaves no room
    in the model's ``context`` for a new token."""
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        got = type(prompts).__name__
        raise TypeError(
            f"prompts must be a list of prompts (strings, token-id lists or chat messages), got {got}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty list")
    encoded: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        where = f"prompts[{i}]"
        if isinstance(prompt, str) or _is_chat(prompt):
            if tokenizer is None:
                kind = "a string" if isinstance(prompt, str) else "a chat-message list"
                raise TypeError(
                    f"{where} is {kind}: RolloutEngine needs a tokenizer to encode it (tokenizer=None)"
                )
            ids = (
                list(tokenizer.encode(prompt))
                if isinstance(prompt, str)
                else _render_chat(prompt, tokenizer, where)
            )
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise TypeError(
                    f"{where} must be a 1-D integer tensor of token ids, "
                    f"got {prompt.dtype} {tuple(prompt.shape)}"
                )
            ids = prompt.tolist()
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
            for j, token in enumerate(ids):
                if isinstance(token, bool) or not isinstance(token, int):
                    raise TypeError(f"{where}[{j}] must be a token id (int), got {type(token).__name__}")
        else:
            raise TypeError(
                f"{where} must be a string, a token-id list or a chat-message list, "
                f"got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError(f"{where} must hold at least one token, got an empty prompt")
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"
            )
        if context is not None and len(ids) >= context:
            raise ValueError(
                f"{where} has {len(ids)} tokens: longer than the model's context of {context} positions "
                "minus one for a new token"
            )
        encoded.append([int(t) for t in ids])
    return encoded


def left_pad(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (len(prompt_ids), P) int64, left-padded to the longest prompt P."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.int64)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _as_id_set(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return {int(value)}
    return {int(v) for v in value}


def special_tokens(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id) of a model: the generation config's eos ids, else the tokenizer's, else the
    model config's; pad from the tokenizer, the generation config, the config, else an eos id, else 0."""
    generation = getattr(model, "generation_config", None)
    config = model.config
    eos = _as_id_set(getattr(generation, "eos_token_id", None))
    if not eos and tokenizer is not None:
        eos = _as_id_set(getattr(tokenizer, "eos_token_id", None))
    if not eos:
        eos = _as_id_set(getattr(config, "eos_token_id", None))
    pad = None
    for source in (tokenizer, generation, config):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(value, int):
            pad = value
            break
    if pad is None:
        pad = min(eos) if eos else 0
    return tuple(sorted(eos)), int(pad)


class StopStrings:
    """Finds the first step at which a row's decoded response contains one of the stop strings.

    Each check decodes only the last tokens of the row (enough to hold the longest stop string plus
    a few tokens for partial characters): a stop string that ends in an earlier token would already
    have stopped the row then."""

    def __init__(self, strings: Sequence[str], tokenizer) -> None:
        if strings and tokenizer is None:
            raise TypeError(
                "stop holds strings: RolloutEngine needs a tokenizer to detect them (tokenizer=None)"
            )
        self.strings = tuple(strings)
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.strings)

    def hit(self, tokens: Sequence[int]) -> bool:
        """Whether the last token of the response ``tokens`` completes a stop string (an occurrence
        that ends in the text the last token added; earlier ones do not count)."""
        tail = list(tokens[-self.window :])
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False) if len(tail) > 1 else ""
        added_from = len(before) if text.startswith(before) else 0
        return any(text.find(s, max(0, added_from - len(s) + 1)) >= 0 for s in self.strings)
