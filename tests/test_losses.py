"""PPO losses (alignkit.ppo_policy_loss with every loss_type: ppo_clip, gspo, cispo; value_loss,
kl_penalty, agg_loss) against the float64 oracles of tests/oracles.py (PolicyLossConfig itself:
tests/test_loss_config.py).

The oracle is the formulas of docs/formulas.md written plainly in float64 torch; gradients are
autograd through it. Ties use strict comparisons (``torch.where(L2 > L1, L2, L1)``), the convention
alignkit documents (a tie is not clipped), so autograd of the oracle is the exact reference at clip
boundaries too. Every option runs on the CPU backend; the Triton kernels (under the interpreter
without CUDA, compiled on CUDA tensors with one) run a representative subset that covers every
option value.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import assert_close, ref_agg, ref_kl, ref_policy, ref_value

import alignkit
from alignkit import agg_loss, kl_penalty, ppo_policy_loss, value_loss

# every CPU case through the torch twin and the numba kernels of the loss pass (conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_twin")

# A Triton-only test: the backend fixture's triton case (CUDA tensors when CUDA is present).
triton_only = pytest.mark.parametrize("backend", ["triton"], indirect=True)

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_NAMES = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]
LOSS_TYPES = ["ppo_clip", "gspo", "cispo"]

# ----------------------------------------------------------------------------- helpers


def make_policy_inputs(B=4, T=48, dtype=torch.float32, spread=0.7, empty_row=True, device=None):
    logp = -3 * torch.rand(B, T)
    inputs = {
        "logp": logp,
        "old_logp": logp + spread * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "mask": torch.rand(B, T) > 0.25,
        "is_weights": 2 * torch.rand(B, T),
        "ref_logp": logp + 0.5 * torch.randn(B, T),
        "entropy": 2 * torch.rand(B, T),
    }
    if empty_row and B > 1:
        inputs["mask"][1] = False
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in inputs.items()}


def run_policy(inputs, backend, opts, extras=("is_weights", "ref_logp", "entropy"), rtol=1e-6):
    """Run alignkit and the oracle on the same inputs; compare loss, metrics and gradients."""
    logp = inputs["logp"].clone().requires_grad_()
    entropy = inputs["entropy"].clone().requires_grad_() if "entropy" in extras else None
    kwargs = dict(opts)
    for name in ("is_weights", "ref_logp"):
        if name in extras:
            kwargs[name] = inputs[name]
    loss, metrics = ppo_policy_loss(
        logp,
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        entropy=entropy,
        backend=backend,
        **kwargs,
    )
    grads = torch.autograd.grad(loss, [logp] + ([entropy] if entropy is not None else []))

    d = {k: v.double() for k, v in inputs.items() if v.is_floating_point()}
    logp64 = d["logp"].clone().requires_grad_()
    ent64 = d["entropy"].clone().requires_grad_() if entropy is not None else None
    kw64 = dict(opts)
    for name in ("is_weights", "ref_logp"):
        if name in extras:
            kw64[name] = d[name]
    total, ref_metrics, magnitude = ref_policy(
        logp64, d["old_logp"], d["advantages"], inputs["mask"], entropy=ent64, **kw64
    )
    ref_grads = torch.autograd.grad(total, [logp64] + ([ent64] if ent64 is not None else []))

    assert loss.dim() == 0 and loss.requires_grad
    assert_close(loss, total, rtol, scale=magnitude, name="loss")
    assert set(metrics) == set(ref_metrics)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert_close(value, ref_metrics[key], rtol, scale=max(float(magnitude), 1e-3), name=key)
    for g, rg, name in zip(grads, ref_grads, ("d logp", "d entropy"), strict=False):
        assert g.dtype == inputs["logp"].dtype
        assert_close(g, rg, rtol if g.dtype in (torch.float32, torch.float64) else 1e-2, name=name)
        assert (g[~inputs["mask"]] == 0).all(), f"{name} nonzero on masked positions"
    return loss, metrics, grads


CLIPS = [(0.2, 0.2), (0.2, 0.28)]
DUALS = [3.0, None]
AGGS = [
    ("token-mean", None),
    ("token-mean", 100.0),
    ("seq-mean-token-sum", None),
    ("seq-mean-token-mean", None),
    ("seq-mean-token-sum-norm", None),
    ("seq-mean-token-sum-norm", 37.0),
]
# (kl_estimator or None, kl_coef, with entropy): every estimator and alias, entropy on and off.
EXTRAS = [
    (None, 0.0, False),
    ("k1", 0.1, True),
    ("abs", 0.2, False),
    ("k2", 0.1, True),
    ("k3", 0.3, True),
    ("low_var_kl", 0.1, False),
    ("mse", 0.0, True),
]


def policy_opts(clip, dual, agg, loss_type, kl, ent):
    opts = {
        "clip_low": clip[0],
        "clip_high": clip[1],
        "dual_clip": dual,
        "agg": agg[0],
        "agg_scale": agg[1],
        "loss_type": loss_type,
    }
    extras = []
    if kl[0] is not None:
        opts.update(kl_estimator=kl[0], kl_coef=kl[1])
        extras.append("ref_logp")
    if kl[2]:
        opts["entropy_coef"] = 0.01
        extras.append("entropy")
    return opts, extras


# ----------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize("kl", EXTRAS, ids=lambda e: f"{e[0]}-ent{int(e[2])}")
@pytest.mark.parametrize("is_weights", [False, True], ids=["noIS", "IS"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGGS, ids=lambda a: f"{a[0]}-{a[1]}")
@pytest.mark.parametrize("dual", DUALS, ids=["dual3", "nodual"])
@pytest.mark.parametrize("clip", CLIPS, ids=["sym", "asym"])
def test_policy_loss_all_options_cpu(clip, dual, agg, loss_type, is_weights, kl):
    opts, extras = policy_opts(clip, dual, agg, loss_type, kl, kl[2])
    if is_weights:
        extras.append("is_weights")
    run_policy(make_policy_inputs(B=5, T=37), "cpu", opts, extras)


# Every option value at least once, under the Triton interpreter (slow: a subset).
TRITON_CASES = [
    (CLIPS[0], 3.0, AGGS[0], "ppo_clip", False, EXTRAS[0]),
    (CLIPS[1], 3.0, AGGS[2], "ppo_clip", True, EXTRAS[1]),
    (CLIPS[0], None, AGGS[3], "ppo_clip", True, EXTRAS[2]),
    (CLIPS[1], 3.0, AGGS[4], "gspo", True, EXTRAS[3]),
    (CLIPS[0], 3.0, AGGS[1], "ppo_clip", False, EXTRAS[4]),
    (CLIPS[1], None, AGGS[5], "gspo", False, EXTRAS[5]),
    (CLIPS[0], 3.0, AGGS[3], "gspo", True, EXTRAS[6]),
    (CLIPS[1], 3.0, AGGS[3], "cispo", True, EXTRAS[4]),
    (CLIPS[0], None, AGGS[1], "cispo", False, EXTRAS[2]),
    (CLIPS[1], None, AGGS[5], "cispo", True, EXTRAS[1]),
]


@triton_only
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[2][0]}-{c[3]}-{c[5][0]}")
def test_policy_loss_options_triton(backend, backend_device, case):
    clip, dual, agg, loss_type, is_weights, kl = case
    opts, extras = policy_opts(clip, dual, agg, loss_type, kl, kl[2])
    if is_weights:
        extras.append("is_weights")
    run_policy(make_policy_inputs(B=4, T=45, device=backend_device), backend, opts, extras)


@triton_only
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_multi_tile_triton(monkeypatch, backend, backend_device, loss_type):
    from alignkit.kernels import ppo_loss as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_T", 16)  # 3 tiles per row: partial sums across tiles
    opts = {"agg": "seq-mean-token-mean", "loss_type": loss_type, "kl_coef": 0.1, "entropy_coef": 0.01}
    inputs = make_policy_inputs(B=3, T=40, device=backend_device)
    run_policy(inputs, backend, opts, ("ref_logp", "entropy", "is_weights"))


@pytest.mark.parametrize("loss_type", ["ppo_clip", "cispo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_policy_loss_dtypes(backend, dtype, loss_type):
    inputs = make_policy_inputs(B=3, T=33, dtype=dtype)
    opts = {"agg": "seq-mean-token-mean", "kl_coef": 0.1, "entropy_coef": 0.01, "loss_type": loss_type}
    loss, metrics, _ = run_policy(inputs, backend, opts, rtol=1e-12 if dtype == torch.float64 else 1e-6)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected and all(v.dtype == expected for v in metrics.values())


def test_non_contiguous_inputs(backend):
    wide = make_policy_inputs(B=3, T=40)
    inputs = {k: v[:, ::2] for k, v in wide.items()}  # strided views
    assert not inputs["logp"].is_contiguous()
    run_policy(inputs, backend, {"agg": "seq-mean-token-sum", "kl_coef": 0.1, "entropy_coef": 0.01})


@triton_only
def test_backends_agree_at_larger_shape(backend, backend_device):
    inputs = make_policy_inputs(B=8, T=64, device="cpu")
    opts = {"agg": "token-mean", "kl_coef": 0.05, "entropy_coef": 0.001}
    cpu = run_policy(inputs, "cpu", opts)
    tri = run_policy({k: v.to(backend_device) for k, v in inputs.items()}, backend, opts)
    assert_close(tri[0], cpu[0], 1e-6, name="loss")
    assert_close(tri[2][0], cpu[2][0], 1e-6, name="d logp")


def test_cpu_parallel_kernels_match_oracle(monkeypatch):
    # The numba prange variants run only past PARALLEL_MIN_ELEMENTS; force them on a small batch.
    import alignkit.cpu

    monkeypatch.setattr(alignkit.cpu, "PARALLEL_MIN_ELEMENTS", 0)
    for loss_type in LOSS_TYPES:
        opts = {"agg": "seq-mean-token-mean", "kl_coef": 0.1, "entropy_coef": 0.01, "loss_type": loss_type}
        run_policy(make_policy_inputs(B=5, T=33), "cpu", opts)
    check_value_loss("cpu", 0.2, AGGS[3])


# ----------------------------------------------------------------------------- policy edge cases


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_fully_masked_rows_are_excluded(backend, agg, loss_type):
    inputs = make_policy_inputs(B=4, T=24)
    inputs["mask"][1] = False
    inputs["mask"][3] = False
    opts = {"agg": agg, "kl_coef": 0.1, "entropy_coef": 0.01, "loss_type": loss_type}
    kw = {"ref_logp": inputs["ref_logp"], "entropy": inputs["entropy"]}
    full, _ = ppo_policy_loss(
        inputs["logp"],
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        backend=backend,
        **opts,
        **kw,
    )
    keep = [0, 2]
    sub = {k: v[keep] for k, v in inputs.items()}
    part, _ = ppo_policy_loss(
        sub["logp"],
        sub["old_logp"],
        sub["advantages"],
        sub["mask"],
        backend=backend,
        **opts,
        ref_logp=sub["ref_logp"],
        entropy=sub["entropy"],
    )
    if agg == "seq-mean-token-sum-norm":
        part = part * sub["mask"].shape[1] / inputs["mask"].shape[1]  # same T: scale identical
    assert_close(full, part, 1e-6, name="loss")
    run_policy(inputs, backend, opts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_batch_gives_zero(backend, agg, loss_type):
    inputs = make_policy_inputs(B=3, T=16)
    inputs["mask"][:] = False
    logp = inputs["logp"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    loss, metrics = ppo_policy_loss(
        logp,
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        agg=agg,
        loss_type=loss_type,
        ref_logp=inputs["ref_logp"],
        kl_coef=0.1,
        entropy=ent,
        entropy_coef=0.1,
        backend=backend,
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in metrics.values())
    assert (logp.grad == 0).all() and (ent.grad == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages(backend, loss_type):
    inputs = make_policy_inputs(B=3, T=20)
    inputs["advantages"].zero_()
    loss, metrics, grads = run_policy(inputs, backend, {"loss_type": loss_type}, extras=())
    assert float(loss.detach()) == 0.0
    if loss_type != "cispo":  # CISPO's clip fraction counts ratios outside the range, whatever A
        assert float(metrics["pg_clipfrac"]) == 0.0
    assert (grads[0] == 0).all()


@pytest.mark.parametrize("loss_type", ["ppo_clip", "cispo"])
@pytest.mark.parametrize("clip", [(0.0, 0.0), (0.0, 0.2), (0.2, 0.0)])
def test_ratio_exactly_at_clip_boundary(backend, clip, loss_type):
    # ratio == 1 exactly (logp == old_logp) sits on every zero-width clip bound: L1 == L2, a tie,
    # which is not clipped: the gradient is the unclipped -A * w (CISPO: w = ratio = 1, also -A).
    inputs = make_policy_inputs(B=3, T=20)
    inputs["old_logp"] = inputs["logp"].clone()
    opts = {"clip_low": clip[0], "clip_high": clip[1], "loss_type": loss_type}
    _, metrics, grads = run_policy(inputs, backend, opts, extras=())
    m = inputs["mask"]
    assert float(metrics["pg_clipfrac"]) == 0.0
    expected = torch.where(m, -inputs["advantages"] / m.sum(), torch.zeros(()))
    assert_close(grads[0], expected, 1e-6, name="d logp")


@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_log_ratio_beyond_20(backend, dual, loss_type):
    inputs = make_policy_inputs(B=4, T=16)
    offsets = torch.tensor([30.0, -30.0, 20.0, -20.0, 25.0, -45.0, 0.5, 19.0])
    inputs["logp"] = -torch.randint(0, 8, (4, 16)).float() / 8  # logp - offset is exact in fp32
    inputs["old_logp"] = inputs["logp"] - offsets.repeat(8)[:16].expand(4, 16)
    inputs["mask"][:, :8] = True
    opts = {"dual_clip": dual, "loss_type": loss_type, "kl_coef": 0.1}
    loss, metrics, _ = run_policy(inputs, backend, opts, extras=("ref_logp",))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kl_estimator", ["k1", "abs", "k2", "k3"])
def test_kl_estimator_clamps_inside_policy_loss(backend, kl_estimator):
    # d = logp - ref beyond +-20 (k3's inner clamp) and k3 values above 10 (its outer clamp): no gradient.
    inputs = make_policy_inputs(B=2, T=16, empty_row=False)
    offsets = torch.tensor(
        [-30.0, -25.0, -5.0, -3.0, -1.0, 0.0, 0.5, 2.0, 3.0, 5.0, 21.0, 30.0, -0.25, 0.25, 8, -8]
    )
    inputs["logp"] = -torch.randint(0, 8, (2, 16)).float() / 8
    inputs["ref_logp"] = inputs["logp"] - offsets
    inputs["advantages"].zero_()  # isolate the KL term
    _, _, grads = run_policy(
        inputs, backend, {"kl_coef": 0.5, "kl_estimator": kl_estimator}, extras=("ref_logp",)
    )
    if kl_estimator == "k3":
        m = inputs["mask"]
        assert (grads[0][:, :4][m[:, :4]] == 0).all() and (grads[0][:, 10:12][m[:, 10:12]] == 0).all()


def test_gspo_sequence_ratio_clamped_at_10(backend):
    inputs = make_policy_inputs(B=2, T=16, empty_row=False)
    inputs["old_logp"] = inputs["logp"] - 12.0  # s = 12 > 10: ratio e^10, no gradient through it
    inputs["advantages"] = -inputs["advantages"].abs()  # A < 0: the unclipped branch is active
    _, _, grads = run_policy(inputs, backend, {"loss_type": "gspo", "clip_high": 1e6}, extras=())
    assert (grads[0] == 0).all()


# ----------------------------------------------------------------------------- CISPO


def cispo_weight(inputs, clip_low=0.2, clip_high=0.2):
    """w = clamp(exp(clamp(logp - old, -20, 20)), 1 - clip_low, 1 + clip_high) in float64."""
    lr = (inputs["logp"].double() - inputs["old_logp"].double()).clamp(-20, 20)
    return lr.exp().clamp(1 - clip_low, 1 + clip_high)


@pytest.mark.parametrize("clip", CLIPS, ids=["sym", "asym"])
def test_cispo_closed_form_fp64(backend, clip):
    """fp64 in, fp64 out: loss = token-mean of -w A logp is_w, d logp = -w A is_w / n at every live
    token, including tokens far outside the clip range (where ppo_clip has no gradient)."""
    inputs = make_policy_inputs(B=5, T=29, dtype=torch.float64, spread=2.0)
    opts = {"loss_type": "cispo", "clip_low": clip[0], "clip_high": clip[1]}
    loss, metrics, grads = run_policy(inputs, backend, opts, extras=("is_weights",), rtol=1e-12)
    m = inputs["mask"]
    n = m.sum()
    w = cispo_weight(inputs, *clip)
    a, isw = inputs["advantages"], inputs["is_weights"]
    zero = torch.zeros((), dtype=torch.float64)
    assert_close(loss, torch.where(m, -w * a * inputs["logp"] * isw, zero).sum() / n, 1e-12, name="loss")
    assert_close(grads[0], torch.where(m, -w * a * isw / n, zero), 1e-12, name="d logp")
    outside = m & ((w == 1 - clip[0]) | (w == 1 + clip[1]))
    assert outside.sum() > 10 and (grads[0][outside] != 0).all()
    assert float(metrics["pg_clipfrac"]) == pytest.approx(int(outside.sum()) / int(n), abs=1e-12)
    assert loss.dtype == torch.float64 and grads[0].dtype == torch.float64


def test_cispo_has_no_dual_clip(backend):
    """Negative advantages with ratios far above 1 + clip_high: dual_clip changes nothing and
    pg_clipfrac_lower stays 0 (dual_clip is ppo_clip's)."""
    inputs = make_policy_inputs(B=3, T=24, empty_row=False)
    inputs["old_logp"] = inputs["logp"] - 1.0  # ratio e > 1 + clip_high: every token clipped
    inputs["advantages"] = -inputs["advantages"].abs() - 0.1
    results = [
        run_policy(inputs, backend, {"loss_type": "cispo", "dual_clip": dual}, extras=())
        for dual in (3.0, 1.5, None)
    ]
    for loss, metrics, grads in results:
        assert float(metrics["pg_clipfrac_lower"]) == 0.0 and float(metrics["pg_clipfrac"]) == 1.0
        assert torch.equal(loss, results[0][0]) and torch.equal(grads[0], results[0][2][0])
    ppo = run_policy(inputs, backend, {"dual_clip": 3.0}, extras=())  # ppo_clip: dual clip active
    assert float(ppo[1]["pg_clipfrac_lower"]) == 0.0  # e < 3: not yet
    ppo = run_policy(inputs, backend, {"dual_clip": 1.5}, extras=())
    assert float(ppo[1]["pg_clipfrac_lower"]) == 1.0


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 257), (3, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cispo_odd_shapes(backend, shape):
    inputs = make_policy_inputs(*shape)
    opts = {"loss_type": "cispo", "agg": "seq-mean-token-mean", "kl_coef": 0.1, "entropy_coef": 0.01}
    run_policy(inputs, backend, opts)
    run_policy(inputs, backend, {**opts, "agg": "seq-mean-token-sum-norm", "clip_high": 0.28})


def test_cispo_t1_with_all_masked_rows(backend):
    inputs = make_policy_inputs(B=6, T=1, empty_row=False)
    inputs["mask"] = torch.tensor([[True], [False], [True], [False], [False], [True]])
    for agg in AGG_MODES:
        run_policy(inputs, backend, {"loss_type": "cispo", "agg": agg, "kl_coef": 0.1, "entropy_coef": 0.01})


def test_cispo_ratio_on_a_clip_bound_is_not_clipped(backend):
    """logp - old_logp = log(1 + clip_high) (and log(1 - clip_low)) exactly representable: exp gives
    the bound itself in fp64, a tie, inside the range: w = ratio and nothing counts as clipped."""
    inputs = make_policy_inputs(B=2, T=8, dtype=torch.float64, empty_row=False)
    inputs["mask"][:] = True
    clip_high = math.expm1(0.25)  # exp(0.25) == 1 + clip_high up to rounding
    lr = torch.tensor([0.25, -0.25, 0.25, 0.0, -0.25, 0.0, 0.25, 0.0], dtype=torch.float64)
    inputs["old_logp"] = inputs["logp"] - lr
    diff = inputs["logp"] - inputs["old_logp"]
    ratio = diff.exp()
    opts = {"loss_type": "cispo", "clip_high": float(ratio.max() - 1), "clip_low": float(1 - ratio.min())}
    assert opts["clip_high"] == pytest.approx(clip_high, rel=1e-12)
    _, metrics, grads = run_policy(inputs, backend, opts, extras=(), rtol=1e-12)
    assert float(metrics["pg_clipfrac"]) == 0.0
    assert_close(grads[0], -ratio * inputs["advantages"] / 16, 1e-12, name="d logp")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_in_masked_positions_does_not_leak(backend, loss_type):
    clean = make_policy_inputs(B=3, T=16)
    opts = {"agg": "seq-mean-token-mean", "kl_coef": 0.1, "entropy_coef": 0.1, "loss_type": loss_type}
    results = []
    for fill in (None, float("nan"), float("inf")):
        inputs = dict(clean)
        if fill is not None:
            for key in ("logp", "old_logp", "advantages", "ref_logp", "entropy", "is_weights"):
                inputs[key] = clean[key].masked_fill(~clean["mask"], fill)
        logp = inputs["logp"].clone().requires_grad_()
        ent = inputs["entropy"].clone().requires_grad_()
        loss, metrics = ppo_policy_loss(
            logp,
            inputs["old_logp"],
            inputs["advantages"],
            inputs["mask"],
            **opts,
            is_weights=inputs["is_weights"],
            ref_logp=inputs["ref_logp"],
            entropy=ent,
            backend=backend,
        )
        loss.backward()
        results.append((loss.detach(), torch.stack(list(metrics.values())), logp.grad, ent.grad))
    for poisoned in results[1:]:
        for a, b in zip(poisoned, results[0], strict=True):
            assert torch.equal(a, b)
    run_policy(clean, backend, opts)


def test_gradients_reach_logp_and_entropy_only():
    inputs = make_policy_inputs(B=2, T=8, empty_row=False)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v.is_floating_point()}
    loss, metrics = ppo_policy_loss(
        leaves["logp"],
        leaves["old_logp"],
        leaves["advantages"],
        inputs["mask"],
        is_weights=leaves["is_weights"],
        ref_logp=leaves["ref_logp"],
        kl_coef=0.1,
        entropy=leaves["entropy"],
        entropy_coef=0.1,
    )
    loss.backward()
    assert leaves["logp"].grad is not None and leaves["entropy"].grad is not None
    for key in ("old_logp", "advantages", "is_weights", "ref_logp"):
        assert leaves[key].grad is None, key
    assert all(not v.requires_grad for v in metrics.values())


