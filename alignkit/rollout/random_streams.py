"""Per-row random streams of the rollout: seeds -> row keys -> one uniform per row and step.

A row's randomness depends on its prompt's seed, its sample index and the decode step only, never on
the other rows of the batch, the batch size or which rows have finished: a prompt sampled alone and
the same prompt sampled among others (same seed) draw the same numbers. The chain, with ``mix64``
the splitmix64 finaliser and ``GAMMA`` its increment (all arithmetic mod 2**64)::

    prompt seeds  s_u = the prompts' own seeds (``seed`` a sequence), or
                  s_u = mix64(seed + (u + 1) * GAMMA)      (``seed`` an int: splitmix64's u-th output)
    row key       k   = mix64(mix64(s_u + GAMMA) + j) & (2**63 - 1)   # sample j in 0..n-1 of prompt u
    step uniform  u_t = (mix64(k + (t + 1) * GAMMA) >> 40) / 2**24   # in [0, 1), 24 random bits

The keys travel with their rows (through the engine's compaction). The CPU sampler draws ``u_t``
from :func:`step_uniforms_no_sync` (torch int64 on the (b,) keys, no host sync, no per-row
generator); the Triton kernel takes the keys and the step and keys Philox with them
(kernels/sampling.py). torch's int64 multiplication wraps mod 2**64 (two's complement, CPU and CUDA);
right shifts are arithmetic, so the logical shifts here mask the sign-extended bits away.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MASK64 = (1 << 64) - 1
KEY_MASK = (1 << 63) - 1  # row keys are non-negative int64
GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
UNIFORM_BITS = 24  # every float32 in [0, 1) of the form m / 2**24 is exact


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64_int(value: int) -> int:
    """splitmix64's finaliser on a Python int (taken mod 2**64), the reference of :func:`mix64`."""
    z = value & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor (bits as unsigned 64-bit values), elementwise."""
    x = (x ^ _shift_right_logical(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right_logical(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right_logical(x, 31)


def check_seed(seed: object) -> int | tuple[int, ...] | None:
    """``seed`` validated: None, an int (any), or a sequence of ints >= 0 (returned as a tuple)."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return int(seed)
    if not isinstance(seed, Sequence) or isinstance(seed, (str, bytes, bytearray)):
        raise TypeError(
            f"seed must be None, an int or a sequence of ints (one per prompt), got {type(seed).__name__}"
        )
    seeds = []
    for i, item in enumerate(seed):
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"seed[{i}] must be an int, got {type(item).__name__}")
        if item < 0:
            raise ValueError(f"seed[{i}] must be >= 0, got {int(item)}")
        seeds.append(int(item))
    if not seeds:
        raise ValueError("seed must not be an empty sequence (one seed per prompt)")
    return tuple(seeds)


def prompt_seeds(seed: int | tuple[int, ...] | None, prompts: int) -> list[int]:
    """One seed per prompt (see the module docstring); ``seed`` None draws an int seed from torch's
    global generator. A sequence must hold ``prompts`` entries (ValueError otherwise)."""
    if isinstance(seed, tuple):
        if len(seed) != prompts:
            raise ValueError(f"seed must have one entry per prompt ({prompts}), got {len(seed)}")
        return list(seed)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return [mix64_int(seed + (u + 1) * GAMMA) for u in range(prompts)]


def row_keys(seeds: Sequence[int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(seeds) * n,) int64 row keys, prompt-major: ``mix64(mix64(s_u + GAMMA) + j)`` in [0, 2**63)."""
    base = torch.tensor([_signed((s + GAMMA) & MASK64) for s in seeds], dtype=torch.int64)  # (U,)
    keys = mix64(mix64(base)[:, None] + torch.arange(n, dtype=torch.int64))  # (U, n)
    return (keys & KEY_MASK).reshape(-1).to(device)


def step_uniforms_no_sync(keys: torch.Tensor, step: int) -> torch.Tensor:
    """(b,) float32 uniforms in [0, 1) of the rows with int64 ``keys`` (b,) at decode ``step``."""
    bits = mix64(keys + _signed(((step + 1) * GAMMA) & MASK64))
    return _shift_right_logical(bits, 64 - UNIFORM_BITS).to(torch.float32) * (1.0 / (1 << UNIFORM_BITS))
