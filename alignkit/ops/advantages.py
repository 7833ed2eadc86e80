"""Advantage estimation: GAE (padded and packed) and REINFORCE++ discounted returns.

Formulas: ../shared/conventions.md ("GAE", "Discounted returns"). Outputs are targets, not
differentiable functions: inputs that require grad are rejected rather than silently detached.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are float32 for fp16/bf16/fp32 inputs and
float64 for float64 inputs.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import backend as _backend
from ..cpu import advantages as _cpu

_backend.register_op("gae")
_backend.register_op("gae_packed")
_backend.register_op("discounted_returns")


def _no_grad_inputs(name: str, **tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        for arg, t in tensors.items():
            if t.requires_grad:
                raise ValueError(
                    f"{name} computes training targets and is not differentiable, but {arg} requires "
                    "grad: pass detached tensors or call it under torch.no_grad()"
                )


def _check_padded(name: str, rewards, values, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rewards = _checks.float_tensor(rewards, "rewards", ndim=2)
    tensors = {"rewards": rewards}
    if values is not None:
        values = _checks.float_tensor(values, "values")
        _checks.same_shape(values, "values", rewards, "rewards")
        _checks.same_device(values, "values", rewards, "rewards")
        tensors["values"] = values
    mask = _checks.mask(mask, "mask", rewards, "rewards")
    _no_grad_inputs(name, **tensors)
    return rewards, values, mask


def _to_numpy(t: torch.Tensor, dtype: torch.dtype):
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, exactly verl's ``compute_gae_advantage_return``.

    Per row, reverse over t with ``nv = L = 0``::

        delta_t = r_t + gamma * nv - V_t;  l_t = delta_t + gamma * lam * L
        nv = m_t V_t + (1 - m_t) nv;       L = m_t l_t + (1 - m_t) L
        A_t = L;  R_t = A_t + V_t

    Masked positions (m = 0: prompt, padding, observation spans of multi-turn rollouts) carry
    both recurrences through, so the TD chain skips them.

    Args:
        rewards, values: (B, T) float tensors on one device.
        mask: (B, T) 0/1 response mask (bool, integer or float).
        gamma, lam: discount and GAE lambda in [0, 1].
        whiten: whiten the advantages over the mask (verl's default output). Returns are taken
            before whitening.
        backend: ``"auto" | "triton" | "cpu"`` (default: ``$ALIGNKIT_BACKEND`` or auto).

    Returns:
        ``(advantages, returns)``, each (B, T), float32 (float64 for float64 inputs).
    """
    rewards, values, mask = _check_padded("gae", rewards, values, mask)
    gamma = _checks.unit_interval(gamma, "gamma")
    lam = _checks.unit_interval(lam, "lam")
    dtype = _checks.accumulation_dtype(rewards, values)
    if _backend.resolve(backend, rewards.device) == "triton":
        from ..kernels import gae as _kernels

        adv, ret = _kernels.gae_fwd(rewards, values, mask, gamma, lam, dtype)
    else:
        adv_np, ret_np = _cpu.gae(
            _to_numpy(rewards, dtype), _to_numpy(values, dtype), _to_numpy(mask, dtype), gamma, lam
        )
        adv = torch.from_numpy(adv_np).to(rewards.device)
        ret = torch.from_numpy(ret_np).to(rewards.device)
    if whiten:
        from .whiten import whiten_prepared

        adv = whiten_prepared(adv, mask.to(adv.dtype))
    return adv, ret


def _check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """Validated offsets as a CPU int64 tensor (one device-to-host copy when given on CUDA)."""
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64)
    cu_seqlens = _checks.tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D int32/int64 tensor, got {cu_seqlens.dtype} of shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.numel()}")
    host = cu_seqlens.to("cpu", torch.int64)
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if host[-1] != total:
        raise ValueError(f"cu_seqlens must end at the packed length {total}, got {int(host[-1])}")
    return host


def gae_packed(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE on sequences packed end to end (the replay buffer's packed batches).

    ``rewards``, ``values``, ``mask``: (N,) or (1, N); ``cu_seqlens``: (n + 1,) int offsets with
    ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = N``. The recurrence of :func:`gae` restarts at
    every boundary. Returns ``(advantages, returns)`` in the input's shape.
    """
    rewards = _checks.float_tensor(rewards, "rewards")
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[0] != 1):
        raise ValueError(f"rewards must be packed as (N,) or (1, N), got shape {tuple(rewards.shape)}")
    shape = rewards.shape
    rewards2 = rewards.reshape(1, -1)
    values = _checks.float_tensor(values, "values")
    _checks.same_shape(values, "values", rewards, "rewards")
    _checks.same_device(values, "values", rewards, "rewards")
    mask = _checks.mask(mask, "mask", rewards, "rewards")
    _no_grad_inputs("gae_packed", rewards=rewards, values=values)
    gamma = _checks.unit_interval(gamma, "gamma")
    lam = _checks.unit_interval(lam, "lam")
    cu = _check_cu_seqlens(cu_seqlens, rewards2.shape[1])
    dtype = _checks.accumulation_dtype(rewards, values)
    values2, mask2 = values.reshape(1, -1), mask.reshape(1, -1)
    if _backend.resolve(backend, rewards.device) == "triton":
        from ..kernels import gae as _kernels

        adv, ret = _kernels.gae_packed_fwd(rewards2, values2, mask2, cu, gamma, lam, dtype)
    else:
        adv_np, ret_np = _cpu.gae_packed(
            _to_numpy(rewards2, dtype),
            _to_numpy(values2, dtype),
            _to_numpy(mask2, dtype),
            cu.numpy(),
            gamma,
            lam,
        )
        adv = torch.from_numpy(adv_np).to(rewards.device)
        ret = torch.from_numpy(ret_np).to(rewards.device)
    return adv.reshape(shape), ret.reshape(shape)


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, backend: str | None = None
) -> torch.Tensor:
    """REINFORCE++ reward-to-go: reverse over t, ``G = r_t + gamma G; ret_t = G; G = G * m_t``.

    The running return resets where the mask is 0. rewards, mask: (B, T). Returns (B, T) float32
    (float64 for float64 rewards).
    """
    rewards, _, mask = _check_padded("discounted_returns", rewards, None, mask)
    gamma = _checks.unit_interval(gamma, "gamma")
    dtype = _checks.accumulation_dtype(rewards)
    if _backend.resolve(backend, rewards.device) == "triton":
        from ..kernels import gae as _kernels

        return _kernels.discounted_returns_fwd(rewards, mask, gamma, dtype)
    out = _cpu.discounted_returns(_to_numpy(rewards, dtype), _to_numpy(mask, dtype), gamma)
    return torch.from_numpy(out).to(rewards.device)
