"""alignkit.fused_linear_ppo_loss against a float64 oracle and against the unfused composition
``ppo_policy_loss(*fused_linear_logprobs(..., return_entropy=True))``, in value and gradients.

Oracle: logits = hidden @ W^T + b in float64, log_softmax, then the policy-loss oracle of
tests/test_losses.py; gradients are autograd through it. The CPU backend runs every schedule
(single pass with whole-row and part-row chunks, two phases for GSPO); Triton (interpreted without
CUDA) runs the two-phase schedule on a representative subset.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from alignkit import fused_linear_logprobs, fused_linear_ppo_loss, ppo_policy_loss

_spec = importlib.util.spec_from_file_location(
    "_loss_oracle", pathlib.Path(__file__).with_name("test_losses.py")
)
_oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_oracle)
ref_policy, assert_close = _oracle.ref_policy, _oracle.assert_close


def make_inputs(B=3, T=12, H=16, V=40, dtype=torch.float32, bias=True, ignore=True):
    hidden = torch.randn(B, T, H)
    weight = 0.3 * torch.randn(V, H)
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # a fully masked row
    if ignore:
        labels[0, :2] = -100  # prompt positions: ignored labels, masked
        mask[0, :2] = False
    logp_guess = -torch.rand(B, T) * 4 - 1.5
    return {
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
    logsm = torch.log_softmax(logits / temperature, dim=-1)
    valid = inputs["labels"] != -100
    logp = logsm.gather(-1, inputs["labels"].clamp(min=0)[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    logp, ent = torch.where(valid, logp, zero), torch.where(valid, ent, zero)
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
        "ratio_level": "sequence",
        "kl_coef": 0.05,
        "kl_estimator": "abs",
        "_extras": ("ref_logp",),
    },
    {"agg": "seq-mean-token-mean", "ratio_level": "sequence", "entropy_coef": 0.01},
]


def _opt_id(o):
    return f"{o['agg']}-{o.get('ratio_level', 'token')}-{o.get('kl_estimator', 'nokl')}"


# chunk sizes: default (one block), 5 < T (pieces of one row), 25 (groups of two whole rows)
@pytest.mark.parametrize("chunk_size", [None, 5, 25])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("opts", OPTIONS, ids=_opt_id)
def test_fused_matches_oracle_and_composition_cpu(opts, temperature, chunk_size):
    check(make_inputs(bias=temperature == 1.0), "cpu", temperature, opts, chunk_size)


@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[3], OPTIONS[4]], ids=_opt_id)
def test_fused_matches_oracle_and_composition_triton(opts):
    check(make_inputs(B=2, T=8, H=16, V=48), "triton", 0.7, opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_dtypes_cpu(dtype):
    inputs = make_inputs(dtype=dtype)
    opts = OPTIONS[1]
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
