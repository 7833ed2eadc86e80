"""Log-probs of n responses per prompt, each distinct prompt forwarded once.

GRPO-style batches hold n samples of every prompt. Scoring them as whole rows (prompt + response)
runs every prompt token n times through the model; here each distinct prompt runs once, its key /
value states are copied to its rows (an index along the batch, so backward sums the rows'
gradients into the prompt's), and the responses attend to them. The math is that of
:func:`~alignkit.ops.logprobs.causal_lm_logprobs` on the whole rows (tested equal in float64,
forward and gradients); the saving is the prompt share of the forward and backward FLOPs::

    whole rows:     N * (P + T) tokens through the model
    shared prompt:  U * P + N * (T - 1) tokens           (U distinct prompts, N = U * n rows)

Layout (the rollout engine's)::

    prompt_ids     (U, P)  left-padded distinct prompts, prompt_mask (U, P) 1 on real tokens
    response_ids   (N, T)  right-padded responses, response_mask (N, T) 1 on real tokens
    prompt_index   (N,)    the prompt row r continues

Response token j of row r is predicted by the prompt's last state (j = 0) or by response position
j - 1: the outputs are (N, T), aligned with ``response_ids``. Decoders with full attention only
(Llama, Qwen2, GPT-2, ...): a sliding-window or hybrid model raises ``ValueError``.

Gradient checkpointing (Hugging Face's, non-reentrant): a checkpointed layer runs its forward again
in backward, so a cache it *writes* would be written twice; transformers therefore drops the cache
in checkpointed layers, except in layers marked as cache readers (``_can_checkpoint_with_cache``).
Here the responses only read the prompt's states (:class:`_PrefixLayer` returns prompt + new states
and stores nothing), so their layers are marked readers for that forward and stay checkpointed;
the prompt pass, the one writer, runs as a single checkpointed block (its layers' own checkpointing
off inside it) that returns the prompt's key / value states, so its activations are recomputed in
backward too. The body's own flag (which makes GPT-2's body withhold the cache from its layers) is
off during both passes: the layers checkpoint themselves. Memory: the key / value states of every
layer for the U prompts, plus the usual checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # older transformers: the body checkpoints its layers (no sharing then)
    GradientCheckpointingLayer = None

from .. import _checks
from .logprobs import check_token_range, fused_linear_logprobs, output_head

__all__ = [
    "SharedPromptBatch",
    "shared_prompt_hidden",
    "shared_prompt_logprobs",
    "split_shared_prompts",
    "supports_shared_prompts",
]


class SharedPromptBatch(NamedTuple):
    """Rows of whole sequences split into distinct prompts and responses (module docstring)."""

    prompt_ids: torch.Tensor  # (U, P) int64, left-padded (pad id 0)
    prompt_mask: torch.Tensor  # (U, P) bool
    response_ids: torch.Tensor  # (N, T) int64, right-padded (pad id 0)
    response_mask: torch.Tensor  # (N, T) bool
    prompt_index: torch.Tensor  # (N,) int64 in [0, U)
    response_columns: torch.Tensor  # (N, T) int64: the column of each response token in the input rows


def split_shared_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: torch.Tensor
) -> SharedPromptBatch:
    """Split rows (prompt then response, each row's real tokens one contiguous run, padded on either
    side) at ``response_start`` (N,) (the column of each row's first response token) and deduplicate
    the prompts: rows whose prompt tokens are equal share one prompt row.

    Gather per-token fields of the input layout into the response layout with
    ``field.gather(1, batch.response_columns)`` (and ``batch.response_mask``). Reads three numbers on
    the host (the widths and the number of distinct prompts): a device sync on CUDA."""
    input_ids = _checks.integer_tensor(input_ids, "input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (N, L) integer tensor, got shape {tuple(input_ids.shape)}")
    attention = _checks.mask(attention_mask, "attention_mask", input_ids, "input_ids").bool()
    response_start = _checks.integer_tensor(response_start, "response_start")
    if response_start.shape != input_ids.shape[:1]:
        raise ValueError(
            f"response_start must have shape ({input_ids.shape[0]},) (one column per row), "
            f"got {tuple(response_start.shape)}"
        )
    _checks.same_device(response_start, "response_start", input_ids, "input_ids")
    width = input_ids.shape[1]
    lengths = attention.sum(-1)
    first = attention.to(torch.int8).argmax(-1)  # the first real column of each row
    end = first + lengths
    prompt_lengths = response_start - first
    response_lengths = end - response_start
    if _checks.checks_values(input_ids):
        columns = torch.arange(width, device=input_ids.device)
        contiguous = (attention == ((columns >= first[:, None]) & (columns < end[:, None]))).all()
        if not bool(contiguous):
            raise ValueError("attention_mask must mark one contiguous run of real tokens per row")
        if bool((prompt_lengths < 1).any() | (response_lengths < 0).any()):
            raise ValueError(
                "response_start must lie after at least one prompt token and within each row's real tokens"
            )
    P = int(prompt_lengths.max()) if input_ids.shape[0] else 1
    T = int(response_lengths.max()) if input_ids.shape[0] else 0
    # Prompts right-aligned in P columns; -1 marks padding, so unequal lengths never compare equal.
    offsets = torch.arange(P, device=input_ids.device)
    source = (response_start[:, None] - P + offsets).clamp(0, width - 1)
    real = offsets >= (P - prompt_lengths)[:, None]
    keys = torch.where(real, input_ids.gather(1, source), -1)
    distinct, prompt_index = torch.unique(keys, dim=0, return_inverse=True)
    steps = torch.arange(T, device=input_ids.device)
    response_columns = (response_start[:, None] + steps).clamp(max=width - 1)
    response_mask = steps < response_lengths[:, None]
    response_ids = torch.where(response_mask, input_ids.gather(1, response_columns), 0)
    return SharedPromptBatch(
        prompt_ids=distinct.clamp_min(0).to(torch.int64), prompt_mask=distinct >= 0,
        response_ids=response_ids.to(torch.int64), response_mask=response_mask,
        prompt_index=prompt_index.to(torch.int64), response_columns=response_columns,
    )  # fmt: skip


def _checkpointing_flagged(body: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules with Hugging Face gradient checkpointing turned on (the body and / or its layers)."""
    return [m for m in body.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _checkpointed_layers(body: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers that checkpoint themselves (transformers' ``GradientCheckpointingLayer``)."""
    if GradientCheckpointingLayer is None:
        return []
    return [m for m in _checkpointing_flagged(body) if isinstance(m, GradientCheckpointingLayer)]


def _reader_checkpointing(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` checkpoints in a way a cache reader can share: transformers' per-layer
    checkpointing (which knows cache readers, ``_can_checkpoint_with_cache``), non-reentrant (a
    reentrant checkpoint sends no gradient to the prompt states, which are not its inputs)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return (
        hasattr(type(layer), "_can_checkpoint_with_cache")
        and isinstance(func, functools.partial)
        and func.keywords.get("use_reentrant") is False
    )


def supports_shared_prompts(model: torch.nn.Module) -> bool:
    """Whether :func:`shared_prompt_logprobs` can run ``model``: a causal LM with a separate body and
    full attention in every layer; with gradient checkpointing on, transformers' non-reentrant
    per-layer checkpointing (module docstring), as ``activation_checkpointing_enable`` sets it up."""
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if body is None or body is model or config is None:
        return False
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    # transformers sets ``gradient_checkpointing`` on the body (older: the body checkpoints its
    # layers, cache dropped) or also on its layers (5.2x: each layer checkpoints itself).
    if not _checkpointing_flagged(body):
        return True
    layers = _checkpointed_layers(body)
    return bool(layers) and all(_reader_checkpointing(m) for m in layers)


class _PrefixLayer(DynamicLayer):
    """A cache layer holding the U prompts' states: ``update`` returns each row's prompt states
    (``rows`` (N,) indexes the prompts) + the new states and stores nothing, so a checkpointed
    layer's recompute sees exactly what its forward saw, and the N-row copy of the prompt states
    exists only inside the layer's forward (a checkpoint does not keep it)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        super().update(keys, values)  # DynamicLayer's own initialisation holds the prefix
        self.rows = rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = torch.cat([self.keys.index_select(0, self.rows), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.rows), value_states], dim=-2)
        return keys, values


_MISSING = object()


@contextlib.contextmanager
def _set_on(modules: list[torch.nn.Module], name: str, value: bool) -> Iterator[None]:
    """Set attribute ``name`` on each module instance for a while (restoring what it had)."""
    saved = [m.__dict__.get(name, _MISSING) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, old in zip(modules, saved, strict=True):
            if old is _MISSING:
                delattr(m, name)
            else:
                setattr(m, name, old)


def _prompt_pass(body, cache_kwarg: str, flagged: list[torch.nn.Module], ids, mask, positions):
    """The prompts through the body: (last hidden states (U, P, H), keys, values per layer). With
    gradient checkpointing on (``flagged``: the modules with the flag), one checkpointed block (the
    module docstring)."""

    def run(ids, mask, positions):
        cache = DynamicCache()
        with _set_on(flagged, "gradient_checkpointing", False):
            out = body(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kwarg: cache},
            )  # fmt: skip
        states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        layers = cache.layers
        return (states, *(layer.keys for layer in layers), *(layer.values for layer in layers))

    if flagged and body.training and torch.is_grad_enabled():
        outs = torch.utils.checkpoint.checkpoint(run, ids, mask, positions, use_reentrant=False)
    else:
        outs = run(ids, mask, positions)
    count = (len(outs) - 1) // 2
    return outs[0], outs[1 : 1 + count], outs[1 + count :]


def shared_prompt_hidden(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    prompt_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (N, T, H) last hidden states that predict the response tokens (the body only, no
    lm_head), each distinct prompt forwarded once; arguments as :func:`shared_prompt_logprobs`.
    For a loss that applies the lm_head itself (``fused_linear_ppo_loss``)."""
    prompt_ids = _checks.integer_tensor(prompt_ids, "prompt_ids")
    response_ids = _checks.integer_tensor(response_ids, "response_ids")
    for name, ids in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
        if ids.dim() != 2:
            raise ValueError(f"{name} must be a 2-D integer tensor, got shape {tuple(ids.shape)}")
    prompt_mask = _checks.mask(prompt_mask, "prompt_mask", prompt_ids, "prompt_ids").bool()
    response_mask = _checks.mask(response_mask, "response_mask", response_ids, "response_ids").bool()
    prompt_index = _checks.integer_tensor(prompt_index, "prompt_index")
    rows, T = response_ids.shape
    if prompt_index.shape != (rows,):
        raise ValueError(
            f"prompt_index must have shape ({rows},) (one prompt per response row), "
            f"got {tuple(prompt_index.shape)}"
        )
    _checks.same_device(prompt_index, "prompt_index", response_ids, "response_ids")
    _checks.same_device(prompt_ids, "prompt_ids", response_ids, "response_ids")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must hold at least one prompt token, got shape {tuple(prompt_ids.shape)}"
        )
    if _checks.checks_values(prompt_ids):
        if rows and bool((prompt_index < 0).any() | (prompt_index >= prompt_ids.shape[0]).any()):
            raise ValueError(f"prompt_index must lie in [0, {prompt_ids.shape[0]}) (the rows of prompt_ids)")
        if not bool(prompt_mask[:, -1].all()):
            raise ValueError(
                "prompt_mask must be left-padded: the last column of every prompt is a real token"
            )
    if prompt_position_ids is not None:
        prompt_position_ids = _checks.integer_tensor(prompt_position_ids, "prompt_position_ids")
        if prompt_position_ids.shape != prompt_ids.shape:
            raise ValueError(
                f"prompt_position_ids must have the shape of prompt_ids {tuple(prompt_ids.shape)}, "
                f"got {tuple(prompt_position_ids.shape)}"
            )
        _checks.same_device(prompt_position_ids, "prompt_position_ids", prompt_ids, "prompt_ids")
    if not supports_shared_prompts(model):
        raise ValueError(
            f"model ({type(model).__name__}) cannot share prompt states: it needs a base_model body, full "
            "attention in every layer and, with gradient checkpointing, transformers' non-reentrant "
            "per-layer checkpointing; use causal_lm_logprobs on whole rows"
        )
    check_token_range(model, prompt_ids)
    check_token_range(model, response_ids)
    body = model.base_model
    cache_kwarg = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    flagged = _checkpointing_flagged(body)
    layers = _checkpointed_layers(body)
    others = [m for m in flagged if all(m is not layer for layer in layers)]  # the body itself
    # The prompts run right-padded (a gather of the left-padded rows): no query row is fully masked,
    # which turns eager attention's softmax into NaN in float64. The keys then hold the prompt, its
    # padding (masked), and the response.
    P = prompt_ids.shape[1]
    lengths = prompt_mask.sum(-1)  # (U,)
    columns = torch.arange(P, device=prompt_ids.device)
    real = columns < lengths[:, None]  # (U, P) right-padded mask
    source = (columns + (P - lengths)[:, None]).clamp(max=P - 1)
    if prompt_position_ids is None:
        positions = torch.where(real, columns, 0)  # (U, P): real tokens count from 0
    else:
        positions = torch.where(real, prompt_position_ids.gather(1, source), 0)
    ids = torch.where(real, prompt_ids.gather(1, source), 0)
    states, keys, values = _prompt_pass(body, cache_kwarg, flagged, ids, real.long(), positions)
    next_position = positions.gather(1, (lengths - 1)[:, None])[:, 0] + 1  # (U,)
    last = states.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, states.shape[-1]))  # (U, 1, H)
    hidden = last[prompt_index][:, :T]  # (N, min(T, 1), H): predicts response token 0
    if T > 1:
        # The prompt states, copied to their rows (an index: backward sums the rows' gradients).
        cache = Cache(layers=[_PrefixLayer(k, v, prompt_index) for k, v in zip(keys, values, strict=True)])
        positions = next_position[prompt_index, None] + torch.arange(T - 1, device=response_ids.device)
        keys_mask = torch.cat([real[prompt_index], response_mask[:, :-1]], dim=1).long()  # (N, P + T - 1)
        with (
            _set_on(layers, "_can_checkpoint_with_cache", True),  # the responses only read the cache
            _set_on(others, "gradient_checkpointing", False),
        ):
            out = body(
                input_ids=response_ids[:, :-1], attention_mask=keys_mask, position_ids=positions,
                use_cache=True, **{cache_kwarg: cache},
            )  # fmt: skip
        states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (N, T - 1, H)
        hidden = torch.cat([hidden, states], dim=1)  # (N, T, H)
    return hidden


def shared_prompt_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logit_floor: torch.Tensor | None = None,
    return_hidden: bool = False,
    prompt_position_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token log-probs (and entropy) of the responses, each distinct prompt forwarded once.

    Args:
        model: a ``*ForCausalLM`` with full attention (see :func:`supports_shared_prompts`).
        prompt_ids, prompt_mask: (U, P) left-padded distinct prompts, at least one real token each.
        response_ids, response_mask: (N, T) right-padded responses.
        prompt_index: (N,) integer, row r continues prompt ``prompt_index[r]``.
        temperature, logit_floor ((N, T)), chunk_size, backend: as in
            :func:`~alignkit.ops.logprobs.causal_lm_logprobs`.
        return_hidden: also return the (N, T, H) last hidden states that predict the responses
            (the lm_head scores them in its own dtype: an fp32 head on a bf16 body sees fp32 states).
        prompt_position_ids: (U, P) integer positions of the prompt columns; the responses continue
            from each prompt's last position + 1. Default: ``cumsum(prompt_mask) - 1`` (real tokens
            count from 0, as the rollout engine and ``generate`` place them). TRL scores whole rows
            without position ids, so its positions are the columns: pass ``arange(P)`` for that.

    Returns:
        logp (N, T) float32 (float64 for a float64 model), 0 at response padding; then entropy with
        ``return_entropy`` and the hidden states with ``return_hidden``, as ``causal_lm_logprobs``.
    """
    return_hidden = _checks.flag(return_hidden, "return_hidden")
    weight, bias = output_head(model)
    hidden = shared_prompt_hidden(
        model, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
        prompt_position_ids=prompt_position_ids,
    )  # fmt: skip
    labels = response_ids.to(torch.int64).masked_fill(~response_mask.bool(), -100)
    result = fused_linear_logprobs(
        hidden.to(weight.dtype), weight, labels, bias=bias, temperature=temperature, ignore_index=-100,
        return_entropy=return_entropy, chunk_size=chunk_size, logit_floor=logit_floor, backend=backend,
    )  # fmt: skip
    if not return_hidden:
        return result
    return (*result, hidden) if isinstance(result, tuple) else (result, hidden)
