"""Backend dispatch: defaults, the environment variable, forced backends and their errors."""

from __future__ import annotations

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


def test_environment_variable_drives_ops(monkeypatch, device):
    r = torch.randn(2, 9, dtype=torch.float64, device=device)
    m = torch.ones(2, 9, device=device)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    via_triton = alignkit.gae(r, r, m, 0.9, 0.9)
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    via_cpu = alignkit.gae(r, r, m, 0.9, 0.9)
    torch.testing.assert_close(via_triton, via_cpu)


def test_describe_lists_every_registered_op(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    table = backend.describe()
    assert {"gae", "gae_packed", "discounted_returns"} <= set(table)
    assert all(row["cpu"] == "cpu" for row in table.values())
