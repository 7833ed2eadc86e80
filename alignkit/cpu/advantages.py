"""numba implementations of GAE and discounted returns (CPU twins of kernels/gae.py).

Rows run in parallel (``prange``) above ``PARALLEL_MIN_ELEMENTS`` (see alignkit/cpu/__init__.py):
on an idle 2-core machine 64x4096 took 0.39 ms in parallel vs 0.76 ms serial. (Measured while
other processes loaded both cores, the parallel loop was up to 10x slower: numbers on a shared
machine mislead.) Compiled code is cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

from . import run_rows


@numba.njit(cache=True, nogil=True)
def _gae_row(rewards, values, mask, gamma, lam, adv, ret, row, start, stop):
    # Reverse over t with carries nv (next value) and gae (last advantage); masked positions
    # pass both carries through (docs/formulas.md, GAE). Selected with a branch, never multiplied
    # by the mask: NaN/inf at a masked position stays there.
    nv = 0.0
    last = 0.0
    for t in range(stop - 1, start - 1, -1):
        v = values[row, t]
        if mask[row, t] != 0:
            last = rewards[row, t] + gamma * nv - v + gamma * lam * last
            nv = v
        adv[row, t] = last
        ret[row, t] = last + v


@numba.njit(cache=True, nogil=True)
def _gae_serial(rewards, values, mask, gamma, lam, adv, ret):
    for b in range(rewards.shape[0]):
        _gae_row(rewards, values, mask, gamma, lam, adv, ret, b, 0, rewards.shape[1])


@numba.njit(cache=True, nogil=True, parallel=True)
def _gae_parallel(rewards, values, mask, gamma, lam, adv, ret):
    for b in numba.prange(rewards.shape[0]):
        _gae_row(rewards, values, mask, gamma, lam, adv, ret, b, 0, rewards.shape[1])


@numba.njit(cache=True, nogil=True)
def _gae_packed(rewards, values, mask, cu_seqlens, gamma, lam, adv, ret):
    # Packed (1, N) layout: the recurrence restarts at every sequence boundary.
    for s in range(cu_seqlens.shape[0] - 1):
        _gae_row(rewards, values, mask, gamma, lam, adv, ret, 0, cu_seqlens[s], cu_seqlens[s + 1])


@numba.njit(cache=True, nogil=True)
def _discounted_returns_row(rewards, mask, gamma, out, row, start, stop):
    # G = r_t + gamma G; ret_t = G; G resets to 0 where the mask is 0 (selected, not multiplied).
    running = 0.0
    for t in range(stop - 1, start - 1, -1):
        running = rewards[row, t] + gamma * running
        out[row, t] = running
        if mask[row, t] == 0:
            running = 0.0


@numba.njit(cache=True, nogil=True)
def _discounted_returns(rewards, mask, gamma, out):
    for b in range(rewards.shape[0]):
        _discounted_returns_row(rewards, mask, gamma, out, b, 0, rewards.shape[1])


@numba.njit(cache=True, nogil=True)
def _discounted_returns_packed(rewards, mask, cu_seqlens, gamma, out):
    for s in range(cu_seqlens.shape[0] - 1):
        _discounted_returns_row(rewards, mask, gamma, out, 0, cu_seqlens[s], cu_seqlens[s + 1])


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """(B, T) arrays of one float dtype -> (advantages, returns) in that dtype."""
    adv = np.empty_like(rewards)
    ret = np.empty_like(rewards)
    run_rows(_gae_serial, _gae_parallel, rewards.size, rewards, values, mask, gamma, lam, adv, ret)
    return adv, ret


def gae_packed(rewards, values, mask, cu_seqlens, gamma: float, lam: float):
    """(1, N) arrays and int64 cu_seqlens -> (advantages, returns)."""
    adv = np.zeros_like(rewards)
    ret = np.zeros_like(rewards)
    _gae_packed(rewards, values, mask, cu_seqlens, gamma, lam, adv, ret)
    return adv, ret


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """(B, T) arrays -> reward-to-go in rewards' dtype."""
    out = np.empty_like(rewards)
    _discounted_returns(rewards, mask, gamma, out)
    return out


def discounted_returns_packed(rewards, mask, cu_seqlens, gamma: float) -> np.ndarray:
    """(1, N) arrays and int64 cu_seqlens -> reward-to-go, restarting at every boundary."""
    out = np.empty_like(rewards)
    _discounted_returns_packed(rewards, mask, cu_seqlens, gamma, out)
    return out
