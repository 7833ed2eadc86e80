"""The hot paths capture in a CUDA graph and replay (issue 15): a policy-loss forward+backward, GAE
(padded, whitened; long rows, so the three-launch chunked path), packed GAE with CUDA ``cu_seqlens``
(whose boundaries may change between replays: the grid depends on shapes only) and the value loss.

A capture fails on any host sync, so passing this is the GPU-side proof of tests/test_sync_free.py.
Each replay runs on fresh inputs copied into the captured buffers and must give what an eager call on
those inputs gives. Runs in the default validation mode (``auto``: no value checks on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import alignkit
from alignkit import _checks

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _auto_validation():
    previous = alignkit.set_validation("auto")  # whatever ALIGNKIT_VALIDATION the run has
    yield
    alignkit.set_validation(previous)


def _capture(fn: Callable[[], list[torch.Tensor]]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """Warm up on a side stream (compiles the kernels, settles the allocator), then capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _replay_matches_eager(make: Callable[[], dict], step: Callable[[dict], list[torch.Tensor]]) -> None:
    static = make()
    graph, outputs = _capture(lambda: step(static))
    for _ in range(2):
        fresh = make()
        for name, value in fresh.items():
            static[name].detach().copy_(value)
        graph.replay()
        expected = step({k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in fresh.items()})
        torch.cuda.synchronize()
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _policy_inputs(B: int = 8, T: int = 300) -> dict:
    logp = -torch.rand(B, T, device="cuda") * 2
    return {
        "logp": logp.requires_grad_(),
        "old_logp": logp.detach() + 0.1 * torch.randn(B, T, device="cuda"),
        "advantages": torch.randn(B, T, device="cuda"),
        "mask": (torch.rand(B, T, device="cuda") > 0.3).float(),
        "ref_logp": logp.detach() + 0.1 * torch.randn(B, T, device="cuda"),
        "entropy": torch.rand(B, T, device="cuda").requires_grad_(),
    }


@pytest.mark.parametrize("loss_type", ["ppo_clip", "gspo", "cispo"])
def test_policy_loss_forward_backward_replays(loss_type):
    def step(inputs: dict) -> list[torch.Tensor]:
        for name in ("logp", "entropy"):
            inputs[name].grad = None
        loss, metrics = alignkit.ppo_policy_loss(
            **inputs, kl_coef=0.01, entropy_coef=0.001, loss_type=loss_type
        )
        loss.backward()
        return [loss, *metrics.values(), inputs["logp"].grad, inputs["entropy"].grad]

    _replay_matches_eager(_policy_inputs, step)


def test_value_loss_forward_backward_replays():
    def make() -> dict:
        v = torch.randn(8, 300, device="cuda")
        return {
            "values": v.requires_grad_(),
            "old_values": v.detach() + 0.1 * torch.randn_like(v),
            "returns": torch.randn_like(v),
            "mask": (torch.rand_like(v) > 0.3).float(),
        }

    def step(inputs: dict) -> list[torch.Tensor]:
        inputs["values"].grad = None
        loss, metrics = alignkit.value_loss(**inputs, clip=0.2)
        loss.backward()
        return [loss, *metrics.values(), inputs["values"].grad]

    _replay_matches_eager(make, step)


@pytest.mark.parametrize("shape", [(8, 300), (2, 16384)], ids=["short", "chunked"])
def test_gae_replays(shape):
    def make() -> dict:
        return {
            "rewards": torch.randn(shape, device="cuda"),
            "values": torch.randn(shape, device="cuda"),
            "mask": torch.rand(shape, device="cuda") > 0.2,
        }

    def step(inputs: dict) -> list[torch.Tensor]:
        adv, ret = alignkit.gae(**inputs, gamma=0.99, lam=0.95, whiten=True)
        returns = alignkit.discounted_returns(inputs["rewards"], inputs["mask"], gamma=0.99)
        return [adv, ret, returns]

    _replay_matches_eager(make, step)


def test_packed_gae_replays_with_new_boundaries():
    n, rows = 9000, 6

    def make() -> dict:
        inner = torch.randperm(n - 1, device="cuda")[: rows - 1].sort().values + 1
        cu = torch.cat([torch.zeros(1, device="cuda"), inner, torch.full((1,), n, device="cuda")])
        return {
            "rewards": torch.randn(n, device="cuda"),
            "values": torch.randn(n, device="cuda"),
            "mask": (torch.rand(n, device="cuda") > 0.2).float(),
            "cu_seqlens": cu.to(torch.int64),
        }

    def step(inputs: dict) -> list[torch.Tensor]:
        adv, ret = alignkit.gae_packed(**inputs, gamma=0.99, lam=0.95)
        returns = alignkit.discounted_returns_packed(
            inputs["rewards"], inputs["mask"], inputs["cu_seqlens"], gamma=0.99
        )
        return [adv, ret, returns, alignkit.masked_whiten(adv, inputs["mask"])]

    assert not _checks.checks_values(torch.ones(1, device="cuda"))
    _replay_matches_eager(make, step)
