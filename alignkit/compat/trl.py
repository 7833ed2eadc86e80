"""TRL's log-prob helpers backed by alignkit ops, and a GRPOTrainer whose per-token log-probs and
entropies come from the last hidden states through :func:`alignkit.fused_linear_logprobs`.

* :func:`selective_log_softmax`, :func:`entropy_from_logits` and
  :func:`selective_log_softmax_and_entropy`: TRL 1.x's ``trl.trainer.utils`` functions, same
  signatures and values (``log_softmax(logits / temperature)`` gathered at ``index``, zero where
  ``row_mask == 0``), by :func:`alignkit.token_logprobs`, which streams the vocabulary in tiles.
* :func:`patch`: swaps those functions into TRL (every imported ``trl`` module that holds them)
  and replaces ``GRPOTrainer._get_per_token_logps_and_entropies`` (see
  :func:`fused_per_token_logps_and_entropies`), so that trainers created afterwards never form
  the [batch x completion x vocab] logits when they score completions (TRL issue 3678).

Differences from TRL: outputs are fp32 (fp64 for fp64 logits) where TRL keeps a bf16/fp16 input's
dtype; an ``index`` of -100 gives 0 (alignkit's ``ignore_index``) where TRL's gather raises;
``entropy_from_logits``' ``chunk_size`` is accepted and validated, but the kernel picks its own
tiles.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import numbers
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

import alignkit

from .. import _checks
from ..ops.shared_prompts import supports_shared_prompts
from . import patching
from .patching import PatchHandle, PatchWarning

__all__ = [
    "entropy_from_logits",
    "fused_per_token_logps_and_entropies",
    "patch",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]

UTILS = "trl.trainer.utils"
GRPO_TRAINER = "trl.trainer.grpo_trainer"
UTILS_FUNCTIONS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
PER_TOKEN_METHOD = "_get_per_token_logps_and_entropies"
IGNORE_INDEX = -100
# Config fields that rescale or soft-cap a model's logits, which the fused op does not reproduce
# (such models keep TRL's own computation).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "output_multiplier_scale",
    "lm_head_multiplier",
    "logits_scaling",
)
# Arguments of the per-token method that a text-only causal LM needs; any other given (images,
# token types, ...) sends the call to TRL's own method.
TEXT_ARGUMENTS = frozenset(
    {
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    }
)


# ----------------------------------------------------------------------------- trl.trainer.utils


def _temperature(temperature: object) -> float:
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError("temperature must be positive")  # TRL's message
    return _checks.positive(temperature, "temperature")


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """``index`` with the positions ``row_mask == 0`` set to the ignore index (logp 0, no gradient)."""
    if row_mask is None:
        return index
    row_mask = _checks.tensor(row_mask, "row_mask")
    _checks.same_shape(row_mask, "row_mask", index, "index")
    return index.masked_fill(row_mask == 0, IGNORE_INDEX)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, without a (..., V) log-softmax.

    ``index`` is ``(...)`` (one token per row) or ``(..., K)`` (K tokens per row, e.g. top-K);
    ``row_mask`` (``index``'s shape) zeroes the positions where it is 0. Returns ``index``'s shape.
    The K form gathers ``logp_k = logp_0 + (z_k - z_0)`` from one fused pass for the first column.
    """
    temperature = _temperature(temperature)
    logits = _checks.float_tensor(logits, "logits")
    index = _checks.integer_tensor(index, "index")
    if index.dim() == logits.dim() - 1:
        return alignkit.token_logprobs(logits, _labels(index, row_mask), temperature=temperature)
    if index.dim() != logits.dim() or index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"index must have the shape of logits without its last dimension {tuple(logits.shape[:-1])}, "
            f"or that plus a K dimension, got {tuple(index.shape)}"
        )
    if index.shape[-1] == 0:
        return torch.zeros(index.shape, dtype=_checks.accumulation_dtype(logits), device=logits.device)
    first = alignkit.token_logprobs(logits, index[..., 0], temperature=temperature)  # (...)
    selected = torch.gather(logits, -1, index).to(first.dtype) / temperature  # (..., K)
    logps = first.unsqueeze(-1) + (selected - selected[..., :1])
    if row_mask is not None:
        logps = logps.masked_fill(_labels(index, row_mask) == IGNORE_INDEX, 0.0)
    return logps


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` along the last dimension, ``logits.shape[:-1]``,
    differentiable. ``chunk_size`` (rows per chunk in TRL) must be a positive int; alignkit's kernel
    streams the vocabulary in its own tiles."""
    _checks.positive_int(chunk_size, "chunk_size")
    logits = _checks.float_tensor(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension, got a scalar")
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return alignkit.token_logprobs(logits, labels, return_entropy=True)[1]


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at ``index`` (``(...)``) and entropies of ``softmax(logits / temperature)`` in one
    fused pass; both 0 where ``row_mask == 0``; the entropy detached unless
    ``entropy_requires_grad``."""
    temperature = _temperature(temperature)
    logits = _checks.float_tensor(logits, "logits")
    index = _checks.integer_tensor(index, "index")
    logps, entropy = alignkit.token_logprobs(
        logits, _labels(index, row_mask), temperature=temperature, return_entropy=True
    )
    return logps, entropy if entropy_requires_grad else entropy.detach()


# ----------------------------------------------------------------------------- GRPOTrainer


FALLBACK_REASONS_WARNED: set[str] = set()  # each fallback reason warns once (clear it to warn again)


def _fallback(reason: str) -> None:
    """Say once per reason why a call runs TRL's own computation instead of the fused one."""
    if reason not in FALLBACK_REASONS_WARNED:
        FALLBACK_REASONS_WARNED.add(reason)
        warnings.warn(
            f"alignkit fused log-probs not used ({reason}); TRL's own computation runs instead",
            PatchWarning,
            stacklevel=4,
        )


def _unsupported(model: torch.nn.Module) -> str | None:
    """Why the fused head cannot reproduce ``model``'s logits (None when it can)."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is model:
        return f"{type(model).__name__} has no base_model body separate from its lm_head"
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return f"{type(model).__name__}'s output embedding is not a linear lm_head"
    if type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id"):
        return "the lm_head weight is sharded (FSDP2 / DeepSpeed ZeRO-3)"
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text_config = get_text() if callable(get_text) else config
    for name in LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model applies {name}={value} to its logits"
    return None


def _given_arguments(arguments: inspect.BoundArguments) -> dict[str, Any]:
    """The bound arguments by name, a ``**kwargs`` parameter's entries included and an empty
    ``*args`` left out."""
    given = {}
    for name, value in arguments.arguments.items():
        kind = arguments.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            given.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL or value:
            given[name] = value
    return given


def _why_not_fused(options: dict[str, Any], lm: torch.nn.Module) -> str | None:
    """Why a call of the per-token method goes to TRL's own (None when the fused path serves it)."""
    extra = sorted(k for k, v in options.items() if k not in TEXT_ARGUMENTS and v is not None)
    if extra:
        return f"extra model inputs {extra}"
    if options.get("compute_aux_loss"):
        return "an MoE aux loss was requested"
    return _unsupported(lm)


def _language_model(trainer: Any, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(top, lm)``: the model without distributed / compile wrappers (what the wrapper's forward
    calls) and the causal LM inside it (a PEFT model's base model, adapters still active)."""
    accelerator = getattr(trainer, "accelerator", None)
    top = accelerator.unwrap_model(model) if accelerator is not None else model
    get_base = getattr(top, "get_base_model", None)
    return top, (get_base() if callable(get_base) else top)


def call_through_wrapper(wrapper: torch.nn.Module, inner: torch.nn.Module, compute: Callable[[], Any]) -> Any:
    """``compute()`` run inside ``wrapper(...)``'s forward (DDP, DeepSpeed), so that the wrapper's
    forward hooks (gradient sync, parameter gathering) run as for a normal forward: ``inner.forward``
    is swapped for ``compute`` for the one call. With no wrapper (``wrapper is inner``) it just runs."""
    if wrapper is inner:
        return compute()
    saved = inner.__dict__.get("forward", patching.MISSING)

    def put_back() -> None:
        if saved is patching.MISSING:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = saved

    def redirected(*_args: Any, **_kwargs: Any) -> Any:
        put_back()
        return compute()

    inner.forward = redirected
    try:
        return wrapper()
    finally:
        put_back()


def fused_completion_logprobs(
    lm: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float,
    return_entropy: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of the last ``logits_to_keep`` tokens of ``input_ids`` under
    ``softmax(logits / temperature)``: the body's last hidden states through the lm_head by
    :func:`alignkit.fused_linear_logprobs`. Position t scores ``input_ids[:, t]`` from the state at
    t - 1; padded positions (``attention_mask == 0``) give 0, as in TRL 1.16. (B, k) each."""
    keep = min(int(logits_to_keep), input_ids.shape[1] - 1)
    shared = _shared_prompt_logprobs(lm, input_ids, attention_mask, keep, temperature, return_entropy)
    if shared is not None:
        return shared
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]  # (B, T, H)
    hidden = hidden[:, -keep - 1 : -1]  # (B, k, H): the states that predict the kept tokens
    labels = input_ids[:, -keep:].masked_fill(attention_mask[:, -keep:] == 0, IGNORE_INDEX)  # (B, k)
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    # An fp32 lm_head on a bf16 body (TRL's cast_lm_head_to_fp32) scores fp32 hidden states.
    hidden = hidden.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return alignkit.fused_linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy
        )


def _shared_prompt_logprobs(lm, input_ids, attention_mask, keep, temperature, return_entropy):
    """The same values with each distinct prompt forwarded once (GRPO's num_generations rows
    repeat it): :func:`alignkit.shared_prompt_logprobs` at TRL's positions (the columns: TRL passes
    no position ids). None where it does not apply: no prompt repeats, a model without full
    attention, or rows whose real tokens are not one run (TRL's own layout always is)."""
    rows, width = input_ids.shape
    start = width - keep  # TRL's layout: left-padded prompts, then the completions
    real = attention_mask.bool()
    first = real.to(torch.int8).argmax(-1)
    end = first + real.sum(-1)
    columns = torch.arange(width, device=input_ids.device)
    if rows < 2 or not supports_shared_prompts(lm):
        return None
    one_run = (real == ((columns >= first[:, None]) & (columns < end[:, None]))).all()
    if not bool(one_run & (first < start).all()):  # one host read: real tokens in one run, a prompt each
        return None
    split = alignkit.split_shared_prompts(input_ids, attention_mask, torch.full_like(first, start))
    if split.prompt_ids.shape[0] == rows:
        return None
    prompt_width = split.prompt_ids.shape[1]
    positions = (start - prompt_width + torch.arange(prompt_width, device=input_ids.device)).expand_as(
        split.prompt_ids
    )
    out = alignkit.shared_prompt_logprobs(
        lm, split.prompt_ids, split.prompt_mask, split.response_ids, split.response_mask, split.prompt_index,
        temperature=temperature, return_entropy=return_entropy, prompt_position_ids=positions,
    )  # fmt: skip
    pad = keep - split.response_ids.shape[1]  # completions that all ended before the last column
    out = tuple(torch.nn.functional.pad(o, (0, pad)) for o in (out if return_entropy else (out,)))
    return out if return_entropy else out[0]


def fused_per_token_logps_and_entropies(original: Callable[..., Any]) -> Callable[..., Any]:
    """A replacement for ``GRPOTrainer._get_per_token_logps_and_entropies`` (``original``): for a
    text-only causal LM it computes the per-token log-probs (and entropies) of the completion with
    :func:`fused_completion_logprobs`, chunked by ``batch_size`` as TRL does, and returns what the
    original returns (``(logps, entropies, aux_loss)`` or ``(logps, entropies)``). Calls it cannot
    serve (images or other extra model inputs, an MoE aux loss, logit soft-capping or scaling, a
    sharded lm_head) go to ``original``."""
    signature = inspect.signature(original)
    returns_aux_loss = "compute_aux_loss" in signature.parameters

    def per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        arguments = signature.bind(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        arguments.apply_defaults()
        options = _given_arguments(arguments)
        top, lm = _language_model(self, model)
        reason = _why_not_fused(options, lm)
        if reason is not None:
            _fallback(reason)
            return original(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        need_entropy = bool(options.get("compute_entropy"))
        step = options.get("batch_size") or input_ids.size(0)
        accelerator = getattr(self, "accelerator", None)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), step):
            ids, mask = input_ids[start : start + step], attention_mask[start : start + step]
            autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
            with autocast:
                out = call_through_wrapper(
                    model,
                    top,
                    lambda ids=ids, mask=mask: fused_completion_logprobs(
                        lm, ids, mask, logits_to_keep, self.temperature, need_entropy
                    ),
                )
            logp, entropy = out if need_entropy else (out, None)
            logps.append(logp)
            entropies.append(entropy)
        result = (torch.cat(logps, dim=0), torch.cat(entropies, dim=0) if need_entropy else None)
        return (*result, None) if returns_aux_loss else result

    per_token_logps_and_entropies.__name__ = PER_TOKEN_METHOD
    per_token_logps_and_entropies.__qualname__ = f"GRPOTrainer.{PER_TOKEN_METHOD}"
    per_token_logps_and_entropies.__doc__ = fused_per_token_logps_and_entropies.__doc__
    per_token_logps_and_entropies.__wrapped__ = original
    return per_token_logps_and_entropies


# ----------------------------------------------------------------------------- patching


def patch() -> PatchHandle:
    """Swap this module's functions into TRL and make ``GRPOTrainer`` score completions from the
    last hidden states with alignkit's fused op (:func:`fused_per_token_logps_and_entropies`).

    Replaces ``selective_log_softmax``, ``entropy_from_logits`` and
    ``selective_log_softmax_and_entropy`` in ``trl.trainer.utils`` and in every imported ``trl``
    module that re-imported them, and ``GRPOTrainer._get_per_token_logps_and_entropies`` on the
    class. Call it before creating the trainer. Returns a
    :class:`~alignkit.compat.patching.PatchHandle` whose ``restore()`` puts TRL's versions back;
    when TRL is not installed (or fails to import) it does nothing and warns
    (:class:`~alignkit.compat.patching.PatchWarning`).
    """
    handle = PatchHandle("trl")
    modules = patching.import_peer("trl", (UTILS,))
    if modules is None:
        return handle
    replacements = patching.originals_of(modules[UTILS], UTILS_FUNCTIONS, sys.modules[__name__])
    try:
        grpo = importlib.import_module(GRPO_TRAINER)
    except ImportError as exc:
        warnings.warn(
            f"alignkit.compat.trl.patch(): GRPOTrainer not patched, {GRPO_TRAINER} failed to import "
            f"({type(exc).__name__}: {exc})",
            PatchWarning,
            stacklevel=2,
        )
        grpo = None
    patching.replace_everywhere(handle, replacements)
    trainer = getattr(grpo, "GRPOTrainer", None)
    original = None if trainer is None else trainer.__dict__.get(PER_TOKEN_METHOD)
    if original is not None and not patching.is_alignkit_function(original):
        handle.set_attribute(trainer, PER_TOKEN_METHOD, fused_per_token_logps_and_entropies(original))
    return handle
