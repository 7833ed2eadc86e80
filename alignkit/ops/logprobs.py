"""Token log-probs and entropy, on given logits or fused with the lm_head (logits never formed),
and ``causal_lm_logprobs`` for Hugging Face causal LMs (the fused form on the model's head).

Formulas: docs/formulas.md ("Log-probs and entropy"). With ``z = logits / T``::

    logp = z[label] - logsumexp(z);  H = logsumexp(z) - sum softmax(z) z

Both outputs are differentiable (the entropy bonus is trained): backward takes the upstream
gradients of logp AND H and recomputes what it needs from the saved per-token ``lse`` and ``H``.
Positions whose label is ``ignore_index`` give logp 0, entropy 0 and no gradient. Outputs are
float32 (float64 for float64 inputs), in the shape of ``labels``.

Backends (``alignkit.backend.resolve``): ``triton`` (kernels/logprobs.py on given logits,
kernels/fused_logprobs.py with the lm_head) for fp16/bf16/fp32, ``cpu`` (alignkit/cpu/logprobs.py,
chunked torch, any device). fp64 inputs always take the chunked-torch path, which is exact in fp64
(it is what ``gradcheck`` tests).
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import backend as _backend
from ..cpu import logprobs as _cpu

_backend.register_op("token_logprobs")
_backend.register_op("fused_linear_logprobs")
_backend.register_op("causal_lm_logprobs")


def _use_triton(backend: str | None, t: torch.Tensor) -> bool:
    return _backend.resolve(backend, t.device) == "triton" and t.dtype != torch.float64


def _grad_or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g.to(like.dtype).contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, floor, temperature, ignore_index, triton, inplace_backward, need_entropy
    ):
        # logits (N, V) unit column stride; labels (N,) int64; floor (N,) or None
        if triton:
            from ..kernels import logprobs as _kernels

            logp, ent, lse = _kernels.token_logprobs_fwd(logits, labels, temperature, ignore_index, floor)
        else:
            logp, ent, lse = _cpu.token_logprobs_fwd(
                logits, labels, temperature, ignore_index, need_entropy=need_entropy, logit_floor=floor
            )
        ctx.save_for_backward(logits, labels, floor, lse, ent)
        ctx.args = (temperature, ignore_index, triton, inplace_backward)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, floor, lse, ent = ctx.saved_tensors
        temperature, ignore_index, triton, inplace_backward = ctx.args
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return (None,) * 8
        out = logits if inplace_backward else None
        g_logp, g_ent = _grad_or_zeros(g_logp, lse), _grad_or_zeros(g_ent, lse)
        backward = _cpu.token_logprobs_bwd
        if triton:
            from ..kernels import logprobs as _kernels

            backward = _kernels.token_logprobs_bwd
        d_logits = backward(
            logits, labels, lse, ent, g_logp, g_ent, temperature, ignore_index, out=out, logit_floor=floor
        )
        return d_logits, None, None, None, None, None, None, None


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, floor, temperature, ignore_index, chunk_size, triton, need_entropy
    ):
        # hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64, floor (N,) or None
        precision = None
        if triton:
            from ..kernels import fused_logprobs as _kernels

            # fp32 dots follow torch.get_float32_matmul_precision() as it is now, in the forward
            # and (saved) in the backward, which may run outside the caller's setting.
            precision = _kernels.dot_precision(hidden.dtype)
            logp, ent, lse = _kernels.fused_linear_logprobs_fwd(
                hidden, weight, bias, labels, temperature, ignore_index, logit_floor=floor,
                input_precision=precision,
            )  # fmt: skip
        else:
            logp, ent, lse = _cpu.fused_linear_logprobs_fwd(
                hidden, weight, bias, labels, temperature, ignore_index, chunk_size, need_entropy, floor
            )
        ctx.save_for_backward(hidden, weight, bias, labels, floor, lse, ent)
        ctx.args = (temperature, ignore_index, chunk_size, triton, precision)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, labels, floor, lse, ent = ctx.saved_tensors
        temperature, ignore_index, chunk_size, triton, precision = ctx.args
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs) or (g_logp is None and g_ent is None):
            return (None,) * 10
        g_logp, g_ent = _grad_or_zeros(g_logp, lse), _grad_or_zeros(g_ent, lse)
        if triton:
            from ..kernels import fused_logprobs as _kernels

            grads = _kernels.fused_linear_logprobs_bwd(
                hidden, weight, bias, labels, lse, ent, g_logp, g_ent, temperature, ignore_index, needs,
                chunk_size, logit_floor=floor, input_precision=precision,
            )  # fmt: skip
        else:
            grads = _cpu.fused_linear_logprobs_bwd(
                hidden, weight, bias, labels, lse, ent, g_logp, g_ent, temperature, ignore_index, needs,
                chunk_size, logit_floor=floor,
            )  # fmt: skip
        return (*grads, None, None, None, None, None, None, None)


def validate_logit_floor(floor: object, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """None, or a float tensor of the labels' shape and device, flattened, in ``dtype``: per position,
    the z value below which vocabulary entries are outside the sampled distribution (-inf: none)."""
    if floor is None:
        return None
    floor = _checks.float_like(floor, "logit_floor", labels, "labels")
    return floor.detach().reshape(-1).to(dtype).contiguous()


def validate_labels(labels: object, shape: torch.Size, shape_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Integer ``labels`` of ``shape`` on ``ref``'s device."""
    labels = _checks.integer_tensor(labels, "labels")
    if labels.shape != shape:
        raise ValueError(f"labels must have the shape {shape_name} {tuple(shape)}, got {tuple(labels.shape)}")
    _checks.same_device(labels, "labels", ref, "the inputs")
    return labels


