"""alignkit.fused_linear_ppo_loss against a float64 oracle and against the unfused composition
``ppo_policy_loss(*fused_linear_logprobs(..., return_entropy=True))``, in value and gradients.

Oracle: logits = hidden @ W^T + b in float64, then the log-prob and policy-loss oracles of
tests/oracles.py; gradients are autograd through it. The CPU backend runs every schedule (single
pass with whole-row and part-row chunks, for ppo_clip and cispo; two phases for GSPO); Triton
(interpreted without CUDA, compiled on CUDA tensors with one) runs the two-phase schedule on a
representative subset.
"""

from __future__ import annotations

import pytest
import torch
from oracles import assert_close, ref_logprobs, ref_logprobs_truncated, ref_policy

from alignkit import PolicyLossConfig, fused_linear_logprobs, fused_linear_ppo_loss, ppo_policy_loss

# every CPU case through the torch twin and the numba kernels of the loss pass (conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_twin")

# A Triton-only test: the backend fixture's triton case (CUDA tensors when CUDA is present).
triton_only = pytest.mark.parametrize("backend", ["triton"], indirect=True)


def make_inputs(B=3, T=12, H=16, V=40, dtype=torch.float32, bias=True, ignore=True, device=None):
    hidden = torch.randn(B, T, H)
    weight = 0.3 * torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # a fully masked row
    if ignore:
        labels[0, :2] = -100  # prompt positions: ignored labels, masked
        mask[0, :2] = False
    logp_guess = -torch.rand(B, T) * 4 - 1.5
    inputs = {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": (0.1 * torch.randn(V)).to(dtype) if bias else None,
        "labels": labels,
        "old_logp": logp_guess + 0.5 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "mask": mask,
        "ref_logp": logp_guess + 0.5 * torch.randn(B, T),
        "is_weights": 2 * torch.rand(B, T),
    }
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def leaves(inputs, dtype=None):
    out = {}
    for key in ("hidden", "weight", "bias"):
        t = inputs[key]
        out[key] = None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
    return out


def oracle(inputs, temperature, opts):
    p = leaves(inputs, torch.float64)
    logits = p["hidden"] @ p["weight"].T
    if p["bias"] is not None:
        logits = logits + p["bias"]
    if inputs.get("logit_floor") is None:
        logp, ent = ref_logprobs(logits, inputs["labels"], temperature)
    else:  # a masked position is not scored, so its floor is never read
        labels = inputs["labels"].masked_fill(~inputs["mask"], -100)
        logp, ent = ref_logprobs_truncated(logits, labels, inputs["logit_floor"], temperature)
    kw = {k: inputs[k].double() for k in ("is_weights", "ref_logp") if k in opts.get("_extras", ())}
    opts = {k: v for k, v in opts.items() if not k.startswith("_")}
    total, metrics, magnitude = ref_policy(
        logp,
        inputs["old_logp"].double(),
        inputs["advantages"].double(),
        inputs["mask"],
        entropy=ent,
        **kw,
        **opts,
    )
    params = [t for t in p.values() if t is not None]
    return total, metrics, magnitude, torch.autograd.grad(total, params)


def run_fused(inputs, backend, temperature, opts, chunk_size=None):
    p = leaves(inputs)
    kw = {k: inputs[k] for k in ("is_weights", "ref_logp") if k in opts.get("_extras", ())}
    opts = {k: v for k, v in opts.items() if not k.startswith("_")}
    loss, metrics = fused_linear_ppo_loss(
        p["hidden"],
        p["weight"],
        inputs["labels"],
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        bias=p["bias"],
        temperature=temperature,
        chunk_size=chunk_size,
        logit_floor=inputs.get("logit_floor"),
        backend=backend,
        **kw,
        **opts,
    )
    params = [t for t in p.values() if t is not None]
    return loss, metrics, torch.autograd.grad(loss, params)


def run_composed(inputs, backend, temperature, opts):
    p = leaves(inputs)
    kw = {k: inputs[k] for k in ("is_weights", "ref_logp") if k in opts.get("_extras", ())}
    opts = {k: v for k, v in opts.items() if not k.startswith("_")}
    logp, ent = fused_linear_logprobs(
        p["hidden"],
        p["weight"],
        inputs["labels"],
        bias=p["bias"],
        temperature=temperature,
        return_entropy=True,
        logit_floor=inputs.get("logit_floor"),
        backend=backend,
    )
    loss, metrics = ppo_policy_loss(
        logp,
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        entropy=ent,
        backend=backend,
        **kw,
        **opts,
    )
    params = [t for t in p.values() if t is not None]
    return loss, metrics, torch.autograd.grad(loss, params)


