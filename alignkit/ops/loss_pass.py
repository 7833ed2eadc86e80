"""The fused loss pass on either backend, and what follows from its per-row statistics.

Every aggregation mode is linear in the per-row sums, ``loss = sum_b c_b sum_t m_t L_t``, with the
weights ``c_b`` known once the row counts are (:func:`row_weights`). So one pass over the (B, T)
inputs (kernels/ppo_loss.py on Triton, alignkit/cpu/losses.py on CPU) writes the per-row statistics
(columns of alignkit.loss_layout) and, when grad is needed, the per-token gradient of the row sums;
the backward scales that by ``c_b`` (:func:`scale_rows`). Used by :mod:`alignkit.ops.losses` and
:mod:`alignkit.ops.fused_ppo`.

Packed inputs: with ``cu_seqlens`` (validated CPU int64 offsets, :func:`alignkit._checks.cu_seqlens`)
the (1, N) inputs hold S sequences end to end and every "row" above is a sequence: the pass writes
(S, ...) statistics, the row weights are per sequence, and the padded width ``T`` of
``seq-mean-token-sum-norm`` is the longest sequence (:func:`packed_width`), so a packed batch gives
the numbers of the same sequences padded to their longest.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import loss_layout as L
from ..cpu import LazyModule, mask_to_numpy, to_numpy, use_torch_twin
from ..cpu import losses_torch as _twin
from .loss_config import PolicyLossConfig

_cpu = LazyModule("alignkit.cpu.losses")  # numba loads on the first large CPU loss


def cpu_policy_fwd(logp, old, adv, mask, isw, ref, ent, *, config, write_grad: bool, cu_seqlens=None):
    """:func:`alignkit.cpu.losses.policy_fwd` (NumPy arrays in and out), or its torch twin for a
    small batch (zero-copy views of the same arrays)."""
    if not use_torch_twin(logp.size):
        return _cpu.policy_fwd(
            logp, old, adv, mask, isw, ref, ent, config=config, write_grad=write_grad, cu_seqlens=cu_seqlens
        )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    stats, grad = _twin.policy_fwd(
        *(as_tensor(a) for a in (logp, old, adv, mask, isw, ref, ent)), config=config, write_grad=write_grad,
        cu_seqlens=as_tensor(cu_seqlens),
    )  # fmt: skip
    return stats.numpy(), (None if grad is None else grad.numpy())


def row_weights(counts: torch.Tensor, agg: str, agg_scale: float | None, T: int) -> torch.Tensor:
    """Per-row weights ``c_b`` with ``agg(L, m) = sum_b c_b sum_t m L``, from the per-row token
    counts (no host sync). Fully masked rows get weight 0 and are not counted as rows."""
    if agg == "token-mean":
        if agg_scale is not None:
            return torch.full_like(counts, 1.0 / agg_scale)
        return (1.0 / counts.sum().clamp(min=1.0)).expand(counts.shape)
    nonempty = (counts > 0).to(counts.dtype)
    rows = nonempty.sum().clamp(min=1.0)
    if agg == "seq-mean-token-sum":
        return nonempty / rows
    if agg == "seq-mean-token-mean":
        return nonempty / ((counts + 1e-8) * rows)
    # seq-mean-token-sum-norm: T = 0 has no token to divide by; its weights are never used.
    return nonempty / (rows * (float(max(T, 1)) if agg_scale is None else agg_scale))


def packed_width(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence of validated CPU ``cu_seqlens``: the width of the padded batch a packed
    one stands for."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def token_weights(row_weight: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence weights (S,) copied onto the tokens of each sequence: (N,)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(row_weight.device)
    return torch.repeat_interleave(row_weight, lengths, output_size=int(cu_seqlens[-1]))


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().contiguous()


def policy_stats(
    impl: str, logp, entropy, old_logp, advantages, mask, is_weights, ref_logp,
    config: PolicyLossConfig, dtype: torch.dtype, *, write_grad: bool,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One fused pass over (B, T) inputs: per-row statistics (B, POLICY_STATS) in ``dtype`` and, when
    ``write_grad``, the per-token gradient of the row sums w.r.t. logp (B, T), 0 where masked. With
    ``cu_seqlens``, (1, N) packed inputs and (S, POLICY_STATS) per-sequence statistics."""
    if impl == "triton":
        from ..kernels import ppo_loss as _kernels

        tensors = [_contiguous(t) for t in (logp, old_logp, advantages, mask, is_weights, ref_logp, entropy)]
        return _kernels.policy_fwd(
            *tensors, config=config, write_grad=write_grad, dtype=dtype, cu_seqlens=cu_seqlens
        )
    arrays = [to_numpy(t, dtype) for t in (logp, old_logp, advantages)]
    optional = [to_numpy(t, dtype) for t in (is_weights, ref_logp, entropy)]
    stats_np, grad_np = cpu_policy_fwd(
        *arrays, mask_to_numpy(mask, dtype), *optional, config=config, write_grad=write_grad,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.numpy(),
    )  # fmt: skip
    stats = torch.from_numpy(stats_np).to(device=logp.device, dtype=dtype)
    grad = None if grad_np is None else torch.from_numpy(grad_np).to(logp.device)
    return stats, grad