def validate_lm_head(
    hidden: torch.Tensor, weight: object, bias: object
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An lm_head ``weight`` (V, H), V >= 1, and optional ``bias`` (V,) that match ``hidden``'s last
    dimension, dtype and device."""
    weight = _checks.float_tensor(weight, "weight", ndim=2)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[1] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    _checks.same_device(weight, "weight", hidden, "hidden")
    if bias is not None:
        bias = _checks.float_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        _checks.same_device(bias, "bias", hidden, "hidden")
    return weight, bias


def validate_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, check: bool | None) -> None:
    """Labels outside [0, V) that are not ignore_index: ValueError when checked (default: as the
    validation mode says, alignkit.set_validation: on CPU tensors; opt-in on CUDA, where the check
    costs a device sync). Unchecked, they give NaN."""
    if check is None:
        check = _checks.checks_values(labels)
    if _checks.flag(check, "check_labels"):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {first} "
                f"({int(bad.sum())} such labels)"
            )


def _outputs(logp, ent, shape, return_entropy):
    logp = logp.reshape(shape)
    return (logp, ent.reshape(shape)) if return_entropy else logp


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    logit_floor: torch.Tensor | None = None,
    check_labels: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)`` (and the entropy).

    Args:
        logits: (..., V) float tensor, any float dtype; never upcast as a whole (fp32 math per tile).
        labels: (...) integer tensor; ``ignore_index`` marks positions that give 0 and no gradient.
        temperature: > 0.
        return_entropy: also return ``H = lse - sum p z`` (differentiable).
        inplace_backward: backward writes d logits into ``logits``' storage and returns it as the
            gradient (saves one (N, V) buffer). Only for logits that nothing else reads after
            this op's backward (e.g. a fresh ``lm_head`` output).
        logit_floor: optional (...) float tensor, labels' shape: per position, entries with
            ``z = logits / temperature`` below it are outside the distribution (the sampler's top-k /
            top-p truncation, docs/formulas.md "Truncated sampling and the logit floor"): they
            leave the normaliser and the entropy and get no gradient; -inf keeps everything. A
            label below its floor has logp -inf.
        check_labels: raise ValueError for labels outside [0, V); default: on for CPU tensors,
            off on CUDA (it syncs), where such labels give NaN instead.
        backend: ``"auto" | "triton" | "cpu"`` (default: ``$ALIGNKIT_BACKEND`` or auto).

    Returns:
        logp (...) float32 (float64 for float64 logits), or ``(logp, entropy)``.
    """
    logits = _checks.float_tensor(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}"
        )
    labels = validate_labels(labels, logits.shape[:-1], "of logits without its last dimension", logits)
    temperature = _checks.positive(temperature, "temperature")
    ignore_index = _checks.ignore_index(ignore_index)
    return_entropy = _checks.flag(return_entropy, "return_entropy")
    inplace_backward = _checks.flag(inplace_backward, "inplace_backward")
    vocab = logits.shape[-1]
    validate_label_range(labels, vocab, ignore_index, check_labels)
    triton = _use_triton(backend, logits)
    if inplace_backward and 0 in logits.stride():
        raise ValueError(
            "inplace_backward=True writes the gradient into logits' storage, which an expanded "
            f"(stride-0) view shares between elements: got strides {logits.stride()}; pass "
            "logits.contiguous() or inplace_backward=False"
        )
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    floor = validate_logit_floor(logit_floor, labels, _checks.accumulation_dtype(logits))
    logp, ent = _TokenLogprobs.apply(
        flat, flat_labels, floor, temperature, ignore_index, triton, inplace_backward, return_entropy
    )
    return _outputs(logp, ent, labels.shape, return_entropy)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    logit_floor: torch.Tensor | None = None,
    check_labels: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without forming the logits.

    Args:
        hidden: (..., H) float tensor (the last hidden states).
        weight: (V, H) lm_head weight, same dtype and device as ``hidden``.
        labels: (...) integer tensor, ``hidden``'s leading shape.
        bias: optional (V,) lm_head bias.
        chunk_size: rows of logits held at once by the backward (and by the CPU forward);
            default: a (chunk, V) block about the size of ``hidden`` (Triton) or 32 MiB (CPU).
        logit_floor, check_labels, backend: as in :func:`token_logprobs` (the floor is applied
            inside the fused tiles: the truncated distribution without any logits in memory).

    Gradients flow to hidden, weight and bias from the upstream gradients of logp and of the
    entropy; backward recomputes the logits block by block from the saved ``lse`` and ``H``.
    At most one (chunk, V) block of logits exists at a time.

    Returns:
        logp (...) float32 (float64 for float64 inputs), or ``(logp, entropy)``.
    """
    hidden = _checks.float_tensor(hidden, "hidden")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a scalar")
    weight, bias = validate_lm_head(hidden, weight, bias)
    vocab = weight.shape[0]
    labels = validate_labels(labels, hidden.shape[:-1], "of hidden without its last dimension", hidden)
    temperature = _checks.positive(temperature, "temperature")
    ignore_index = _checks.ignore_index(ignore_index)
    return_entropy = _checks.flag(return_entropy, "return_entropy")
    chunk_size = _checks.chunk_size(chunk_size)
    validate_label_range(labels, vocab, ignore_index, check_labels)
    triton = _use_triton(backend, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    floor = validate_logit_floor(logit_floor, labels, _checks.accumulation_dtype(hidden))
    logp, ent = _FusedLinearLogprobs.apply(
        flat, weight, bias, flat_labels, floor, temperature, ignore_index, chunk_size, triton, return_entropy
    )
    return _outputs(logp, ent, labels.shape, return_entropy)


def output_head(model: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, H) weight and optional bias of a causal LM's linear lm_head (models that rescale or
    soft-cap their logits are rejected: the fused ops would not reproduce them)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"model must be a Hugging Face causal LM whose get_output_embeddings() returns a linear "
            f"lm_head, got {type(model).__name__} with output embeddings {type(head).__name__}"
        )
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"model applies {attr}={value} to its logits, which causal_lm_logprobs does not "
                "reproduce: compute model(...).logits and call token_logprobs instead"
            )
    return weight, getattr(head, "bias", None)


def check_token_range(model: object, input_ids: torch.Tensor) -> None:
    """Token ids must index the model's input embedding (an out-of-range id fails deep inside the
    model, or reads another row on CUDA): checked on CPU tensors, where it costs no device sync."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    vocab = getattr(embedding, "num_embeddings", None)
    if not isinstance(vocab, int) or input_ids.device.type != "cpu" or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary), got {bad}")