def check(inputs, backend, temperature, opts, chunk_size=None, rtol_oracle=1e-5):
    loss, metrics, grads = run_fused(inputs, backend, temperature, opts, chunk_size)
    total, ref_metrics, magnitude, ref_grads = oracle(inputs, temperature, opts)
    assert_close(loss, total, rtol_oracle, scale=magnitude, name="loss vs oracle")
    assert set(metrics) == set(ref_metrics)
    for key in metrics:
        assert not metrics[key].requires_grad
        assert_close(metrics[key], ref_metrics[key], rtol_oracle, scale=max(float(magnitude), 1e-3), name=key)
    for g, rg, name in zip(grads, ref_grads, ("d hidden", "d weight", "d bias"), strict=False):
        assert_close(g, rg, rtol_oracle, name=name + " vs oracle")
    c_loss, c_metrics, c_grads = run_composed(inputs, backend, temperature, opts)
    assert_close(loss, c_loss, 1e-6, scale=magnitude, name="loss vs composition")
    for key in metrics:
        assert_close(metrics[key], c_metrics[key], 1e-6, scale=max(float(magnitude), 1e-3), name=key)
    for g, cg, name in zip(grads, c_grads, ("d hidden", "d weight", "d bias"), strict=False):
        assert g.dtype == cg.dtype
        assert_close(g, cg, 1e-5, name=name + " vs composition")
    return loss, grads


OPTIONS = [
    {"agg": "token-mean"},
    {
        "agg": "seq-mean-token-mean",
        "kl_coef": 0.1,
        "kl_estimator": "low_var_kl",
        "entropy_coef": 0.01,
        "_extras": ("ref_logp",),
    },
    {"agg": "seq-mean-token-sum", "clip_high": 0.28, "dual_clip": None, "_extras": ("is_weights",)},
    {
        "agg": "seq-mean-token-sum-norm",
        "agg_scale": 20.0,
        "kl_coef": 0.2,
        "kl_estimator": "k2",
        "entropy_coef": -0.02,
        "_extras": ("ref_logp", "is_weights"),
    },
    {
        "agg": "token-mean",
        "loss_type": "gspo",
        "kl_coef": 0.05,
        "kl_estimator": "abs",
        "_extras": ("ref_logp",),
    },
    {"agg": "seq-mean-token-mean", "loss_type": "gspo", "entropy_coef": 0.01},
    {
        "agg": "seq-mean-token-sum",
        "loss_type": "cispo",
        "clip_high": 0.28,
        "kl_coef": 0.1,
        "kl_estimator": "k3",
        "entropy_coef": 0.01,
        "_extras": ("ref_logp", "is_weights"),
    },
    {"agg": "token-mean", "loss_type": "cispo", "dual_clip": 3.0},
]


def _opt_id(o):
    return f"{o['agg']}-{o.get('loss_type', 'ppo_clip')}-{o.get('kl_estimator', 'nokl')}"


# chunk sizes: default (one block), 5 < T (pieces of one row), 25 (groups of two whole rows)
@pytest.mark.parametrize("chunk_size", [None, 5, 25])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("opts", OPTIONS, ids=_opt_id)
def test_fused_matches_oracle_and_composition_cpu(opts, temperature, chunk_size):
    check(make_inputs(bias=temperature == 1.0), "cpu", temperature, opts, chunk_size)


@triton_only
@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[3], OPTIONS[4], OPTIONS[6]], ids=_opt_id)
def test_fused_matches_oracle_and_composition_triton(backend, backend_device, opts):
    check(make_inputs(B=2, T=8, H=16, V=48, device=backend_device), backend, 0.7, opts)


