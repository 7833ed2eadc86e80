"""PPO losses, forward + backward, side by side: alignkit vs the eager torch composition (verl's
``core_algos``, written below) vs ``torch.compile`` of that composition; and the hidden-states-to-
loss path: ``fused_linear_ppo_loss`` vs ``ppo_policy_loss(fused_linear_logprobs(...))`` vs Liger's
chunked GRPO loss (when installed).

Cases (``benchmark.group``):
* ``policy-loss``: B=256, T=4096 (and a small B=8, T=512, where per-call overhead shows), fp32,
  token-mean, dual clip, k3 KL (ref_logp) and entropy bonus.
* ``value-loss``: the same shapes, fp32, clipped value loss.
* ``fused-ppo``: B x T tokens, H x V lm_head, time and peak memory; ``logprobs-only`` (the
  masked sum of ``fused_linear_logprobs``) is the peak-memory reference.
GPU cases also record ``bytes_moved``: each input read once plus each gradient written once
(the least any implementation must move), so GB/s compares with the measured copy bandwidth.

Run: ``pytest bench/bench_losses.py --benchmark-json bench/results/losses.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import alignkit

CLIP_LOW, CLIP_HIGH, DUAL_CLIP, KL_COEF, ENTROPY_COEF, VF_CLIP = 0.2, 0.28, 3.0, 0.001, 0.001, 0.5
CPU_POLICY_SHAPES = [(256, 4096), (8, 512)]
GPU_POLICY_SHAPES = [(256, 4096), (64, 32768)]
FUSED_CPU_CASE = (2, 512, 512, 16384)  # B, T, H, V
FUSED_GPU_CASE = (4, 2048, 4096, 151936)
PROVIDERS = ["alignkit", "eager", "compile"]
FUSED_PROVIDERS = ["alignkit", "unfused", "logprobs-only", "liger"]


# ----------------------------------------------------------------------------- verl-style eager


def masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def eager_agg(loss_mat, mask):
    return masked_mean(loss_mat, mask)  # token-mean


def eager_policy_loss(logp, old_logp, advantages, mask, ref_logp, entropy):
    """verl's compute_policy_loss_vanilla + kl_penalty(low_var_kl) + entropy bonus, op by op."""
    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask)
    pg_losses3 = -advantages * DUAL_CLIP
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = eager_agg(pg_losses, mask)
    kl = ref_logp - logp
    kl = torch.clamp(kl, min=-20, max=20)
    kl = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    kl_loss = eager_agg(kl, mask)
    entropy_loss = eager_agg(entropy, mask)
    loss = pg_loss - ENTROPY_COEF * entropy_loss + KL_COEF * kl_loss
    return loss, (pg_loss.detach(), pg_clipfrac, pg_clipfrac_lower, ppo_kl.detach(), kl_loss.detach())


