"""Stage 1 of bench/gpu.sh: every Triton kernel once, at one small shape, against the CPU implementation.

    ALIGNKIT_PIN_CONFIG=1 python bench/gpu_kernels.py --out results/1-kernels.jsonl

Each case runs an op with ``backend="triton"`` on the device (compiled on CUDA; under the Triton
interpreter with ``--device cpu``, for a dry run) and with ``backend="cpu"`` on CPU copies of the same
inputs, and compares every output and gradient. One JSON line per case is appended to ``--out`` (and
flushed) as soon as the case ends, so a stage killed at its time limit keeps every finished case.
A case that raises is recorded as ``error`` and the next one runs. Exit status 1 if any case failed.
Needs no compiled extension (alignkit._C), so it also runs when the C++ build failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |triton - cpu| / (1 + max |cpu|)


def _flatten(out) -> list[torch.Tensor]:
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    return [t for item in out for t in _flatten(item)]


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        moved = value.detach().to(device)
        return moved.requires_grad_() if value.requires_grad else moved
    return value


class Case:
    """One op at one shape: ``make()`` returns the inputs (CPU tensors; those that require grad get
    gradients compared), ``run(inputs, backend)`` the outputs."""

    def __init__(
        self, name: str, make: Callable[[], dict], run: Callable[[dict, str], object], dtype=torch.float32
    ):
        self.name, self.make, self.run, self.dtype = name, make, run, dtype

    def execute(self, device: torch.device) -> dict:
        torch.manual_seed(0)
        inputs = self.make()
        results = {}
        for backend, where in (("cpu", torch.device("cpu")), ("triton", device)):
            moved = {k: _to(v, where) for k, v in inputs.items()}
            outputs = _flatten(self.run(moved, backend))
            grads = [v.grad for v in moved.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            results[backend] = [t.detach().to("cpu", torch.float64) for t in outputs + grads if t is not None]
        cpu, tri = results["cpu"], results["triton"]
        if len(cpu) != len(tri):
            raise RuntimeError(f"cpu gave {len(cpu)} outputs, triton {len(tri)}")
        worst = 0.0
        for a, b in zip(cpu, tri, strict=True):
            both = torch.isfinite(a) & torch.isfinite(b)
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                raise RuntimeError("cpu and triton disagree on which outputs are finite")
            if both.any():
                scale = 1.0 + float(a[both].abs().max())
                worst = max(worst, float((a[both] - b[both]).abs().max()) / scale)
        return {"outputs": len(cpu), "max_rel_diff": worst, "ok": worst <= TOLERANCE[self.dtype]}


def _policy_inputs(B: int, T: int) -> dict:
    logp = -torch.rand(B, T) * 2
    return {
        "logp": logp.requires_grad_(),
        "old_logp": logp.detach() + 0.1 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "mask": (torch.rand(B, T) > 0.25).float(),
        "ref_logp": logp.detach() + 0.1 * torch.randn(B, T),
        "entropy": torch.rand(B, T).requires_grad_(),
    }


def _policy(loss_type: str, **options) -> Callable[[dict, str], object]:
    def run(x: dict, backend: str):
        import alignkit

        loss, metrics = alignkit.ppo_policy_loss(
            **x, loss_type=loss_type, kl_coef=0.01, entropy_coef=0.001, backend=backend, **options
        )
        loss.backward()
        return loss, metrics

    return run


def _packed(n_rows: int, length: int) -> dict:
    lengths = torch.randint(1, 2 * length, (n_rows,))
    cu = torch.zeros(n_rows + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    n = int(cu[-1])
    return {
        "rewards": torch.randn(n),
        "values": torch.randn(n),
        "mask": (torch.rand(n) > 0.2).float(),
        "cu": cu,
    }


def cases(small: bool) -> list[Case]:
    """Small shapes everywhere; ``small`` (the interpreter) shrinks the long-row ones."""
    import alignkit
    from alignkit.rollout import random_streams, sample

    long_t = 300 if small else 20000  # > 4 chunks per row on an H200: the summary + carry kernels
    vocab = 300 if small else 4096

    def gae_run(x, b):
        return alignkit.gae(
            x["rewards"], x["values"], x["mask"], gamma=0.99, lam=0.95, whiten=True, backend=b
        )

    def padded(B, T):
        return lambda: {
            "rewards": torch.randn(B, T),
            "values": torch.randn(B, T),
            "mask": torch.rand(B, T) > 0.2,
        }

    def gae_packed_run(device_offsets: bool):
        def run(x, b):
            cu = x["cu"] if device_offsets or b == "cpu" else x["cu"].cpu()
            adv, ret = alignkit.gae_packed(
                x["rewards"], x["values"], x["mask"], cu, gamma=0.99, lam=0.95, backend=b
            )
            out = alignkit.discounted_returns_packed(x["rewards"], x["mask"], cu, gamma=0.99, backend=b)
            return adv, ret, out

        return run

    def value_run(x, b):
        loss, metrics = alignkit.value_loss(
            x["values"], x["values"].detach() + 0.1, x["returns"], x["mask"], backend=b
        )
        loss.backward()
        return loss, metrics

    def logits_inputs(dtype):
        return lambda: {
            "logits": torch.randn(64, vocab).to(dtype).requires_grad_(),
            "labels": torch.randint(0, vocab, (64,)),
        }

    def token_run(x, b):
        logp, entropy = alignkit.token_logprobs(x["logits"], x["labels"], return_entropy=True, backend=b)
        (logp.float().sum() + entropy.float().sum()).backward()
        return logp, entropy

    def lm_head_inputs(dtype, n=128, hidden=128):
        return lambda: {
            "hidden": torch.randn(n, hidden).to(dtype).requires_grad_(),
            "weight": (torch.randn(vocab, hidden) / hidden**0.5).to(dtype).requires_grad_(),
            "labels": torch.randint(0, vocab, (n,)),
        }

    def fused_run(x, b):
        logp, entropy = alignkit.fused_linear_logprobs(
            x["hidden"], x["weight"], x["labels"], return_entropy=True, backend=b
        )
        (logp.float().sum() + 0.1 * entropy.float().sum()).backward()
        return logp, entropy

    def fused_ppo_run(x, b):
        n = x["labels"].numel()
        g = torch.Generator().manual_seed(1)
        old = (-torch.rand(1, n, generator=g) * 5).to(x["hidden"].device)
        adv = torch.randn(1, n, generator=g).to(x["hidden"].device)
        loss, metrics = alignkit.fused_linear_ppo_loss(
            x["hidden"][None], x["weight"], x["labels"][None], old, adv, torch.ones_like(adv), backend=b
        )
        loss.backward()
        return loss, metrics

    def sample_inputs():
        return {"logits": 3 * torch.randn(64, vocab)}

    def sample_run(temperature: float, top_k: int, top_p: float):
        def run(x, b):
            keys = random_streams.row_keys([7], x["logits"].shape[0], x["logits"].device)
            out = sample(
                x["logits"], temperature=temperature, top_k=top_k, top_p=top_p, keys=keys, step=3, backend=b
            )
            if temperature == 0:
                return out.token, out.logprob  # greedy: the same token on both backends
            # Sampled tokens differ by method (Gumbel vs inverse CDF); compare each backend's
            # log-prob with the processed distribution's log-prob of its own token.
            z = x["logits"].float() / temperature
            if out.floor is not None:
                z = torch.where(z < out.floor[:, None], float("-inf"), z)
            reference = torch.log_softmax(z, -1).gather(-1, out.token[:, None]).squeeze(-1)
            return out.logprob - reference, out.floor

        return run

    return [
        Case("gae padded B=4 T=300 (whiten)", padded(4, 300), gae_run),
        Case(f"gae chunked B=2 T={long_t}", padded(2, long_t), gae_run),
        Case(
            "discounted_returns B=4 T=300",
            padded(4, 300),
            lambda x, b: alignkit.discounted_returns(x["rewards"], x["mask"], gamma=0.99, backend=b),
        ),
        Case(
            "gae_packed + discounted_returns_packed, CPU offsets",
            lambda: _packed(8, 200),
            gae_packed_run(False),
        ),
        Case(
            "gae_packed + discounted_returns_packed, device offsets",
            lambda: _packed(8, 200),
            gae_packed_run(True),
        ),
        Case(
            "ppo_policy_loss ppo_clip+dual_clip fwd+bwd B=4 T=300",
            lambda: _policy_inputs(4, 300),
            _policy("ppo_clip", dual_clip=3.0),
        ),
        Case("ppo_policy_loss gspo fwd+bwd B=4 T=300", lambda: _policy_inputs(4, 300), _policy("gspo")),
        Case("ppo_policy_loss cispo fwd+bwd B=4 T=300", lambda: _policy_inputs(4, 300), _policy("cispo")),
        Case(
            "value_loss fwd+bwd B=4 T=300",
            lambda: {
                "values": torch.randn(4, 300).requires_grad_(),
                "returns": torch.randn(4, 300),
                "mask": (torch.rand(4, 300) > 0.25).float(),
            },
            value_run,
        ),
        Case(f"token_logprobs fwd+bwd fp32 n=64 V={vocab}", logits_inputs(torch.float32), token_run),
        Case(
            f"token_logprobs fwd+bwd bf16 n=64 V={vocab}",
            logits_inputs(torch.bfloat16),
            token_run,
            torch.bfloat16,
        ),
        Case(
            f"fused_linear_logprobs fwd+bwd fp32 N=128 H=128 V={vocab}",
            lm_head_inputs(torch.float32),
            fused_run,
        ),
        Case(
            f"fused_linear_logprobs fwd+bwd bf16 N=128 H=128 V={vocab}",
            lm_head_inputs(torch.bfloat16),
            fused_run,
            torch.bfloat16,
        ),
        Case(
            f"fused_linear_ppo_loss fwd+bwd fp32 N=128 H=128 V={vocab}",
            lm_head_inputs(torch.float32),
            fused_ppo_run,
        ),
        Case(f"sample greedy b=64 V={vocab}", sample_inputs, sample_run(0.0, 0, 1.0)),
        Case(f"sample temperature 1 b=64 V={vocab}", sample_inputs, sample_run(1.0, 0, 1.0)),
        Case(f"sample top_k=20 top_p=0.9 b=64 V={vocab}", sample_inputs, sample_run(0.8, 20, 0.9)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per case (appended)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-k", dest="keyword", default=None, help="run only cases whose name contains this")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with args.out.open("a") as sink:
        for case in cases(small=device.type == "cpu"):
            if args.keyword and args.keyword not in case.name:
                continue
            start = time.perf_counter()
            try:
                record = case.execute(device)
            except Exception as exc:  # recorded; the next case still runs
                record = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            record = {"case": case.name, "seconds": round(time.perf_counter() - start, 3), **record}
            failed += not record["ok"]
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            status = "ok  " if record["ok"] else "FAIL"
            detail = record.get("error") or f"max rel diff {record['max_rel_diff']:.2e}"
            print(f"{status} {record['seconds']:7.2f}s  {case.name}: {detail}", flush=True)
    print(
        f"{failed} case(s) failed" if failed else "every case agrees with the CPU implementation", flush=True
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
