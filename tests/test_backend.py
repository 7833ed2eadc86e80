"""Backend dispatch: defaults, the environment variable, forced backends and their errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import alignkit
from alignkit import backend, kernels

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_auto_picks_triton_for_cuda_and_cpu_for_cpu(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve(None, CPU) == "cpu"
    assert backend.resolve(None, CUDA) == ("triton" if kernels.HAS_TRITON else "cpu")
    assert backend.resolve("auto", CPU) == "cpu"


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert backend.resolve(None, CUDA) == "cpu"
    assert backend.resolve("TRITON", CUDA) == "triton"


def test_unknown_environment_value_lists_valid_ones(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"ALIGNKIT_BACKEND must be one of auto, triton, cpu, got 'cuda'"):
        backend.resolve(None, CPU)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ALIGNKIT_BACKEND"):
        alignkit.gae(x, x, x)


def test_unknown_argument_lists_valid_ones():
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cpu"):
        backend.resolve("numba", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve(3, CPU)


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve("triton", CPU)


def _entry_points():
    """For each op (a call on tensors of ``device``), the CPU and Triton functions it dispatches to,
    as (module, name) pairs the ops look up at call time."""
    from alignkit.cpu import advantages as cpu_advantages
    from alignkit.cpu import logprobs as cpu_logprobs
    from alignkit.cpu import losses as cpu_losses
    from alignkit.kernels import gae as gae_kernels
    from alignkit.kernels import logprobs as logprob_kernels
    from alignkit.kernels import ppo_loss as loss_kernels

    def gae(d):
        r = torch.randn(2, 9, device=d)
        return alignkit.gae(r, r, torch.ones(2, 9, device=d), gamma=0.9, lam=0.9)[0]

    def discounted_returns_packed(d):
        r = torch.randn(9, device=d)
        return alignkit.discounted_returns_packed(r, torch.ones(9, device=d), [0, 4, 9], gamma=0.9)

    def token_logprobs(d):
        return alignkit.token_logprobs(torch.randn(3, 7, device=d), torch.tensor([0, 6, 2], device=d))

    def ppo_policy_loss(d):
        logp, advantages, mask = -torch.rand(2, 5, device=d), torch.randn(2, 5, device=d), torch.ones(2, 5)
        return alignkit.ppo_policy_loss(logp, logp - 0.1, advantages, mask.to(d))[0]

    def value_loss(d):
        x = torch.randn(2, 5, device=d)
        return alignkit.value_loss(x, x, torch.zeros(2, 5, device=d), torch.ones(2, 5, device=d))[0]

    return {
        "gae": (gae, (cpu_advantages, "gae"), (gae_kernels, "gae_fwd")),
        "discounted_returns_packed": (
            discounted_returns_packed,
            (cpu_advantages, "discounted_returns_packed"),
            (gae_kernels, "discounted_returns_fwd"),
        ),
        "token_logprobs": (
            token_logprobs,
            (cpu_logprobs, "token_logprobs_fwd"),
            (logprob_kernels, "token_logprobs_fwd"),
        ),
        "ppo_policy_loss": (ppo_policy_loss, (cpu_losses, "policy_fwd"), (loss_kernels, "policy_fwd")),
        "value_loss": (value_loss, (cpu_losses, "value_fwd"), (loss_kernels, "value_fwd")),
    }


def _spy(monkeypatch, module, name) -> mock.Mock:
    spy = mock.Mock(wraps=getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


@pytest.mark.parametrize(
    "op", ["gae", "discounted_returns_packed", "token_logprobs", "ppo_policy_loss", "value_loss"]
)
def test_environment_variable_drives_ops(monkeypatch, device, op):
    """$ALIGNKIT_BACKEND picks the implementation that runs (spied on), on CPU and CUDA tensors
    alike, and both compute the same result; "auto" picks by device."""
    call, cpu_entry, triton_entry = _entry_points()[op]
    monkeypatch.setattr(alignkit.cpu, "TORCH_TWIN_MAX_ELEMENTS", 0)  # the numba entry points, spied on
    cpu_spy, triton_spy = _spy(monkeypatch, *cpu_entry), _spy(monkeypatch, *triton_entry)
    results = {}
    for choice in ("triton", "cpu"):
        monkeypatch.setenv(backend.ENV_VAR, choice)
        cpu_spy.reset_mock()
        triton_spy.reset_mock()
        torch.manual_seed(0)
        results[choice] = call(device)
        ran, skipped = (triton_spy, cpu_spy) if choice == "triton" else (cpu_spy, triton_spy)
        assert ran.called, f"{op}: ALIGNKIT_BACKEND={choice} did not run the {choice} implementation"
        assert not skipped.called, f"{op}: ALIGNKIT_BACKEND={choice} ran the other implementation"
    torch.testing.assert_close(results["triton"].cpu(), results["cpu"].cpu())
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    cpu_spy.reset_mock()
    triton_spy.reset_mock()
    call(device)
    auto_ran = triton_spy if device.type == "cuda" else cpu_spy
    assert auto_ran.called and not (cpu_spy if auto_ran is triton_spy else triton_spy).called


def test_backend_argument_beats_environment_in_ops(monkeypatch, device):
    from alignkit.cpu import advantages as cpu_advantages
    from alignkit.kernels import gae as gae_kernels

    monkeypatch.setattr(alignkit.cpu, "TORCH_TWIN_MAX_ELEMENTS", 0)  # the numba entry point, spied on
    cpu_spy = _spy(monkeypatch, cpu_advantages, "gae")
    triton_spy = _spy(monkeypatch, gae_kernels, "gae_fwd")
    r = torch.randn(2, 9, device=device)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    alignkit.gae(r, r, torch.ones(2, 9, device=device), backend="cpu")
    assert cpu_spy.called and not triton_spy.called
    cpu_spy.reset_mock()
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    alignkit.gae(r, r, torch.ones(2, 9, device=device), backend="triton")
    assert triton_spy.called and not cpu_spy.called


# Every public op that dispatches between the CPU implementation and the Triton kernels.
DISPATCHING_OPS = (
    "gae",
    "gae_packed",
    "discounted_returns",
    "discounted_returns_packed",
    "token_logprobs",
    "fused_linear_logprobs",
    "causal_lm_logprobs",
    "ppo_policy_loss",
    "value_loss",
    "fused_linear_ppo_loss",
    "rollout.sample",
)


def test_describe_lists_every_registered_op(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    table = backend.describe()
    missing = set(DISPATCHING_OPS) - set(table)
    assert not missing, f"ops missing from backend.describe(): {sorted(missing)}"
    for name in table:  # every listed name is a public op: alignkit.<name> (dotted: a subpackage's)
        import functools

        assert callable(functools.reduce(getattr, name.split("."), alignkit)), name
    assert all(row["cpu"] == "cpu" for row in table.values())
    expected_cuda = "triton" if kernels.HAS_TRITON else "cpu"
    assert all(row["cuda"] == expected_cuda for row in table.values())
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert all(row == {"cpu": "cpu", "cuda": "cpu"} for row in backend.describe().values())
