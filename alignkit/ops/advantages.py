"""Advantage estimation: GAE (padded and packed) and REINFORCE++ discounted returns.

Formulas: docs/formulas.md ("GAE", "Discounted returns"). Outputs are targets, not
differentiable functions: inputs that require grad are rejected rather than silently detached.
Accumulation is fp32 (fp64 for fp64 inputs); outputs are float32 for fp16/bf16/fp32 inputs and
float64 for float64 inputs.
"""

from __future__ import annotations

import torch

from .. import _checks
from .. import backend as _backend
from ..cpu import LazyModule, to_numpy, use_torch_twin
from ..cpu import advantages_torch as _twin

_cpu = LazyModule("alignkit.cpu.advantages")  # numba loads on the first large CPU scan


def _scans(elements: int, steps: int):
    """The CPU scans for an input of ``elements`` values over ``steps`` time steps: the torch twins
    for small ones (no numba loaded), else numba (alignkit/cpu/__init__.py)."""
    return _twin if use_torch_twin(elements, steps) else _cpu


_backend.register_op("gae")
_backend.register_op("gae_packed")
_backend.register_op("discounted_returns")
_backend.register_op("discounted_returns_packed")


def _no_grad_inputs(name: str, **tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        for arg, t in tensors.items():
            if t.requires_grad:
                raise ValueError(
                    f"{name} computes training targets and is not differentiable, but {arg} requires "
                    "grad: pass detached tensors or call it under torch.no_grad()"
                )


_NO_VALUES = object()  # discounted returns take no values


def _check_like_rewards(name: str, rewards: torch.Tensor, values, mask):
    """values (unless _NO_VALUES) and the 0/1 mask in the shape and device of the checked rewards;
    target inputs must not require grad."""
    tensors = {"rewards": rewards}
    if values is not _NO_VALUES:
        values = _checks.float_like(values, "values", rewards, "rewards")
        tensors["values"] = values
    mask = _checks.mask(mask, "mask", rewards, "rewards")
    _no_grad_inputs(name, **tensors)
    return values, mask


def _check_padded(name: str, rewards, values, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rewards = _checks.float_tensor(rewards, "rewards", ndim=2)
    return rewards, *_check_like_rewards(name, rewards, values, mask)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
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
    whiten = _checks.flag(whiten, "whiten")
    dtype = _checks.accumulation_dtype(rewards, values)
    if _backend.resolve(backend, rewards.device) == "triton":
        from ..kernels import gae as _kernels

        adv, ret = _kernels.gae_fwd(rewards, values, mask, gamma, lam, dtype)
    else:
        adv_np, ret_np = _scans(rewards.numel(), rewards.shape[-1]).gae(
            to_numpy(rewards, dtype), to_numpy(values, dtype), to_numpy(mask, dtype), gamma, lam
        )
        adv = torch.from_numpy(adv_np).to(rewards.device)
        ret = torch.from_numpy(ret_np).to(rewards.device)
    if whiten:
        from .whiten import whiten_selected

        adv = whiten_selected(adv, mask != 0)
    return adv, ret


def _check_packed(name: str, rewards, values, mask, cu_seqlens):
    """Packed inputs as (1, N) views, their original shape, cu_seqlens and ``checked``.

    ``checked``: cu_seqlens is the validated CPU int64 copy. Otherwise (a tensor on the inputs'
    device when the validation mode skips value checks: by default on CUDA) it is the caller's
    tensor, unread, so that the Triton path needs no device-to-host copy."""
    rewards = _checks.float_tensor(rewards, "rewards")
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[0] != 1):
        raise ValueError(f"rewards must be packed as (N,) or (1, N), got shape {tuple(rewards.shape)}")
    values, mask = _check_like_rewards(name, rewards, values, mask)
    cu = _checks.cu_seqlens_unread(cu_seqlens, rewards.device)
    checked = cu is None
    if checked:
        cu = _checks.cu_seqlens(cu_seqlens, rewards.numel())
    flat = [t.reshape(1, -1) if isinstance(t, torch.Tensor) else None for t in (rewards, values, mask)]
    return (*flat, rewards.shape, cu, checked)


def _longest(offsets) -> int:
    """The longest sequence of NumPy offsets (the steps of a packed scan)."""
    return int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0


def _host_offsets(cu: torch.Tensor, checked: bool, total: int):
    """Offsets for the CPU implementation, which reads them on the host: unchecked ones are
    validated here (they could index out of bounds), as a NumPy int64 array."""
    return (cu if checked else _checks.cu_seqlens(cu, total)).numpy()


def gae_packed(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE on sequences packed end to end (the replay buffer's packed batches).

    ``rewards``, ``values``, ``mask``: (N,) or (1, N); ``cu_seqlens``: (n + 1,) int offsets
    (tensor, array or list), ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = N``, strictly increasing.
    The recurrence of :func:`gae` restarts at every boundary. Returns ``(advantages, returns)`` in
    the input's shape. (Whiten separately with :func:`alignkit.masked_whiten`.)

    On CUDA, pass ``cu_seqlens`` as a CUDA tensor for a call with no device sync (CUDA-graph
    capturable): its values are then not checked (``alignkit.set_validation("full")`` checks them,
    at one sync) and the grid is sized for the longest possible sequence, N. Given on the CPU (or
    as a list), it is validated there and copied to the device.
    """
    rewards2, values2, mask2, shape, cu, checked = _check_packed(
        "gae_packed", rewards, values, mask, cu_seqlens
    )
    gamma = _checks.unit_interval(gamma, "gamma")
    lam = _checks.unit_interval(lam, "lam")
    dtype = _checks.accumulation_dtype(rewards2, values2)
    if _backend.resolve(backend, rewards2.device) == "triton":
        from ..kernels import gae as _kernels

        # Unread offsets: size the grid for the longest sequence N can hold (no host read).
        max_seqlen = None if checked else rewards2.numel()
        adv, ret = _kernels.gae_packed_fwd(
            rewards2, values2, mask2, cu, gamma, lam, dtype, max_seqlen=max_seqlen
        )
    else:
        offsets = _host_offsets(cu, checked, rewards2.numel())
        adv_np, ret_np = _scans(rewards2.numel(), _longest(offsets)).gae_packed(
            to_numpy(rewards2, dtype), to_numpy(values2, dtype), to_numpy(mask2, dtype), offsets, gamma, lam
        )
        adv = torch.from_numpy(adv_np).to(rewards2.device)
        ret = torch.from_numpy(ret_np).to(rewards2.device)
    return adv.reshape(shape), ret.reshape(shape)


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, backend: str | None = None
) -> torch.Tensor:
    """REINFORCE++ reward-to-go: reverse over t, ``G = r_t + gamma G; ret_t = G``, then G resets to 0
    where the mask is 0.

    rewards, mask: (B, T). Returns (B, T) float32 (float64 for float64 rewards). For sequences
    packed end to end use :func:`discounted_returns_packed`.
    """
    rewards, _, mask = _check_padded("discounted_returns", rewards, _NO_VALUES, mask)
    gamma = _checks.unit_interval(gamma, "gamma")
    dtype = _checks.accumulation_dtype(rewards)
    if _backend.resolve(backend, rewards.device) == "triton":
        from ..kernels import gae as _kernels

        return _kernels.discounted_returns_fwd(rewards, mask, gamma, dtype)
    scans = _scans(rewards.numel(), rewards.shape[-1])
    out = scans.discounted_returns(to_numpy(rewards, dtype), to_numpy(mask, dtype), gamma)
    return torch.from_numpy(out).to(rewards.device)


def discounted_returns_packed(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`discounted_returns` on sequences packed end to end: the return restarts at every
    ``cu_seqlens`` boundary (no reward flows from one sequence into the one before it).

    rewards, mask: (N,) or (1, N); cu_seqlens as in :func:`gae_packed`. Returns the input's shape.
    """
    rewards2, _, mask2, shape, cu, checked = _check_packed(
        "discounted_returns_packed", rewards, _NO_VALUES, mask, cu_seqlens
    )
    gamma = _checks.unit_interval(gamma, "gamma")
    dtype = _checks.accumulation_dtype(rewards2)
    if _backend.resolve(backend, rewards2.device) == "triton":
        from ..kernels import gae as _kernels

        out = _kernels.discounted_returns_fwd(rewards2, mask2, gamma, dtype, cu_seqlens=cu)
    else:
        offsets = _host_offsets(cu, checked, rewards2.numel())
        out_np = _scans(rewards2.numel(), _longest(offsets)).discounted_returns_packed(
            to_numpy(rewards2, dtype), to_numpy(mask2, dtype), offsets, gamma
        )
        out = torch.from_numpy(out_np).to(rewards2.device)
    return out.reshape(shape)