def value_stats(
    impl: str, values, old_values, returns, mask, *, clip: float, dtype: torch.dtype, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The value loss's pass: per-row statistics (B, VALUE_STATS) in ``dtype`` and, when
    ``write_grad``, the per-token gradient of the row sums w.r.t. values."""
    if impl == "triton":
        from ..kernels import ppo_loss as _kernels

        tensors = [_contiguous(t) for t in (values, old_values, returns, mask)]
        return _kernels.value_fwd(*tensors, clip=clip, write_grad=write_grad, dtype=dtype)
    if use_torch_twin(values.numel()):
        cpu = [t.detach().to("cpu", dtype) for t in (values, old_values, returns)]
        stats, grad = _twin.value_fwd(*cpu, mask.detach().to("cpu"), clip=clip, write_grad=write_grad)
    else:
        arrays = [to_numpy(t, dtype) for t in (values, old_values, returns)]
        stats_np, grad_np = _cpu.value_fwd(
            *arrays, mask_to_numpy(mask, dtype), clip=clip, write_grad=write_grad
        )
        stats, grad = torch.from_numpy(stats_np), None if grad_np is None else torch.from_numpy(grad_np)
    stats = stats.to(device=values.device, dtype=dtype)
    grad = None if grad is None else grad.to(values.device)
    return stats, grad


def scale_rows(
    impl: str, grad: torch.Tensor, mask: torch.Tensor | None, row_weight: torch.Tensor,
    out_dtype: torch.dtype, *, entropy_coef: float = 0.0, entropy_dtype: torch.dtype | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Backward of every loss here: ``row_weight[:, None] * grad`` in ``out_dtype`` (None when
    ``grad`` is None: logp needs no gradient) and, when ``entropy_dtype`` is given, d entropy
    ``= -entropy_coef * row_weight[:, None] * (m != 0)``. With ``cu_seqlens``: (1, N) packed
    ``grad`` / ``mask`` and one weight per sequence."""
    with_entropy = entropy_dtype is not None
    if impl == "triton" and grad is not None:
        from ..kernels import ppo_loss as _kernels

        return _kernels.scale_rows_bwd(
            grad, _contiguous(mask) if with_entropy else None, row_weight, out_dtype,
            entropy_coef=entropy_coef, entropy_dtype=entropy_dtype, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    if cu_seqlens is not None and (grad is not None or with_entropy):
        # Every token its sequence's weight: the same function on the (N, 1) view of the packed row.
        shape = (grad if grad is not None else mask).shape
        column = (None if t is None else t.reshape(-1, 1) for t in (grad, mask))
        dx, dent = scale_rows(
            impl, *column, token_weights(row_weight, cu_seqlens), out_dtype, entropy_coef=entropy_coef,
            entropy_dtype=entropy_dtype,
        )  # fmt: skip
        return (None if dx is None else dx.reshape(shape)), (None if dent is None else dent.reshape(shape))
    if grad is not None and grad.device.type == "cpu" and not use_torch_twin(grad.numel()):
        # numba: torch's thread pool loses on small CPUs (the torch code below for small grads)
        dx, dent = _cpu.scale_rows(
            grad.numpy(), mask_to_numpy(mask, grad.dtype) if with_entropy else None,
            row_weight.detach().to("cpu", torch.float64).numpy(),
            entropy_coef=entropy_coef, with_entropy=with_entropy,
        )  # fmt: skip
        dent = None if dent is None else torch.from_numpy(dent).to(entropy_dtype)
        return torch.from_numpy(dx).to(out_dtype), dent
    dx = None if grad is None else (row_weight.to(grad.dtype)[:, None] * grad).to(out_dtype)
    dent = None
    if with_entropy:
        w = (-entropy_coef * row_weight)[:, None].to(mask.device)
        dent = torch.where(mask != 0, w, torch.zeros((), dtype=w.dtype, device=w.device)).to(entropy_dtype)
    return dx, dent


def raise_on_bad_mask(bad_counts: torch.Tensor, name: str = "mask") -> None:
    """The pass counts mask values other than 0 and 1 as it reads the mask, so validating costs no
    extra pass; reading the count is a host read, skipped where the validation mode skips value
    checks (by default on CUDA, where it would be a device sync: alignkit._checks)."""
    if _checks.checks_values(bad_counts) and bool(bad_counts.any()):
        raise ValueError(f"{name} must contain only 0 and 1")


def policy_loss_and_metrics(
    stats: torch.Tensor, config: PolicyLossConfig, T: int, *, with_kl: bool, with_entropy: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Loss, metrics (0-dim tensors, never read on the host) and the per-row weights of the
    aggregation, from the per-row statistics: B-sized work. ``T``: the padded width (packed:
    :func:`packed_width`)."""
    raise_on_bad_mask(stats[:, L.POLICY_BAD_MASK])
    counts = stats[:, L.POLICY_COUNT]
    weights = row_weights(counts, config.agg, config.agg_scale, T)
    pg = (weights * stats[:, L.POLICY_LOSS]).sum()
    entropy = (weights * stats[:, L.POLICY_ENTROPY]).sum()
    kl = (weights * stats[:, L.POLICY_KL]).sum()
    loss = pg - config.entropy_coef * entropy + config.kl_coef * kl
    tokens = counts.sum().clamp(min=1.0)
    metrics = {
        "pg_loss": pg,
        "pg_clipfrac": stats[:, L.POLICY_CLIP].sum() / tokens,
        "pg_clipfrac_lower": stats[:, L.POLICY_CLIP_LOWER].sum() / tokens,
        "ppo_kl": stats[:, L.POLICY_NEG_LOGRATIO].sum() / tokens,
    }
    if with_kl:
        metrics["kl"] = kl
    if with_entropy:
        metrics["entropy"] = entropy
    return loss, metrics, weights
