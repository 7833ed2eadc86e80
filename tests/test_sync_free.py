"""Hot paths without host syncs (issue 15): the validation mode, and a count of every host read of
tensor data that alignkit's own code makes in a policy-loss forward+backward and in GAE calls.

On CUDA a host read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...) waits for the whole
queue and cannot be captured in a CUDA graph. On CPU the same calls are counted under a mock, with
the validation mode CUDA gets by default (``auto`` skips value checks there: ``shapes`` here), on
the Triton path (the interpreter), so the count covers the op layer and the kernels' host
launchers. With CUDA, the same test runs on CUDA tensors in ``auto`` mode, and again under
``torch.cuda.set_sync_debug_mode("error")``, which also sees syncs made inside C++ (``nonzero``,
boolean indexing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch

import alignkit
from alignkit import _checks

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
CUDA_MODE = "auto" if HAS_CUDA else "shapes"  # the mode CUDA tensors get by default

_PACKAGE = os.path.realpath(os.path.dirname(alignkit.__file__))
_KERNELS = os.path.realpath(os.path.dirname(alignkit.kernels.__file__))
_CPU_IMPL = os.path.join(_PACKAGE, "cpu")  # the CPU implementation: never used for CUDA tensors


@pytest.fixture
def validation():
    """Set the validation mode for one test; restore the previous setting afterwards."""
    previous = _checks._validation
    yield alignkit.set_validation
    alignkit.set_validation(previous)


# ----------------------------------------------------------------------------- validation mode


def test_validation_mode_defaults_and_errors(validation, monkeypatch):
    monkeypatch.delenv(_checks.VALIDATION_ENV_VAR, raising=False)
    validation(None)
    assert alignkit.validation_mode() == "auto"
    assert _checks.checks_values(torch.ones(1))  # CPU: value checks cost no sync
    monkeypatch.setenv(_checks.VALIDATION_ENV_VAR, "Shapes")
    assert alignkit.validation_mode() == "shapes"
    assert not _checks.checks_values(torch.ones(1))
    assert validation("full") is None  # the argument wins over the variable
    assert alignkit.validation_mode() == "full"
    assert validation(None) == "full"
    monkeypatch.setenv(_checks.VALIDATION_ENV_VAR, "fast")
    with pytest.raises(
        ValueError, match=r"ALIGNKIT_VALIDATION must be one of auto, full, shapes, got 'fast'"
    ):
        alignkit.validation_mode()
    with pytest.raises(ValueError, match=r"mode must be one of auto, full, shapes or None, got 'off'"):
        validation("off")
    with pytest.raises(ValueError, match="mode must be one of"):
        validation(True)


@pytest.mark.gpu
def test_auto_skips_value_checks_on_cuda_only(validation):
    validation("auto")
    assert not _checks.checks_values(torch.ones(1, device="cuda"))
    assert _checks.checks_values(torch.ones(1))
    validation("full")
    assert _checks.checks_values(torch.ones(1, device="cuda"))


def test_shapes_mode_skips_value_checks_but_keeps_shape_checks(validation):
    validation("shapes")
    r, v = torch.randn(2, 4), torch.randn(2, 4)
    alignkit.gae(r, v, torch.full((2, 4), 0.5))  # not 0/1: not checked
    alignkit.masked_mean(r, torch.full((2, 4), 2.0))
    with pytest.raises(ValueError, match="mask must have the shape of rewards"):
        alignkit.gae(r, v, torch.ones(2, 3))
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        alignkit.gae(r.long(), v, torch.ones(2, 4))
    with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
        alignkit.gae_packed(r[0], v[0], torch.ones(4), torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D with at least 2 offsets"):
        alignkit.gae_packed(r[0], v[0], torch.ones(4), torch.tensor([4]))
    # The CPU implementation reads offsets on the host: there they are always validated.
    with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
        alignkit.gae_packed(r[0], v[0], torch.ones(4), torch.tensor([0, 3, 3, 4]), backend="cpu")


def test_full_mode_keeps_every_cpu_error(validation):
    validation("full")
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        alignkit.gae(torch.randn(2, 4), torch.randn(2, 4), torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="mask must select at least 2 elements"):
        alignkit.masked_whiten(torch.randn(3), torch.tensor([0, 1, 0]))


# ----------------------------------------------------------------------------- counting host reads


class HostReads:
    """Counts host reads of tensor data made directly from alignkit's code (alignkit/ and kernels/,
    the CPU implementation aside): each entry is ``(what, file:line)``."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "__array__")
    FUNCTIONS = ("nonzero", "unique", "masked_select")  # sync on CUDA: the output size is data
    # Not patched: __getitem__ (boolean indexing syncs too). Setting and deleting __getitem__ on
    # torch.Tensor leaves CPython's sequence slot filled, and tensors then pass for sequences
    # (torch.tensor([0-d tensors]) breaks). The CUDA test's sync detector covers it.

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self._paths: dict[str, bool] = {}
        for name in self.METHODS + self.FUNCTIONS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda args, kwargs: True)
        for name in self.FUNCTIONS:
            self._wrap(monkeypatch, torch, name, lambda args, kwargs: True)
        self._wrap(monkeypatch, torch.Tensor, "to", self._to_host)
        self._wrap(monkeypatch, torch.cuda, "synchronize", lambda args, kwargs: True)

    def _ours(self, filename: str) -> bool:
        ours = self._paths.get(filename)
        if ours is None:
            path = os.path.realpath(filename)
            ours = (path.startswith(_PACKAGE + os.sep) or path.startswith(_KERNELS + os.sep)) and not (
                path.startswith(_CPU_IMPL + os.sep)
            )
            self._paths[filename] = ours
        return ours

    def _wrap(self, monkeypatch, owner, name: str, counts: Callable) -> None:
        original = getattr(owner, name)
        calls = self.calls

        def wrapper(*args, **kwargs):
            frame = sys._getframe(1)
            if self._ours(frame.f_code.co_filename) and counts(args, kwargs):
                calls.append((name, f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    @staticmethod
    def _to_host(args, kwargs) -> bool:
        """``t.to(...)`` naming the CPU as its target (a device-to-host copy for a CUDA tensor)."""
        targets = [*args[1:], kwargs.get("device")]
        return any(
            (isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
            for t in targets
        )


# Each hot path: inputs (made outside the checked region: an upload from the host is a blocking
# copy) and the call, which returns the tensors to check.


def _policy_inputs(B: int = 3, T: int = 37) -> dict:
    logp = -torch.rand(B, T, device=DEVICE) * 2
    return {
        "logp": logp.requires_grad_(),
        "old_logp": logp.detach() + 0.1 * torch.randn(B, T, device=DEVICE),
        "advantages": torch.randn(B, T, device=DEVICE),
        "mask": (torch.rand(B, T, device=DEVICE) > 0.3).float(),
        "ref_logp": logp.detach() + 0.1 * torch.randn(B, T, device=DEVICE),
        "entropy": torch.rand(B, T, device=DEVICE).requires_grad_(),
    }


def _policy_step(inputs: dict, loss_type: str = "ppo_clip") -> list[torch.Tensor]:
    loss, metrics = alignkit.ppo_policy_loss(
        **inputs, kl_coef=0.01, entropy_coef=0.001, loss_type=loss_type, backend="triton"
    )
    loss.backward()
    return [loss, *metrics.values(), inputs["logp"].grad, inputs["entropy"].grad]


def _value_inputs(B: int = 3, T: int = 37) -> dict:
    v = torch.randn(B, T, device=DEVICE)
    return {
        "values": v.requires_grad_(),
        "old_values": v.detach() + 0.1,
        "returns": torch.randn(B, T, device=DEVICE),
        "mask": (torch.rand(B, T, device=DEVICE) > 0.3).float(),
    }


def _value_step(inputs: dict) -> list[torch.Tensor]:
    loss, metrics = alignkit.value_loss(**inputs, backend="triton")
    loss.backward()
    return [loss, *metrics.values(), inputs["values"].grad]


def _padded_inputs(B: int = 3, T: int = 70) -> dict:
    return {
        "rewards": torch.randn(B, T, device=DEVICE),
        "values": torch.randn(B, T, device=DEVICE),
        "mask": torch.rand(B, T, device=DEVICE) > 0.2,
    }


def _gae_padded(inputs: dict) -> list[torch.Tensor]:
    return [*alignkit.gae(**inputs, gamma=0.99, lam=0.95, whiten=True, backend="triton")]


def _packed_inputs(lengths=(5, 1, 30, 12)) -> dict:
    n = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "rewards": torch.randn(n, device=DEVICE),
        "values": torch.randn(n, device=DEVICE),
        "mask": (torch.rand(n, device=DEVICE) > 0.2).float(),
        "cu_seqlens": cu.to(DEVICE),
    }


def _gae_packed(inputs: dict) -> list[torch.Tensor]:
    r, m, cu = inputs["rewards"], inputs["mask"], inputs["cu_seqlens"]
    adv, ret = alignkit.gae_packed(**inputs, gamma=0.99, lam=0.95, backend="triton")
    out = alignkit.discounted_returns_packed(r, m, cu, gamma=0.99, backend="triton")
    return [adv, ret, out, alignkit.masked_whiten(adv, m), alignkit.masked_mean(adv, m)]


HOT_PATHS = {
    "ppo_policy_loss fwd+bwd": (_policy_inputs, _policy_step),
    "gspo policy loss fwd+bwd": (_policy_inputs, lambda inputs: _policy_step(inputs, "gspo")),
    "value_loss fwd+bwd": (_value_inputs, _value_step),
    "gae (whiten)": (_padded_inputs, _gae_padded),
    "gae_packed + discounted_returns_packed + whiten": (_packed_inputs, _gae_packed),
}


@pytest.mark.parametrize("case", list(HOT_PATHS))
def test_hot_paths_make_no_host_read(case, validation, monkeypatch):
    validation(CUDA_MODE)
    make, run = HOT_PATHS[case]
    inputs = make()
    reads = HostReads(monkeypatch)
    outputs = run(inputs)
    assert reads.calls == [], f"{case} read tensor data on the host: {reads.calls}"
    monkeypatch.undo()
    assert all(bool(torch.isfinite(t).all()) for t in outputs if t is not None)


def test_the_counter_sees_value_checks(validation, monkeypatch):
    """The same calls with value checks on: the counter is not blind (each check is one read)."""
    validation("full")
    policy, packed = _policy_inputs(), _packed_inputs()
    reads = HostReads(monkeypatch)
    _policy_step(policy)
    assert any(where.startswith("loss_pass.py") for _, where in reads.calls), reads.calls
    reads.calls.clear()
    _gae_packed(packed)
    files = {where.split(":")[0] for _, where in reads.calls}
    assert {"_checks.py", "gae.py", "whiten.py"} <= files, reads.calls


def test_unchecked_cu_seqlens_give_the_checked_result(validation):
    """Offsets left on the device (grid sized for N) compute what validated host offsets do."""
    inputs = _packed_inputs()
    r, v, m, cu = inputs.values()
    validation("full")
    expected = alignkit.gae_packed(r, v, m, cu.cpu(), gamma=0.9, lam=0.7, backend="triton")
    expected_dr = alignkit.discounted_returns_packed(r, m, cu.cpu(), gamma=0.9, backend="triton")
    validation(CUDA_MODE)
    got = alignkit.gae_packed(r, v, m, cu.to(torch.int32), gamma=0.9, lam=0.7, backend="triton")
    got_dr = alignkit.discounted_returns_packed(r, m, cu.to(torch.int32), gamma=0.9, backend="triton")
    for a, b in zip((*got, got_dr), (*expected, expected_dr), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(HOT_PATHS))
def test_hot_paths_do_not_sync_cuda(case, validation):
    """torch's own sync detector: any cudaStreamSynchronize / blocking copy in the call raises."""
    validation("auto")
    make, run = HOT_PATHS[case]
    run(make())  # compile first
    inputs = make()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
