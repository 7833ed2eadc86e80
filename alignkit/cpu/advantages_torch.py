"""Plain-torch twins of the numba scans (alignkit/cpu/advantages.py), for small CPU inputs (why and
when: alignkit/cpu/__init__.py). Same NumPy-in, NumPy-out contract and the same recurrences, run
over all rows (or packed sequences) at once, one time step per Python iteration, with float64
carries as numba keeps them. Masked positions are selected (``torch.where``), never multiplied: NaN
at a masked position does not leak into the carries, and the outputs there are what numba writes.
"""

from __future__ import annotations

import numpy as np
import torch


def _gae_steps(r, v, live, gamma: float, lam: float, rows: int, columns, adv, ret) -> None:
    """Reverse GAE over ``columns`` (per step: an index of one position per row or sequence, and
    which of them take part), with (rows,) carries (next value, last advantage) passed through
    masked positions."""
    nv = torch.zeros(rows, dtype=torch.float64)
    last = torch.zeros_like(nv)
    for index, active in columns:
        vt, m = v[index], live[index] & active
        last = torch.where(m, r[index] + gamma * nv - vt + gamma * lam * last, last)
        nv = torch.where(m, vt, nv)
        adv[index] = torch.where(active, last, adv[index])
        ret[index] = torch.where(active, last + vt, ret[index])


def _padded_columns(rows: int, steps: int):
    every = torch.ones(rows, dtype=torch.bool)
    return [((slice(None), t), every) for t in range(steps - 1, -1, -1)]


def _packed_columns(cu: torch.Tensor):
    """Per step k (from each sequence's end), the flat position of every sequence and whether the
    sequence is that long; positions of shorter sequences are clamped (their updates are masked)."""
    starts, ends = cu[:-1], cu[1:]
    lengths = ends - starts
    out = []
    for k in range(int(lengths.max()) if len(lengths) else 0):
        active = lengths > k
        pos = torch.where(active, ends - 1 - k, starts)
        out.append(((torch.zeros_like(pos), pos), active))
    return out


def _as_tensors(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """(B, T) arrays of one float dtype -> (advantages, returns) in that dtype."""
    r, v, m = _as_tensors(rewards, values, mask)
    adv, ret = torch.empty_like(r, dtype=torch.float64), torch.empty_like(r, dtype=torch.float64)
    _gae_steps(r.double(), v.double(), m != 0, gamma, lam, r.shape[0], _padded_columns(*r.shape), adv, ret)
    return adv.to(r.dtype).numpy(), ret.to(r.dtype).numpy()


def gae_packed(rewards, values, mask, cu_seqlens, gamma: float, lam: float):
    """(1, N) arrays and int64 cu_seqlens -> (advantages, returns)."""
    r, v, m, cu = _as_tensors(rewards, values, mask, cu_seqlens)
    adv, ret = torch.zeros_like(r, dtype=torch.float64), torch.zeros_like(r, dtype=torch.float64)
    _gae_steps(r.double(), v.double(), m != 0, gamma, lam, len(cu) - 1, _packed_columns(cu), adv, ret)
    return adv.to(r.dtype).numpy(), ret.to(r.dtype).numpy()


def _returns_steps(r, live, gamma: float, columns, out) -> None:
    """G = r_t + gamma G; ret_t = G; G resets to 0 where the mask is 0 (selected, not multiplied)."""
    running = None
    for index, active in columns:
        running = r[index] + gamma * (0.0 if running is None else running)
        out[index] = torch.where(active, running, out[index])
        running = torch.where(live[index] & active, running, torch.zeros_like(running))


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """(B, T) arrays -> reward-to-go in rewards' dtype."""
    r, m = _as_tensors(rewards, mask)
    out = torch.empty_like(r, dtype=torch.float64)
    _returns_steps(r.double(), m != 0, gamma, _padded_columns(*r.shape), out)
    return out.to(r.dtype).numpy()


def discounted_returns_packed(rewards, mask, cu_seqlens, gamma: float) -> np.ndarray:
    """(1, N) arrays and int64 cu_seqlens -> reward-to-go, restarting at every boundary."""
    r, m, cu = _as_tensors(rewards, mask, cu_seqlens)
    out = torch.zeros_like(r, dtype=torch.float64)
    _returns_steps(r.double(), m != 0, gamma, _packed_columns(cu), out)
    return out.to(r.dtype).numpy()
