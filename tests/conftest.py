"""Test setup: every Triton kernel runs on CPU under the interpreter when CUDA is absent; the float64
oracles (tests/oracles.py) import as ``oracles``."""

from __future__ import annotations

import os
import pathlib
import sys
import zlib

import torch

# Before anything imports triton: without CUDA, kernels run through the Triton interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Value checks everywhere (on CUDA they are off by default: each costs a device sync), so the
# bad-input tests hold on every device.
os.environ.setdefault("ALIGNKIT_VALIDATION", "full")

import pytest

# --import-mode=importlib puts no test directory on sys.path: this one makes `from oracles import ...`
# work in every test module.
_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["cpu", "triton"]


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A fresh but reproducible random stream per test (seeded from the test's id)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Run a test once per implementation: Triton under the interpreter when CUDA is absent; with
    CUDA, the triton case makes CUDA the default device so its tensors reach the compiled kernels.
    A Triton-only test takes it as ``@pytest.mark.parametrize("backend", ["triton"], indirect=True)``
    (and its tensors on ``backend_device``), never a bare ``backend="triton"`` on CPU tensors, which
    fails on a CUDA machine (the interpreter is off there)."""
    if request.param == "triton" and HAS_CUDA:
        torch.set_default_device("cuda")
        try:
            yield request.param
        finally:
            torch.set_default_device(None)
    else:
        yield request.param


@pytest.fixture
def backend_device(backend: str) -> torch.device:
    """Where a test's tensors live for ``backend``: CUDA for triton when present (compiled kernels),
    else CPU (the interpreter, or the CPU implementation)."""
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (the Triton kernels are compiled), else CPU (interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by bench/gpu.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["torch-twin", "numba"])
def cpu_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through both CPU implementations of the loss passes and scans: the plain-torch
    twins (alignkit/cpu/*_torch.py, what small inputs use) and the numba kernels (large ones)."""
    import alignkit.cpu

    twin = request.param == "torch-twin"
    monkeypatch.setattr(alignkit.cpu, "TORCH_TWIN_MAX_ELEMENTS", 1 << 62 if twin else 0)
    monkeypatch.setattr(alignkit.cpu, "TORCH_TWIN_MAX_STEPS", 1 << 62 if twin else 0)
    return request.param
