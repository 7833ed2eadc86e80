"""Token log-probs through the lm_head, forward + backward: fused vs materialised logits.

Providers, side by side per case (``benchmark.group``):
* ``alignkit``: ``fused_linear_logprobs`` (logits never formed).
* ``torch``: ``hidden @ W.T`` -> ``log_softmax`` -> ``gather`` (what most trainers do).
* ``trl``: TRL's ``selective_log_softmax`` on the materialised logits (when installed).
* ``liger`` (GPU): Liger's fused linear cross-entropy, ``reduction="none"`` (-logp per token).
* ``matmul`` (GPU): the three matmuls of forward + backward alone, the rate to compare against.

Run: ``pytest bench/bench_logprobs.py --benchmark-json bench/results/logprobs.json``.
FLOPs of forward + backward: ``6 N H V`` useful (one matmul forward, two backward: what the
materialising providers execute); alignkit recomputes the logits in the backward instead of storing
them, so it executes ``8 N H V``. Each case records both rates in ``extra_info``:
``useful_tflops`` (6NVH / median time, comparable across providers) and ``executed_tflops`` (the
FLOPs that provider actually runs / median time, against the device's matmul peak).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import alignkit

CPU_CASE = (4096, 512, 32000)  # N, H, V (issue 4)
GPU_CASES = [(4096, 4096, 151936), (16384, 4096, 151936)]
CPU_PROVIDERS = ["alignkit", "torch", "trl"]
# Matmul FLOPs each provider executes per forward + backward, in units of N H V: alignkit's fused
# kernels compute the logits twice (forward, backward recompute) plus the two gradient matmuls;
# Liger's fused linear cross-entropy computes its gradients in the forward (no recompute).
EXECUTED_NHV = {"alignkit": 8.0, "torch": 6.0, "trl": 6.0, "liger": 6.0, "matmul": 6.0}
GPU_PROVIDERS = ["alignkit", "torch", "trl", "liger", "matmul"]


def _inputs(n, hdim, vocab, dtype, device):
    hidden = torch.randn(n, hdim, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, device=device) / hdim**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    return hidden, weight, labels


def _step(provider, hidden, weight, labels):
    """One forward + backward of sum(logp) for ``provider``; returns nothing it allocated."""
    if provider == "alignkit":
        logp = alignkit.fused_linear_logprobs(hidden, weight, labels)
    elif provider == "torch":
        logits = (hidden @ weight.T).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    elif provider == "trl":
        trl_utils = harness.require_peer("trl.trainer.utils")
        logp = trl_utils.selective_log_softmax(hidden @ weight.T, labels)
    elif provider == "liger":
        liger = harness.require_peer("liger_kernel.transformers")
        loss_fn = liger.LigerFusedLinearCrossEntropyLoss(reduction="none")
        logp = -loss_fn(weight, hidden, labels)
    elif provider == "matmul":
        logits = hidden @ weight.T  # the matmuls alone: forward, then d hidden and d weight
        grad = torch.ones_like(logits)
        grad @ weight, grad.T @ hidden
        return
    else:
        raise ValueError(f"unknown provider {provider!r}")
    hidden.grad = weight.grad = None
    logp.sum().backward()


def _run_case(benchmark, provider, shape, dtype, device, rounds):
    n, hdim, vocab = shape
    if provider == "trl":
        harness.require_peer("trl.trainer.utils")
    if provider == "liger":
        harness.require_peer("liger_kernel.transformers")
    hidden, weight, labels = _inputs(n, hdim, vocab, dtype, device)
    benchmark.group = f"logprobs fwd+bwd N={n} H={hdim} V={vocab} {str(dtype).removeprefix('torch.')}"

    def step():
        _step(provider, hidden, weight, labels)
        harness.sync(device)

    step()  # warm-up (Triton compilation / autotuning, allocator)
    peak = harness.peak_memory_bytes(step, device)
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    useful, executed = 6.0 * n * hdim * vocab, EXECUTED_NHV[provider] * n * hdim * vocab
    seconds = benchmark.stats.stats.median
    harness.record(
        benchmark, provider, peak_bytes=peak, flops=useful,
        useful_tflops=useful / seconds / 1e12, executed_tflops=executed / seconds / 1e12,
    )  # fmt: skip


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_logprobs_cpu(benchmark, provider):
    _run_case(benchmark, provider, CPU_CASE, torch.float32, "cpu", rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: f"N{s[0]}")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_logprobs_gpu(benchmark, provider, shape):
    _run_case(benchmark, provider, shape, torch.bfloat16, "cuda", rounds=10)