def body_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    position_ids: torch.Tensor | None = None,
    **model_kwargs: object,
) -> torch.Tensor:
    """(B, T, H) last hidden states of a causal LM's body (``model.base_model``, no cache), after
    checking the token ids against its vocabulary: what the fused heads score."""
    check_token_range(model, input_ids)
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(
            f"model must have a base_model body separate from its lm_head, got {type(model).__name__}"
        )
    out = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        **model_kwargs,
    )  # fmt: skip
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 0,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    logit_floor: torch.Tensor | None = None,
    return_hidden: bool = False,
    backend: str | None = None,
    **model_kwargs: object,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-token log-probs (and entropy) of a Hugging Face causal LM, logits never formed.

    Runs the model's body (``model.base_model``: LlamaModel, Qwen2Model, GPT2Model, ...) to its
    last hidden states and applies :func:`fused_linear_logprobs` with the output embedding
    (``model.get_output_embeddings()``; tied embeddings receive their gradient through the
    shared parameter). Position t scores ``input_ids[:, t + 1]`` given ``input_ids[:, :t + 1]``.

    Args:
        model: a ``*ForCausalLM`` model (logit soft-capping / scaling models are rejected).
        input_ids: (B, T) token ids; attention_mask: (B, T) 0/1 or None (all ones).
        position_ids: forwarded to the model (pass ``cumsum(mask) - 1`` for left padding).
        logits_to_keep: score only the last k tokens (0: all T - 1), as TRL does for completions.
        temperature, chunk_size, backend: as in :func:`fused_linear_logprobs`.
        logit_floor: optional, the shape of the output ((B, T - 1) or (B, k)): the rollout's
            ``logit_floor``, so the recomputed log-probs are those of the distribution it sampled.
        return_hidden: also return the last hidden states that predict the scored tokens
            (B, T - 1, H) (or (B, k, H)), with their graph: a value head on the same body reads them.
        model_kwargs: forwarded to the body.

    Returns:
        logp (B, T - 1) (or (B, k)) float32, 0 where the scored token is padding
        (``attention_mask[:, t + 1] == 0``); with ``return_entropy``, ``(logp, entropy)``; with
        ``return_hidden``, the hidden states last: ``(logp, [entropy,] hidden)``.
    """
    input_ids = _checks.integer_tensor(input_ids, "input_ids")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must hold at least 2 tokens per row to score one, got {tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        attention_mask = _checks.mask(attention_mask, "attention_mask", input_ids, "input_ids")
    if position_ids is not None:
        position_ids = _checks.integer_tensor(position_ids, "position_ids")
        if position_ids.shape not in (input_ids.shape, (1, input_ids.shape[1])):
            raise ValueError(
                f"position_ids must have the shape of input_ids {tuple(input_ids.shape)} (or (1, T)), "
                f"got {tuple(position_ids.shape)}"
            )
        _checks.same_device(position_ids, "position_ids", input_ids, "input_ids")
    logits_to_keep = _checks.non_negative_int(logits_to_keep, "logits_to_keep")
    return_hidden = _checks.flag(return_hidden, "return_hidden")
    weight, bias = output_head(model)
    hidden = body_hidden_states(model, input_ids, attention_mask, position_ids=position_ids, **model_kwargs)
    keep = input_ids.shape[1] - 1 if logits_to_keep == 0 else min(logits_to_keep, input_ids.shape[1] - 1)
    hidden = hidden[:, -keep - 1 : -1]  # (B, k, H): the states that predict the kept tokens
    labels = input_ids[:, -keep:].to(torch.int64)  # (B, k)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, -keep:] == 0, -100)
    out = fused_linear_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        temperature=temperature,
        ignore_index=-100,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        logit_floor=logit_floor,
        backend=backend,
    )
    if not return_hidden:
        return out
    return (*out, hidden) if isinstance(out, tuple) else (out, hidden)