def eager_value_loss(values, old_values, returns, mask):
    """verl's compute_value_loss."""
    vpredclipped = old_values + torch.clamp(values - old_values, -VF_CLIP, VF_CLIP)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * eager_agg(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    return vf_loss, vf_clipfrac


def alignkit_policy_loss(logp, old_logp, advantages, mask, ref_logp, entropy):
    return alignkit.ppo_policy_loss(
        logp, old_logp, advantages, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL_CLIP,
        ref_logp=ref_logp, kl_coef=KL_COEF, kl_estimator="low_var_kl", entropy=entropy,
        entropy_coef=ENTROPY_COEF,
    )  # fmt: skip


def alignkit_value_loss(values, old_values, returns, mask):
    return alignkit.value_loss(values, old_values, returns, mask, clip=VF_CLIP)


_COMPILED: dict[str, object] = {}


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _loss_fn(case, provider):
    eager = eager_policy_loss if case == "policy-loss" else eager_value_loss
    if provider == "alignkit":
        return alignkit_policy_loss if case == "policy-loss" else alignkit_value_loss
    if provider == "eager":
        return eager
    return _compiled(case, eager)


def _inputs(case, B, T, device):
    mask = (torch.rand(B, T, device=device) > 0.2).float()
    if case == "policy-loss":
        logp = -3 * torch.rand(B, T, device=device)
        inputs = [
            logp.clone().requires_grad_(),
            logp + 0.3 * torch.randn(B, T, device=device),
            torch.randn(B, T, device=device),
            mask,
            logp + 0.3 * torch.randn(B, T, device=device),
            (2 * torch.rand(B, T, device=device)).requires_grad_(),
        ]
        return inputs, [inputs[0], inputs[5]], 6 + 2  # inputs read once, 2 gradients written
    values = torch.randn(B, T, device=device)
    inputs = [
        values.clone().requires_grad_(),
        values + 0.3 * torch.randn(B, T, device=device),
        torch.randn(B, T, device=device),
        mask,
    ]
    return inputs, [inputs[0]], 4 + 1


def _run_case(benchmark, case, provider, B, T, device):
    benchmark.group = f"{case} B={B} T={T} {device}"
    inputs, leaves, arrays = _inputs(case, B, T, device)
    fn = _loss_fn(case, provider)

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss, _ = fn(*inputs)
        loss.backward()
        harness.sync(device)

    try:
        step()  # warm-up: compiles (numba, Triton, inductor) outside the timing
    except Exception as exc:  # torch.compile needs a working toolchain; report, do not crash the run
        if provider == "compile":
            pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
        raise
    peak = harness.peak_memory_bytes(step, device)
    benchmark(step)
    harness.record(benchmark, provider, peak_bytes=peak, bytes_moved=arrays * 4 * B * T)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CPU_POLICY_SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("case", ["policy-loss", "value-loss"])
def test_losses_cpu(benchmark, case, shape, provider):
    _run_case(benchmark, case, provider, *shape, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", GPU_POLICY_SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("case", ["policy-loss", "value-loss"])
def test_losses_gpu(benchmark, case, shape, provider):
    _run_case(benchmark, case, provider, *shape, "cuda")


# ----------------------------------------------------------------------------- hidden -> loss


def _fused_inputs(B, T, H, V, dtype, device):
    hidden = torch.randn(B, T, H, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    old_logp = -torch.rand(B, T, device=device) * 5 - 5
    advantages = torch.randn(B, 1, device=device).expand(B, T).contiguous()  # GRPO: one per sequence
    mask = (torch.rand(B, T, device=device) > 0.1).float()
    return hidden, weight, labels, old_logp, advantages, mask


def _fused_step(provider, hidden, weight, labels, old_logp, advantages, mask):
    opts = {"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "dual_clip": None}
    if provider == "alignkit":
        loss, _ = alignkit.fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, **opts)
        return loss
    if provider == "unfused":
        logp = alignkit.fused_linear_logprobs(hidden, weight, labels)
        loss, _ = alignkit.ppo_policy_loss(logp, old_logp, advantages, mask, **opts)
        return loss
    if provider == "logprobs-only":  # the memory reference: fused_linear_logprobs alone
        return (alignkit.fused_linear_logprobs(hidden, weight, labels) * mask).sum()
    chunked = harness.require_peer("liger_kernel.chunked_loss")
    loss_fn = chunked.LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="bnpo"
    )
    loss, *_ = loss_fn(hidden, weight, labels, mask, advantages[:, 0], old_per_token_logps=old_logp)
    return loss


def _run_fused(benchmark, provider, case, dtype, device):
    B, T, H, V = case
    benchmark.group = f"fused-ppo B={B} T={T} H={H} V={V} {dtype} {device}"
    inputs = _fused_inputs(B, T, H, V, dtype, device)
    hidden, weight = inputs[0], inputs[1]

    def step():
        hidden.grad = weight.grad = None
        _fused_step(provider, *inputs).backward()
        harness.sync(device)

    step()
    peak = harness.peak_memory_bytes(step, device)
    benchmark(step)
    harness.record(benchmark, provider, peak_bytes=peak, flops=6.0 * B * T * H * V)


@pytest.mark.parametrize("provider", FUSED_PROVIDERS)
def test_fused_ppo_cpu(benchmark, provider):
    _run_fused(benchmark, provider, FUSED_CPU_CASE, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", FUSED_PROVIDERS)
def test_fused_ppo_gpu(benchmark, provider):
    _run_fused(benchmark, provider, FUSED_GPU_CASE, torch.bfloat16, "cuda")
