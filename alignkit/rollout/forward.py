"""The two forwards of the decode loop, gpt-fast style: ``prefill`` and ``decode_one_token``.

Both call the Hugging Face model itself (used live: no weight copy, so after an optimizer step the
next rollout samples from the new weights) with a :class:`~alignkit.rollout.cache.PreallocatedCache`
and return fp32 logits of the last position only, (rows, V).

Attention masks are built here, in the format of the model's attention implementation, so that
``transformers`` has no mask to build per step: ``sdpa`` takes a bool (b, 1, q, kv) mask (True:
attend) and ``eager`` an additive float mask. Other implementations (flash-attention, flex) get the
2-D padding mask and build their own.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .cache import PreallocatedCache

_FOUR_D_MASKS = ("sdpa", "eager")


@dataclass(frozen=True)
class ModelSpec:
    """What the decode loop needs to know about a causal LM, read once from the model."""

    num_layers: int  # decoder layers (one cache layer each)
    vocab_size: int  # rows of the input embedding: prompt ids must be below it
    context: int | None  # maximum positions (max_position_embeddings / n_positions), None if unknown
    cache_kwarg: str  # "cache" (transformers >= 5.x) or "past_key_values"
    logits_to_keep: bool  # whether forward accepts logits_to_keep
    attention: str  # config._attn_implementation

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSpec:
        config = (
            model.config.get_text_config(decoder=True)
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        if not isinstance(layers, int):
            raise TypeError(
                "model must be a Hugging Face causal LM with a num_hidden_layers config, "
                f"got {type(model).__name__}"
            )
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            kinds = sorted(set(layer_types) - {"full_attention"})
            raise ValueError(
                f"model has {', '.join(kinds)} layers; the built-in rollout runner supports full-attention "
                "decoders only (Llama, Qwen2, GPT-2 style)"
            )
        embeddings = model.get_input_embeddings()
        vocab = getattr(embeddings, "num_embeddings", None) or config.vocab_size
        context = None
        for name in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(config, name, None), int):
                context = getattr(config, name)
                break
        params = inspect.signature(model.forward).parameters
        cache_kwarg = "cache" if "cache" in params else "past_key_values"
        attention = getattr(config, "_attn_implementation", None) or "eager"
        return cls(layers, int(vocab), context, cache_kwarg, "logits_to_keep" in params, attention)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) as eager attention's additive float mask."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


def prefill_mask(prompt_mask: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """The mask of the left-padded prefill: (U, 1, P, P) causal and padding (or the 2-D (U, P) one).

    A padding query attends to itself only (its output is never read), so no row is fully masked."""
    if spec.attention not in _FOUR_D_MASKS:
        return prompt_mask
    width = prompt_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=prompt_mask.device).tril_()
    eye = torch.eye(width, dtype=torch.bool, device=prompt_mask.device)
    mask = (causal & prompt_mask.bool()[:, None, None, :]) | eye  # (U, 1, P, P)
    return mask if spec.attention == "sdpa" else additive_mask(mask, dtype)


def decode_mask(cache: PreallocatedCache, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask of one decode step over the filled length plus the new position: (b, 1, 1, L + 1)."""
    length = cache.get_seq_length() + 1
    keys = cache.key_mask[: cache.active, :length]  # (b, L + 1) bool view, True: a real position
    if spec.attention not in _FOUR_D_MASKS:
        return keys.long()
    if not cache.has_padding:
        return None  # q = 1 attends to every cached position: no mask at all
    mask = keys[:, None, None, :]
    return mask if spec.attention == "sdpa" else additive_mask(mask, dtype)


def last_logits(model, spec: ModelSpec, ids, positions, cache, mask) -> torch.Tensor:
    """One forward of ``ids`` through the model with ``cache``; the last position's fp32 logits (b, V)."""
    kwargs = {"logits_to_keep": 1} if spec.logits_to_keep else {}
    kwargs[spec.cache_kwarg] = cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1].float()  # (b, V)


def prefill(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    cache: PreallocatedCache,
    *,
    spec: ModelSpec,
    prompt_mask: torch.Tensor,
) -> torch.Tensor:
    """Run the U distinct left-padded prompts ``ids`` (U, P) at ``positions`` (U, P) and fill the cache
    (each prompt's states go to its ``cache.repeats`` rows). Returns the next-token logits (U, V)."""
    mask = prefill_mask(prompt_mask, spec, model.dtype)
    return last_logits(model, spec, ids, positions, cache, mask)


def decode_one_token(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: PreallocatedCache,
    *,
    spec: ModelSpec,
) -> torch.Tensor:
    """Feed the last sampled ``tokens`` (b,) at ``positions`` (b,) of the cache's active rows; returns
    the next-token logits (b, V)."""
    mask = decode_mask(cache, spec, model.dtype)
    return last_logits(model, spec, tokens[:, None], positions[:, None], cache, mask)
