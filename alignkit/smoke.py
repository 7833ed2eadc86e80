"""``alignkit smoke``: a short real run of the package, every op on both backends.

One small PPO step's worth of work: rollouts go into the replay buffer, come out packed, get GAE
advantages, log-probs and entropy from hidden states, and the policy and value losses with their
gradients. Each op runs on the CPU implementation and on the Triton kernels (compiled on CUDA when
present, else under the interpreter) and the two must agree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

import alignkit

TOLERANCE = 1e-4  # max abs difference between the two backends (fp32)


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [t for item in out for t in _flatten(item)]


def _both(name: str, fn: Callable[[str, torch.device], object], triton_device: torch.device) -> float:
    """Run ``fn(backend, device)`` for both backends; return the largest difference of any output."""
    cpu = _flatten(fn("cpu", torch.device("cpu")))
    tri = _flatten(fn("triton", triton_device))
    diff = max(
        (a.detach().double() - b.detach().cpu().double()).abs().max().item()
        for a, b in zip(cpu, tri, strict=True)
    )
    print(f"  {name:<28} outputs {len(cpu):>2}   max |cpu - triton| {diff:.2e}")
    return diff


def run() -> int:
    torch.manual_seed(0)
    triton_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = "compiled on CUDA" if triton_device.type == "cuda" else "Triton interpreter on CPU"
    print(f"alignkit {alignkit.__version__} smoke run: cpu implementation vs triton ({where})")

    # Rollouts: 8 responses of 9..48 tokens, 2 prompts x 4 samples, into the replay buffer.
    batch, length, hidden_size, vocab = 8, 48, 32, 257
    buffer = alignkit.ReplayBuffer(
        {"tokens": torch.int32, "rewards": torch.float32, "values": torch.float32, "old_logp": torch.float32},
        {"score": torch.float32, "group": torch.int64},
        capacity_tokens=4096, group_field="group", seed=0,
    )  # fmt: skip
    lengths = torch.randint(9, length + 1, (batch,))
    buffer.add_padded(
        lengths=lengths,
        tokens=torch.randint(0, vocab, (batch, length), dtype=torch.int32),
        rewards=torch.randn(batch, length) * 0.1,
        values=torch.randn(batch, length),
        old_logp=-torch.rand(batch, length) * 3,
        score=torch.randn(batch),
        group=torch.arange(batch) // 4,
    )
    packed = buffer.sample(batch, replace=False, layout="packed")
    n_tokens = packed.num_tokens
    print(
        f"  replay buffer: {len(buffer)} sequences, {buffer.num_tokens} tokens; packed sample of {n_tokens}"
    )

    mask = torch.ones(n_tokens)
    hidden = torch.randn(n_tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    labels = packed["tokens"].long()
    cu_seqlens = packed.cu_seqlens
    diffs = [
        _both("gae_packed", lambda b, d: alignkit.gae_packed(
            packed["rewards"].to(d), packed["values"].to(d), mask.to(d), cu_seqlens, gamma=0.99, lam=0.95,
            backend=b,
        ), triton_device),
        _both("discounted_returns_packed", lambda b, d: alignkit.discounted_returns_packed(
            packed["rewards"].to(d), mask.to(d), cu_seqlens, gamma=0.99, backend=b,
        ), triton_device),
    ]  # fmt: skip
    group_adv = alignkit.group_advantages(packed["score"], packed["group"], method="grpo")
    print(f"  group_advantages (grpo)      {group_adv.numel()} sequences, mean {group_adv.mean():+.2e}")

    def policy_step(b: str, d: torch.device):
        h = hidden.to(d).requires_grad_()
        w = weight.to(d).requires_grad_()
        logp, entropy = alignkit.fused_linear_logprobs(h, w, labels.to(d), return_entropy=True, backend=b)
        adv, _ = alignkit.gae_packed(
            packed["rewards"].to(d), packed["values"].to(d), mask.to(d), packed.cu_seqlens, backend=b
        )
        loss, metrics = alignkit.ppo_policy_loss(
            logp[None], packed["old_logp"][None].to(d), adv[None], mask[None].to(d),
            entropy=entropy[None], entropy_coef=1e-3, backend=b,
        )  # fmt: skip
        loss.backward()
        return logp, entropy, loss, metrics, h.grad, w.grad

    def value_step(b: str, d: torch.device):
        v = packed["values"][None].to(d).requires_grad_()
        ret = alignkit.discounted_returns_packed(packed["rewards"].to(d), mask.to(d), cu_seqlens, backend=b)[
            None
        ]
        loss, metrics = alignkit.value_loss(v, v.detach() + 0.1, ret, mask[None].to(d), backend=b)
        loss.backward()
        return loss, metrics, v.grad

    diffs += [
        _both("fused_linear_logprobs + ppo", policy_step, triton_device),
        _both("value_loss", value_step, triton_device),
        _both("fused_linear_ppo_loss", lambda b, d: alignkit.fused_linear_ppo_loss(
            hidden[None].to(d), weight.to(d), labels[None].to(d), packed["old_logp"][None].to(d),
            torch.ones(1, n_tokens, device=d), mask[None].to(d), backend=b,
        ), triton_device),
    ]  # fmt: skip
    worst = max(diffs)
    if worst > TOLERANCE:
        print(f"smoke run FAILED: backends differ by {worst:.2e} (> {TOLERANCE})", file=sys.stderr)
        return 1
    print("smoke run OK")
    return 0