@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[6]], ids=_opt_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_dtypes_cpu(dtype, opts):
    inputs = make_inputs(dtype=dtype)
    if dtype == torch.float64:
        check(inputs, "cpu", 1.0, opts, chunk_size=7, rtol_oracle=1e-10)
        return
    loss, _, grads = run_fused(inputs, "cpu", 1.0, opts, chunk_size=7)
    c_loss, _, c_grads = run_composed(inputs, "cpu", 1.0, opts)
    assert loss.dtype == torch.float32
    assert_close(loss, c_loss, 1e-5, name="loss")
    for g, cg, p in zip(grads, c_grads, ("hidden", "weight", "bias"), strict=True):
        assert g.dtype == torch.bfloat16, p
        assert_close(g, cg, 2e-2, name=p)


def test_grad_output_scaling_and_single_backward():
    inputs = make_inputs()
    p = leaves(inputs)
    args = (
        p["hidden"],
        p["weight"],
        inputs["labels"],
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
    )
    loss, _ = fused_linear_ppo_loss(*args, bias=p["bias"])
    (3.0 * loss).backward(retain_graph=True)
    _, _, grads = run_fused(inputs, "cpu", 1.0, {})
    for t, g in zip((p["hidden"], p["weight"], p["bias"]), grads, strict=True):
        assert_close(t.grad, 3.0 * g, 1e-6)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_grad_and_frozen_weight():
    inputs = make_inputs(bias=False)
    with torch.no_grad():
        loss, _ = fused_linear_ppo_loss(
            inputs["hidden"],
            inputs["weight"],
            inputs["labels"],
            inputs["old_logp"],
            inputs["advantages"],
            inputs["mask"],
        )
    total, *_ = oracle(inputs, 1.0, {})
    assert not loss.requires_grad
    assert_close(loss, total, 1e-5)
    hidden = inputs["hidden"].clone().requires_grad_()
    loss, _ = fused_linear_ppo_loss(
        hidden,
        inputs["weight"],
        inputs["labels"],
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        chunk_size=5,
    )
    loss.backward()
    assert_close(hidden.grad, oracle(inputs, 1.0, {})[3][0], 1e-5)


def _fused_outputs(inputs, backend, **kwargs):
    p = leaves(inputs)
    loss, metrics = fused_linear_ppo_loss(
        p["hidden"], p["weight"], inputs["labels"], inputs["old_logp"], inputs["advantages"], inputs["mask"],
        bias=p["bias"], ref_logp=inputs["ref_logp"], backend=backend, **kwargs,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, [p[k].grad for k in ("hidden", "weight", "bias")]


def _assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    for x, y in zip(a[2], b[2], strict=True):
        assert torch.equal(x, y)


CONFIG = {"clip_high": 0.28, "dual_clip": None, "agg": "seq-mean-token-mean", "kl_coef": 0.1,
          "kl_estimator": "low_var_kl", "entropy_coef": 0.01}  # fmt: skip


def test_config_equals_keywords_and_keywords_override(backend, backend_device):
    inputs = make_inputs(B=2, T=8, V=48, device=backend_device)
    by_config = _fused_outputs(inputs, backend, config=PolicyLossConfig(**CONFIG))
    _assert_same(by_config, _fused_outputs(inputs, backend, **CONFIG))
    overrides = {"agg": "token-mean", "kl_estimator": "k2", "dual_clip": 3.0}
    got = _fused_outputs(inputs, backend, config=PolicyLossConfig(**CONFIG), **overrides)
    _assert_same(got, _fused_outputs(inputs, backend, **{**CONFIG, **overrides}))
    assert not torch.equal(got[0], by_config[0])
    with pytest.raises(ValueError, match=r"^kl_estimator must be one of"):
        _fused_outputs(inputs, backend, config=PolicyLossConfig(**CONFIG), kl_estimator="full")
    with pytest.raises(TypeError, match="config must be an alignkit.PolicyLossConfig"):
        _fused_outputs(inputs, backend, config=CONFIG)


# The Triton interpreter computes with NumPy, which warns on the NaN/inf arithmetic of rows that are
# selected away afterwards (the compiled kernels compute the same dead lanes silently).
@pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero|All-NaN slice) encountered:RuntimeWarning"
)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_garbage_hidden_at_masked_positions_does_not_leak(backend, backend_device, fill):
    """Hidden states at masked / ignored positions (padding) may hold NaN/inf: the loss, the metrics
    and every gradient (d hidden at live positions, d weight, d bias) are those of clean inputs."""
    clean = make_inputs(B=2, T=8, V=48, device=backend_device)
    live = clean["mask"] & (clean["labels"] != -100)
    poisoned = dict(clean, hidden=clean["hidden"].masked_fill(~live[..., None], fill))
    # CPU: the single pass (one block, part-row blocks) and GSPO's two phases; Triton: two phases.
    schedules = ({}, {"chunk_size": 3}, {"loss_type": "gspo"}) if backend == "cpu" else ({"chunk_size": 3},)
    schedules += ({"loss_type": "cispo", "chunk_size": 3},)
    for schedule in schedules:
        opts = {"kl_coef": 0.1, "entropy_coef": 0.01, **schedule}
        a, b = _fused_outputs(clean, backend, **opts), _fused_outputs(poisoned, backend, **opts)
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        assert torch.equal(a[2][0][live], b[2][0][live]), "d hidden"
        assert torch.equal(a[2][1], b[2][1]) and torch.equal(a[2][2], b[2][2]), "d weight / d bias"
        assert torch.isfinite(b[2][1]).all() and torch.isfinite(b[2][2]).all()


