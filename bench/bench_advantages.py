"""GAE side by side: alignkit vs a verl-style torch time loop vs an SB3-style NumPy loop vs torchrl.

CPU: B=64, T in {512, 4096}, fp32. GPU (bench/gpu.sh): B in {8, 256}, T in {1024, 8192, 32768},
with achieved GB/s (3 inputs read + 2 outputs written, fp32) against the measured copy bandwidth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import record, require_peer, sync

import alignkit

GAMMA, LAM = 0.99, 0.95


def verl_loop(rewards, values, mask, gamma, lam):
    """verl's compute_gae_advantage_return without whitening: a Python loop over time."""
    nextvalues = torch.zeros_like(rewards[:, 0])
    lastgaelam = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def sb3_numpy_loop(rewards, values, mask, gamma, lam):
    """Stable-Baselines3's RolloutBuffer.compute_returns_and_advantage shape: NumPy, loop over time
    (its episode-start flags play the role of the mask)."""
    r, v, m = rewards.numpy(), values.numpy(), mask.numpy()
    adv = np.zeros_like(r)
    last = np.zeros(r.shape[0], dtype=r.dtype)
    nv = np.zeros(r.shape[0], dtype=r.dtype)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nv - v[:, t]
        step = delta + gamma * lam * last
        nv = m[:, t] * v[:, t] + (1 - m[:, t]) * nv
        last = m[:, t] * step + (1 - m[:, t]) * last
        adv[:, t] = last
    return adv, adv + v


def torchrl_gae(rewards, values, mask, gamma, lam):
    """torchrl's vectorised GAE (time on the last-but-one dim). Its `done` flags mark episode ends;
    a right-padded batch maps to done at each row's last valid token."""
    functional = require_peer("torchrl.objectives.value.functional")
    done = torch.zeros_like(mask, dtype=torch.bool)
    lengths = mask.sum(1).long()
    done[torch.arange(mask.shape[0]), (lengths - 1).clamp(min=0)] = True
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    return functional.vec_generalized_advantage_estimate(
        gamma,
        lam,
        values.unsqueeze(-1),
        next_values.unsqueeze(-1),
        rewards.unsqueeze(-1),
        done.unsqueeze(-1),
        terminated=done.unsqueeze(-1),
        time_dim=-2,
    )


PROVIDERS = {
    "alignkit": lambda r, v, m: alignkit.gae(r, v, m, gamma=GAMMA, lam=LAM),
    "torch-loop (verl)": lambda r, v, m: verl_loop(r, v, m, GAMMA, LAM),
    "numpy-loop (SB3)": lambda r, v, m: sb3_numpy_loop(r, v, m, GAMMA, LAM),
    "torchrl": lambda r, v, m: torchrl_gae(r, v, m, GAMMA, LAM),
}


def right_padded(batch, length, device):
    rewards = torch.randn(batch, length, device=device)
    values = torch.randn(batch, length, device=device)
    lengths = torch.randint(length // 2, length + 1, (batch,), device=device)
    mask = (torch.arange(length, device=device)[None, :] < lengths[:, None]).float()
    return rewards, values, mask


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("length", [512, 4096])
def test_gae_cpu(benchmark, provider, length):
    batch = 64
    r, v, m = right_padded(batch, length, "cpu")
    fn = PROVIDERS[provider]
    fn(r, v, m)  # warm-up (numba compile / cache load)
    benchmark.group = f"gae cpu B={batch} T={length} fp32"
    record(benchmark, provider, bytes_moved=5 * batch * length * 4)
    benchmark.pedantic(
        fn,
        args=(r, v, m),
        rounds=5 if "loop" in provider and length > 1000 else 20,
        iterations=1,
        warmup_rounds=1,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["alignkit", "torch-loop (verl)", "torchrl"])
@pytest.mark.parametrize("length", [1024, 8192, 32768])
@pytest.mark.parametrize("batch", [8, 256])
def test_gae_gpu(benchmark, provider, batch, length):
    if provider != "alignkit" and batch * length > 256 * 8192:
        pytest.skip("the time loop takes minutes at this size; ratios are reported at the smaller sizes")
    r, v, m = right_padded(batch, length, "cuda")
    fn = PROVIDERS[provider]

    def run():
        out = fn(r, v, m)
        sync("cuda")
        return out

    run()
    benchmark.group = f"gae cuda B={batch} T={length} fp32"
    record(benchmark, provider, bytes_moved=5 * batch * length * 4)
    benchmark.pedantic(run, rounds=20 if provider == "alignkit" else 3, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
def test_copy_bandwidth_gpu(benchmark):
    """The device's copy bandwidth measured in the same run: the ceiling for GAE's GB/s."""
    src = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync("cuda")

    run()
    benchmark.group = "copy bandwidth cuda"
    record(benchmark, "torch copy_", bytes_moved=2 * src.numel() * 4)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
