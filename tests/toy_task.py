"""The toy RL task the trainer and env tests share: one-character prompts, the "share of digits"
reward (learnable from random init in seconds), and a tiny Llama with the demo's character
tokenizer, saved and reloaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

PROMPTS = [f"{c}:" for c in "abcdefghijklmnop"]


def digit_share(prompts, completions, **meta):
    """The share of digits in each completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def save_tiny_llama(
    folder: Path, *, hidden_size: int = 32, intermediate_size: int = 64, seed: int = 0
) -> Path:
    """A one-layer random-init Llama and the char tokenizer, saved to ``folder`` and reloaded."""
    from alignkit.demo import char_tokenizer, save_and_reload, tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(
        len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=1,
        seed=seed,
    )  # fmt: skip
    save_and_reload(model, tokenizer, folder)
    return folder