BAD = [
    ({"weight": torch.zeros(40, 15)}, ValueError, "weight"),
    ({"labels": torch.zeros(3, 11, dtype=torch.int64)}, ValueError, "labels"),
    ({"labels": torch.full((3, 12), 40)}, ValueError, "labels must lie in"),
    ({"old_logp": torch.zeros(3, 13)}, ValueError, "old_logp"),
    ({"mask": torch.full((3, 12), 0.5)}, ValueError, "mask"),
    ({"bias": torch.zeros(41)}, ValueError, "bias"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"agg": "sum"}, ValueError, "agg must be one of token-mean"),
    ({"dual_clip": 1.0}, ValueError, "dual_clip"),
    ({"kl_coef": 0.1}, ValueError, "ref_logp"),
    ({"hidden": torch.zeros(36, 16)}, ValueError, "hidden"),
    ({"labels": torch.zeros(3, 12)}, TypeError, "labels"),
]


@pytest.mark.parametrize("override, exc, match", BAD, ids=[b[2] for b in BAD])
def test_bad_input(override, exc, match):
    inputs = make_inputs(bias=False)
    args = {k: inputs[k] for k in ("hidden", "weight", "labels", "old_logp", "advantages", "mask")}
    args.update(override)
    with pytest.raises(exc, match=match):
        fused_linear_ppo_loss(**args)


# ----------------------------------------------------------------------------- logit_floor


def with_floor(inputs, temperature, k=5, garbage=float("nan")):
    """``inputs`` plus a top-k logit floor (the rollout's, docs/formulas.md "Truncated sampling and
    the logit floor"): every third position and the whole last row -inf (no truncation), masked
    positions ``garbage``, live labels drawn from the kept set as a sampler's are."""
    logits = inputs["hidden"].double() @ inputs["weight"].double().T
    if inputs["bias"] is not None:
        logits = logits + inputs["bias"].double()
    z = (logits / temperature).cpu()
    top = z.topk(k + 1, dim=-1).values
    floor = (top[..., k - 1] + top[..., k]) / 2  # (B, T)
    floor.view(-1)[::3] = -torch.inf
    floor[-1] = -torch.inf
    kept = (z >= floor[..., None]).double().reshape(-1, z.shape[-1])
    sampled = torch.multinomial(kept, 1).view(floor.shape)
    labels = inputs["labels"].cpu()
    labels = torch.where(labels == -100, labels, sampled)
    floor = floor.masked_fill(~inputs["mask"].cpu(), garbage).float()
    device = inputs["hidden"].device
    return dict(inputs, labels=labels.to(device), logit_floor=floor.to(device))


FLOOR_OPTIONS = [OPTIONS[1], OPTIONS[3], OPTIONS[4], OPTIONS[6]]


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("opts", FLOOR_OPTIONS, ids=_opt_id)
def test_floor_matches_oracle_and_composition_cpu(opts, chunk_size):
    check(with_floor(make_inputs(), 0.7), "cpu", 0.7, opts, chunk_size)


@triton_only
@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[4]], ids=_opt_id)
def test_floor_matches_oracle_and_composition_triton(backend, backend_device, opts):
    check(with_floor(make_inputs(B=2, T=8, H=16, V=48, device=backend_device), 0.7), backend, 0.7, opts)