def test_gradient_to_entropy_only_and_no_grad(backend):
    inputs = make_policy_inputs(B=3, T=10)
    ent = inputs["entropy"].clone().requires_grad_()
    args = (inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["mask"])
    loss, _ = ppo_policy_loss(*args, entropy=ent, entropy_coef=0.5, agg="seq-mean-token-sum", backend=backend)
    loss.backward()
    e64 = inputs["entropy"].double().requires_grad_()
    total, *_ = ref_policy(
        *(t.double() if t.is_floating_point() else t for t in args),
        entropy=e64,
        entropy_coef=0.5,
        agg="seq-mean-token-sum",
    )
    total.backward()
    assert_close(ent.grad, e64.grad, 1e-6, name="d entropy")
    with torch.no_grad():
        loss_ng, _ = ppo_policy_loss(
            *args, entropy=ent, entropy_coef=0.5, agg="seq-mean-token-sum", backend=backend
        )
    assert not loss_ng.requires_grad and torch.equal(loss_ng, loss.detach())


def test_metric_keys_follow_optional_inputs():
    inputs = make_policy_inputs(B=2, T=8)
    _, metrics = ppo_policy_loss(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["mask"])
    assert set(metrics) == {"pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_at_a_live_position_stays_visible(backend, loss_type):
    """Corrupt data at a live (mask 1) position shows up as NaN in the loss: no clamp or select may
    turn it into a plausible number. Every other token's gradient is the oracle's (GSPO: the row's
    shared ratio is NaN, so only the other rows); the corrupt token's own gradient is NaN for a NaN
    advantage (for a NaN log-ratio, torch.clamp's backward gives 0, so autograd through the oracle
    fixes nothing there; CISPO's -w A is NaN for every NaN input)."""
    for key in ("logp", "old_logp", "advantages"):
        inputs = make_policy_inputs(B=3, T=16, empty_row=False)
        inputs["mask"][0, 5] = True
        inputs[key][0, 5] = float("nan")
        logp = inputs["logp"].clone().requires_grad_()
        args = (inputs["old_logp"], inputs["advantages"], inputs["mask"])
        loss, metrics = ppo_policy_loss(logp, *args, loss_type=loss_type, backend=backend)
        loss.backward()
        assert torch.isnan(loss), key
        assert torch.isnan(metrics["pg_loss"]), key
        logp64 = inputs["logp"].double().requires_grad_()
        args64 = (t.double() if t.is_floating_point() else t for t in args)
        ref_policy(logp64, *args64, loss_type=loss_type)[0].backward()
        others = torch.ones_like(inputs["mask"])
        others[0, 5 if loss_type != "gspo" else slice(None)] = False
        assert_close(logp.grad[others], logp64.grad[others], 1e-6, name=f"d logp, NaN {key}")
        if loss_type == "cispo":
            assert torch.isnan(logp.grad[0, 5]), key
    assert torch.isnan(logp.grad[0, 5])  # advantages: -A d ratio is NaN
    inputs = make_policy_inputs(B=3, T=16, empty_row=False)
    inputs["mask"][2, 1] = True
    values = inputs["logp"].clone()
    values[2, 1] = float("nan")
    loss, _ = value_loss(values, inputs["old_logp"], inputs["advantages"], inputs["mask"], backend=backend)
    assert torch.isnan(loss)


def test_options_are_keyword_only():
    inputs = make_policy_inputs(B=2, T=6)
    args = [inputs[k] for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(TypeError):
        ppo_policy_loss(*args, 0.2)
    with pytest.raises(TypeError):
        value_loss(*args, 0.5)


# ----------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("agg", AGGS, ids=lambda a: f"{a[0]}-{a[1]}")
@pytest.mark.parametrize("clip", [0.0, 0.2, 0.5, 10.0])
def test_value_loss_cpu(clip, agg):
    check_value_loss("cpu", clip, agg)


@triton_only
@pytest.mark.parametrize("clip, agg", [(0.2, AGGS[0]), (0.5, AGGS[3]), (0.0, AGGS[5]), (0.5, AGGS[2])])
def test_value_loss_triton(backend, backend_device, clip, agg):
    check_value_loss(backend, clip, agg, device=backend_device)


def check_value_loss(backend, clip, agg, B=4, T=40, dtype=torch.float32, device=None):
    old = torch.randn(B, T, dtype=dtype, device=device)
    values = (old + 0.5 * torch.randn(B, T, dtype=dtype, device=device)).requires_grad_()
    returns = old + torch.randn(B, T, dtype=dtype, device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    mask[1] = False
    loss, metrics = value_loss(
        values, old, returns, mask, clip=clip, agg=agg[0], agg_scale=agg[1], backend=backend
    )
    (grad,) = torch.autograd.grad(loss, values)
    v64 = values.detach().double().requires_grad_()
    ref_loss, ref_clipfrac = ref_value(v64, old.double(), returns.double(), mask, clip, agg[0], agg[1])
    (ref_grad,) = torch.autograd.grad(ref_loss, v64)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_close(loss, ref_loss, rtol, name="loss")
    assert_close(metrics["vf_loss"], ref_loss, rtol, name="vf_loss")
    assert_close(metrics["vf_clipfrac"], ref_clipfrac, rtol, name="vf_clipfrac")
    assert_close(grad, ref_grad, rtol, name="d values")
    assert not any(v.requires_grad for v in metrics.values())


def test_value_loss_fp64_and_ties(backend):
    check_value_loss(backend, 0.3, AGGS[3], dtype=torch.float64)
    # values == old_values: vclip == v, a tie, not clipped.
    v = torch.randn(3, 9, requires_grad=True)
    loss, metrics = value_loss(v, v.detach(), torch.zeros(3, 9), torch.ones(3, 9), clip=0.0, backend=backend)
    loss.backward()
    assert float(metrics["vf_clipfrac"]) == 0.0
    assert_close(v.grad, v.detach() / 27, 1e-6, name="d values")


def test_value_loss_inside_clip_range_is_never_clipped(backend, backend_device):
    """old_values a rounding step away from values (old = v + 0.1 in fp32): old + (v - old) would round
    to a neighbour of v and count a tie as clipped; inside the clip range nothing is clipped."""
    d = backend_device
    v = torch.randn(4, 500, device=d).requires_grad_()
    returns = torch.randn(4, 500, device=d)
    loss, metrics = value_loss(
        v, v.detach() + 0.1, returns, torch.ones(4, 500, device=d), clip=0.5, backend=backend
    )
    loss.backward()
    assert float(metrics["vf_clipfrac"]) == 0.0
    assert_close(v.grad, (v.detach() - returns) / 2000, 1e-6, name="d values")


# ----------------------------------------------------------------------------- kl_penalty, agg_loss


@pytest.mark.parametrize("kl_estimator", KL_NAMES)
def test_kl_penalty(kl_estimator):
    logp = torch.randn(4, 50) * 3
    logp[0, :4] = torch.tensor([0.0, 25.0, -25.0, 1e-4])  # |d| > 20 and d ~ 0
    ref = torch.zeros(4, 50)
    ref[1] = -12.0  # k3 at x = -12 ... and y clamped at 10 for x > ~2.6
    lp = logp.clone().requires_grad_()
    out = kl_penalty(lp, ref, kl_estimator=kl_estimator)
    (grad,) = torch.autograd.grad(out.sum(), lp)
    lp64 = logp.double().requires_grad_()
    expected = ref_kl(lp64, ref.double(), kl_estimator)
    (ref_grad,) = torch.autograd.grad(expected.sum(), lp64)
    assert out.dtype == torch.float32
    assert_close(out, expected, 1e-6, name="kl")
    assert_close(grad, ref_grad, 1e-6, name="d kl")
    # the gradient reaches ref_logp too
    rp = ref.clone().requires_grad_()
    (d_ref,) = torch.autograd.grad(kl_penalty(logp, rp, kl_estimator=kl_estimator).sum(), rp)
    rp64 = ref.double().requires_grad_()
    (ref_d_ref,) = torch.autograd.grad(ref_kl(logp.double(), rp64, kl_estimator).sum(), rp64)
    assert_close(d_ref, ref_d_ref, 1e-6, name="d kl / d ref_logp")


def test_kl_penalty_defaults_to_k3():
    logp, ref = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.equal(kl_penalty(logp, ref), kl_penalty(logp, ref, kl_estimator="k3"))
    assert torch.equal(kl_penalty(logp, ref), kl_penalty(logp, ref, kl_estimator="low_var_kl"))
    assert_close(kl_penalty(logp, ref), ref_kl(logp.double(), ref.double()), 1e-6, name="default")
    assert kl_penalty(logp, ref, kl_estimator="k1").dtype == torch.float32
    assert kl_penalty(logp.double(), ref.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "agg, agg_scale",
    [(m, None) for m in AGG_MODES] + [("token-mean", 50.0), ("seq-mean-token-sum-norm", 50.0)],
)
def test_agg_loss(agg, agg_scale):
    L = torch.randn(6, 30, requires_grad=True)
    m = torch.rand(6, 30) > 0.4
    m[2] = False
    out = agg_loss(L, m, agg=agg, agg_scale=agg_scale)
    (grad,) = torch.autograd.grad(out, L)
    L64 = L.detach().double().requires_grad_()
    expected = ref_agg(L64, m, agg, agg_scale)
    (ref_grad,) = torch.autograd.grad(expected, L64)
    assert_close(out, expected, 1e-6, scale=ref_agg(L64.detach().abs(), m, agg, agg_scale), name="agg")
    assert_close(grad, ref_grad, 1e-6, name="d agg")
    # NaN/inf in the masked positions changes nothing, gradient included
    poisoned = L.detach().masked_fill(~m, float("nan")).requires_grad_()
    dirty = agg_loss(poisoned, m, agg=agg, agg_scale=agg_scale)
    (dirty_grad,) = torch.autograd.grad(dirty, poisoned)
    assert torch.equal(dirty, out.detach()) and torch.equal(dirty_grad, grad)


def test_agg_loss_worked_example():
    """docs/formulas.md, "Loss aggregation": S = [3, 4, 0], R = 2."""
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    expected = {"token-mean": 7 / 3, "seq-mean-token-sum": 3.5, "seq-mean-token-mean": 2.75}
    expected["seq-mean-token-sum-norm"] = 7 / 2 / 3
    for agg, value in expected.items():
        assert float(agg_loss(L, m, agg=agg)) == pytest.approx(value, rel=1e-6), agg
        assert float(ref_agg(L.double(), m, agg)) == pytest.approx(value, rel=1e-6), agg  # 1e-8 in n_b
    assert float(agg_loss(L, m)) == pytest.approx(7 / 3, rel=1e-6)  # default: token-mean


# ----------------------------------------------------------------------------- bad input


def _policy_call(**overrides):
    inputs = make_policy_inputs(B=2, T=6)
    args = {k: inputs[k] for k in ("logp", "old_logp", "advantages", "mask")}
    args.update(overrides)
    return lambda: ppo_policy_loss(**args)


BAD_POLICY = [
    ({"old_logp": torch.zeros(2, 5)}, "old_logp"),
    ({"advantages": torch.zeros(3, 6)}, "advantages"),
    ({"mask": torch.ones(2, 7)}, "mask"),
    ({"mask": torch.full((2, 6), 2.0)}, "mask must contain only 0 and 1"),
    ({"is_weights": torch.ones(6)}, "is_weights"),
    ({"ref_logp": torch.ones(2, 5)}, "ref_logp"),
    ({"entropy": torch.ones(1, 6)}, "entropy"),
    ({"logp": torch.zeros(12)}, "logp"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"clip_low": -0.1}, "clip_low"),
    ({"clip_high": -0.2}, "clip_high"),
    ({"clip_high": float("nan")}, "clip_high"),
    ({"agg": "mean"}, "agg must be one of token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean"),
    ({"agg_scale": -3.0}, "agg_scale"),
    ({"agg": "seq-mean-token-mean", "agg_scale": 3.0}, "agg_scale"),
    (
        {"kl_estimator": "full", "ref_logp": torch.zeros(2, 6)},
        "kl_estimator must be one of k1, kl, abs, k2, mse",
    ),
    ({"loss_type": "group"}, "loss_type must be one of ppo_clip, gspo, cispo"),
    ({"kl_coef": 0.1}, "ref_logp"),
    ({"entropy_coef": 0.1}, "entropy"),
    ({"backend": "cuda"}, "backend"),
]


@pytest.mark.parametrize("overrides, match", BAD_POLICY, ids=[m for _, m in BAD_POLICY])
def test_policy_loss_bad_input(overrides, match):
    with pytest.raises(ValueError, match=match):
        _policy_call(**overrides)()


@pytest.mark.parametrize("bad", [2.0, 0.5, -1.0, float("nan")])
def test_mask_values_checked_in_the_pass(backend, bad):
    inputs = make_policy_inputs(B=2, T=6)
    mask = inputs["mask"].float()
    mask[1, 3] = bad
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        ppo_policy_loss(inputs["logp"], inputs["old_logp"], inputs["advantages"], mask, backend=backend)
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        value_loss(inputs["logp"], inputs["old_logp"], inputs["advantages"], mask, backend=backend)


def test_bad_types():
    with pytest.raises(TypeError, match="logp"):
        _policy_call(logp=[[0.0]])()
    with pytest.raises(TypeError, match="old_logp"):
        _policy_call(old_logp=torch.zeros(2, 6, dtype=torch.int64))()
    with pytest.raises(TypeError, match="clip_low"):
        _policy_call(clip_low="0.2")()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"old_values": torch.zeros(3, 4)}, "old_values"),
        ({"returns": torch.zeros(2, 5)}, "returns"),
        ({"mask": torch.full((3, 5), 0.5)}, "mask"),
        ({"clip": -0.5}, "clip"),
        ({"agg": "sum"}, "agg must be one of token-mean, seq-mean-token-sum"),
    ],
)
def test_value_loss_bad_input(kwargs, match):
    args = {
        "values": torch.zeros(3, 5),
        "old_values": torch.zeros(3, 5),
        "returns": torch.zeros(3, 5),
        "mask": torch.ones(3, 5),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        value_loss(**args)


def test_kl_and_agg_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_estimator must be one of k1, kl, abs, k2, mse, k3, low_var_kl"):
        kl_penalty(x, x, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="agg must be one of token-mean"):
        agg_loss(x, torch.ones(2, 3), agg="seq-sum")
    with pytest.raises(ValueError, match="agg_scale applies to token-mean"):
        agg_loss(x, torch.ones(2, 3), agg="seq-mean-token-sum", agg_scale=4.0)
    with pytest.raises(ValueError, match="agg_scale must be a positive"):
        agg_loss(x, torch.ones(2, 3), agg_scale=0.0)
    with pytest.raises(ValueError, match="mask"):
        agg_loss(x, torch.full((2, 3), 3))
    # one name per concept: the old names are gone, and options are keyword-only
    with pytest.raises(TypeError, match="estimator"):
        kl_penalty(x, x, estimator="k1")
    with pytest.raises(TypeError, match="mode"):
        agg_loss(x, torch.ones(2, 3), mode="token-mean")
    with pytest.raises(TypeError, match="scale"):
        agg_loss(x, torch.ones(2, 3), scale=3.0)
    with pytest.raises(TypeError):
        kl_penalty(x, x, "k1")
    with pytest.raises(TypeError):
        agg_loss(x, torch.ones(2, 3), "token-mean")


def test_exported():
    for name in ("ppo_policy_loss", "value_loss", "kl_penalty", "agg_loss"):
        assert name in alignkit.__all__ and callable(getattr(alignkit, name))
    assert math.isfinite(float(agg_loss(torch.ones(1, 2), torch.ones(1, 2))))


# ----------------------------------------------------------------------------- kernel launch details


def test_kernel_scalars_are_exact_fp32_pieces():
    """Kernels take each scalar as three fp32 float arguments (no device tensor, no host-device
    sync); in fp64 they sum back to the value exactly."""
    import numpy as np

    from alignkit.kernels import scalars

    values = [0.0, -0.0, 0.1, 0.8, 1.2, 1.0 - 0.2, 1.0 + 0.28, 3.0, 1e-3, 0.05, -7.3, 1e20, 1e-25, math.inf]
    pieces = scalars.split_float(*values)
    assert len(pieces) == 3 * len(values)
    for i, x in enumerate(values):
        hi, mid, lo = pieces[3 * i : 3 * i + 3]
        assert all(float(np.float32(p)) == p for p in (hi, mid, lo))
        assert hi == float(np.float32(x))  # what an fp32 kernel uses
        assert (hi + mid) + lo == x


def test_value_loss_fp64_clip_bound_is_exact(backend, backend_device):
    """|v - old| == clip exactly in fp64 with a clip fp32 cannot represent: inside the clip range,
    so not clipped (a clip rounded to fp32 or to 48 bits would clip it)."""
    d = backend_device
    clip = 0.003  # fp32(clip) + fp32(clip - fp32(clip)) < clip: two fp32 pieces would clip
    v = torch.full((2, 8), clip, dtype=torch.float64, device=d, requires_grad=True)
    old = torch.zeros(2, 8, dtype=torch.float64, device=d)
    returns = torch.full((2, 8), 2 * clip, dtype=torch.float64, device=d)  # e2 > e1 if clipped
    loss, metrics = value_loss(v, old, returns, torch.ones(2, 8, device=d), clip=clip, backend=backend)
    loss.backward()
    assert float(metrics["vf_clipfrac"]) == 0.0
    assert_close(v.grad, (v.detach() - returns) / 16, 1e-15, name="d values")


@triton_only
def test_kernel_launches_are_device_guarded(monkeypatch, backend, backend_device):
    """Every ppo_loss launch runs inside device_guard(<an input>) (Triton launches on the current
    CUDA device, which need not be the inputs')."""
    import contextlib

    from alignkit.kernels import ppo_loss as kernels

    guarded = []

    def guard(tensor):
        guarded.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(kernels, "device_guard", guard)
    d = backend_device
    for loss_type in LOSS_TYPES:
        inputs = make_policy_inputs(B=2, T=9, device=d)
        run_policy(inputs, backend, {"loss_type": loss_type}, extras=("entropy",))
    assert len(guarded) == 2 + 3 + 2  # policy fwd + scale rows each; GSPO's seq_logratio
    assert all(dev == d for dev in guarded)
    guarded.clear()
    v = torch.randn(2, 5, device=d, requires_grad=True)
    zeros, ones = torch.zeros(2, 5, device=d), torch.ones(2, 5, device=d)
    loss, _ = value_loss(v, zeros, zeros, ones, backend=backend)
    loss.backward()
    assert len(guarded) == 2  # value fwd + scale rows