@pytest.mark.parametrize(("B", "T", "V", "k"), [(2, 1, 7, 1), (3, 7, 257, 11)])
def test_floor_odd_shapes_and_fp64(B, T, V, k):
    inputs = make_inputs(B=B, T=T, V=V, dtype=torch.float64, ignore=False)
    inputs["mask"][0, 0] = True  # at least one live token
    check(with_floor(inputs, 1.3, k=k), "cpu", 1.3, OPTIONS[1], chunk_size=3, rtol_oracle=1e-10)


@pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero|All-NaN slice) encountered:RuntimeWarning"
)
def test_floor_at_masked_positions_is_never_read(backend, backend_device):
    """A NaN or +inf floor (which would drop the whole vocabulary) where the mask is 0 changes
    nothing: loss, metrics and every gradient equal those with a -inf floor there."""
    inputs = make_inputs(B=2, T=8, V=48, device=backend_device)
    schedules = ({}, {"chunk_size": 3}, {"loss_type": "gspo"}) if backend == "cpu" else ({"chunk_size": 3},)
    for schedule in schedules:
        opts = {"kl_coef": 0.1, "entropy_coef": 0.01, **schedule}
        clean = with_floor(inputs, 1.0, garbage=-torch.inf)
        expected = _fused_outputs(clean, backend, **opts)
        assert torch.isfinite(expected[0])
        masked = ~clean["mask"]
        for garbage in (float("nan"), float("inf")):
            poisoned = dict(clean, logit_floor=clean["logit_floor"].masked_fill(masked, garbage))
            _assert_same(expected, _fused_outputs(poisoned, backend, **opts))


def test_floor_of_minus_inf_equals_no_floor(backend, backend_device):
    inputs = make_inputs(B=2, T=8, V=48, device=backend_device)
    opts = {"kl_coef": 0.1, "entropy_coef": 0.01, "agg": "seq-mean-token-mean"}
    plain = _fused_outputs(inputs, backend, **opts)
    floor = torch.full(inputs["labels"].shape, -torch.inf, device=backend_device)
    floored = _fused_outputs(inputs, backend, logit_floor=floor, **opts)
    assert_close(floored[0], plain[0], 1e-7)
    for a, b in zip(floored[2], plain[2], strict=True):
        assert_close(a, b, 1e-7)


def test_floor_truncates_the_entropy_and_gets_no_gradient():
    """The entropy metric is that of the renormalised truncated distribution (what
    fused_linear_logprobs(return_entropy=True, logit_floor=) returns), and the floor is a constant."""
    inputs = with_floor(make_inputs(), 1.0, k=2)
    floor = inputs["logit_floor"].clone().requires_grad_()
    p = leaves(inputs)
    loss, metrics = fused_linear_ppo_loss(
        p["hidden"], p["weight"], inputs["labels"], inputs["old_logp"], inputs["advantages"], inputs["mask"],
        bias=p["bias"], logit_floor=floor, agg="token-mean",
    )  # fmt: skip
    loss.backward()
    assert floor.grad is None
    _, ent = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], return_entropy=True,
        logit_floor=inputs["logit_floor"],
    )  # fmt: skip
    live = inputs["mask"]
    assert_close(metrics["entropy"], ent[live].double().mean(), 1e-6)
    _, full_ent = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], return_entropy=True
    )
    assert float(ent[live].mean()) < float(full_ent[live].mean())  # top-2 of 40: far lower entropy


BAD_FLOORS = [
    (torch.zeros(3, 11), ValueError, "logit_floor must have the shape of labels"),
    (torch.zeros(3, 12, dtype=torch.int64), TypeError, "logit_floor must be a floating-point tensor"),
    ([[0.0] * 12] * 3, TypeError, "logit_floor must be a torch.Tensor"),
]


@pytest.mark.parametrize("floor, exc, match", BAD_FLOORS, ids=["shape", "dtype", "list"])
def test_bad_floor_names_the_argument(floor, exc, match):
    inputs = make_inputs(bias=False)
    args = [inputs[k] for k in ("hidden", "weight", "labels", "old_logp", "advantages", "mask")]
    with pytest.raises(exc, match=match):
        fused_linear_ppo_loss(*args, logit_floor=floor)
