"""Bad input, tried the way a hostile user would, class by class over every public op.

1. Garbage at masked / ignored positions (NaN, inf: padding may hold anything) never reaches a live
   output or any gradient.
2. NaN at a live position stays visible in the result (divergence is never hidden).
3. Degenerate inputs (empty masks, T = 0, huge values, NaN ids, expanded views) give a clear error
   or a correct finite result, never a silent NaN.
4. Wrong arguments (None, meta tensors, bools, wrong shapes) raise TypeError / ValueError naming
   the argument.
Each case runs on both backends (the Triton one under the interpreter on CPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import pytest
import torch

import alignkit

B, T, H, V = 3, 11, 8, 37
GARBAGE = (float("nan"), float("inf"), -float("inf"))


def _mask() -> torch.Tensor:
    m = torch.ones(B, T)
    m[0, :3] = 0  # prompt
    m[1, 5:8] = 0  # interior observation span
    m[2, 7:] = 0  # right padding
    return m


def _poison(x: torch.Tensor, dead: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(dead, torch.full_like(x, value), x)


@contextlib.contextmanager
def _quiet_interpreter(backend: str, device: torch.device):
    """The Triton interpreter runs kernels in NumPy, which warns on NaN/inf arithmetic (a compiled
    kernel does not): those warnings are expected here, where NaN/inf is the input."""
    if backend != "triton" or device.type == "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ----------------------------------------------------------------------------- class 1: no leaks

# Each case: (inputs builder, op) where the op returns what must agree on live positions. The
# builder returns (tensors, dead) with dead the positions that may hold garbage; `live` selects
# what is compared in each output (None: the whole output, e.g. a scalar loss).


def _padded_inputs(d):
    m = _mask().to(d)
    return {"rewards": torch.randn(B, T, device=d), "values": torch.randn(B, T, device=d)}, m


LEAK_CASES: dict[str, Callable] = {}


def _leak_case(name):
    def register(fn):
        LEAK_CASES[name] = fn
        return fn

    return register


@_leak_case("gae")
def _gae(backend, d, value):
    x, m = _padded_inputs(d)
    dead = m == 0
    r, v = (_poison(x[k], dead, value) for k in ("rewards", "values"))
    adv, ret = alignkit.gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
    return [adv.masked_fill(dead, 0), ret.masked_fill(dead, 0)], (x, m)


@_leak_case("gae-whiten")
def _gae_whiten(backend, d, value):
    x, m = _padded_inputs(d)
    dead = m == 0
    r, v = (_poison(x[k], dead, value) for k in ("rewards", "values"))
    adv, ret = alignkit.gae(r, v, m, gamma=1.0, lam=0.95, whiten=True, backend=backend)
    return [adv.masked_fill(dead, 0), ret.masked_fill(dead, 0)], (x, m)


@_leak_case("gae_packed")
def _gae_packed(backend, d, value):
    x, m = _padded_inputs(d)
    dead = m == 0
    r, v = (_poison(x[k], dead, value).reshape(-1) for k in ("rewards", "values"))
    cu = torch.tensor([0, T, 2 * T, 3 * T])
    adv, ret = alignkit.gae_packed(r, v, m.reshape(-1), cu, gamma=0.9, lam=0.8, backend=backend)
    flat_dead = dead.reshape(-1)
    return [adv.masked_fill(flat_dead, 0), ret.masked_fill(flat_dead, 0)], (x, m)


@_leak_case("discounted_returns")
def _returns(backend, d, value):
    x, m = _padded_inputs(d)
    dead = m == 0
    out = alignkit.discounted_returns(_poison(x["rewards"], dead, value), m, gamma=0.9, backend=backend)
    return [out.masked_fill(dead, 0)], (x, m)


@_leak_case("discounted_returns_packed")
def _returns_packed(backend, d, value):
    x, m = _padded_inputs(d)
    dead = (m == 0).reshape(-1)
    r = _poison(x["rewards"].reshape(-1), dead, value)
    out = alignkit.discounted_returns_packed(r, m.reshape(-1), [0, 4, T, 3 * T], gamma=0.9, backend=backend)
    return [out.masked_fill(dead, 0)], (x, m)


@_leak_case("masked_statistics")
def _statistics(backend, d, value):
    x, m = _padded_inputs(d)
    dead = m == 0
    y = _poison(x["rewards"], dead, value).requires_grad_()
    outs = [
        alignkit.masked_mean(y, m),
        alignkit.masked_mean(y, m, dim=1),
        alignkit.masked_var(y, m),
        alignkit.masked_whiten(y, m).masked_fill(dead, 0),
        alignkit.agg_loss(y, m, agg="seq-mean-token-mean"),
    ]
    (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), y)
    return [*outs, grad.masked_fill(dead, 0)], (x, m)


@_leak_case("group_advantages")
def _groups(backend, d, value):
    scores = torch.randn(B, device=d)
    m = _mask().to(d)
    out = alignkit.group_advantages(scores, [0, 0, 1], method="reinforce++-baseline", mask=m)
    return [out], (scores, m)


def _policy_inputs(d):
    m = _mask().to(d)
    logp = -torch.rand(B, T, device=d) * 2
    return {
        "logp": logp,
        "old_logp": logp + 0.1 * torch.randn(B, T, device=d),
        "advantages": torch.randn(B, T, device=d),
        "is_weights": torch.rand(B, T, device=d) + 0.5,
        "ref_logp": logp + 0.1 * torch.randn(B, T, device=d),
        "entropy": torch.rand(B, T, device=d),
    }, m


@_leak_case("ppo_policy_loss")
def _policy(backend, d, value):
    x, m = _policy_inputs(d)
    dead = m == 0
    p = {k: _poison(t, dead, value) for k, t in x.items()}
    logp = p["logp"].requires_grad_()
    ent = p["entropy"].requires_grad_()
    loss, metrics = alignkit.ppo_policy_loss(
        logp, p["old_logp"], p["advantages"], m, is_weights=p["is_weights"], ref_logp=p["ref_logp"],
        entropy=ent, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", backend=backend,
    )  # fmt: skip
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent))
    return [loss, *metrics.values(), g_logp, g_ent], (x, m)


@_leak_case("ppo_policy_loss-gspo")
def _gspo(backend, d, value):
    x, m = _policy_inputs(d)
    dead = m == 0
    p = {k: _poison(t, dead, value) for k, t in x.items()}
    logp = p["logp"].requires_grad_()
    loss, metrics = alignkit.ppo_policy_loss(
        logp, p["old_logp"], p["advantages"], m, loss_type="gspo", backend=backend
    )
    (g_logp,) = torch.autograd.grad(loss, logp)
    return [loss, *metrics.values(), g_logp], (x, m)


@_leak_case("value_loss")
def _value(backend, d, value):
    m = _mask().to(d)
    dead = m == 0
    v = _poison(torch.randn(B, T, device=d), dead, value).requires_grad_()
    old, ret = (_poison(torch.randn(B, T, device=d), dead, value) for _ in range(2))
    loss, metrics = alignkit.value_loss(v, old, ret, m, clip=0.2, backend=backend)
    (g,) = torch.autograd.grad(loss, v)
    return [loss, *metrics.values(), g], (v, m)


@_leak_case("token_logprobs")
def _token_logprobs(backend, d, value):
    n = 7
    logits = torch.randn(n, V, device=d)
    labels = torch.randint(0, V, (n,), device=d)
    labels[[1, 4]] = -100
    logits[[1, 4]] = value
    logits.requires_grad_()
    logp, ent = alignkit.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    (g,) = torch.autograd.grad(logp.sum() + ent.sum(), logits)
    return [logp, ent, g], (logits, labels)


def _fused_inputs(d, value):
    n = 9
    hidden = torch.randn(n, H, device=d)
    weight = torch.randn(V, H, device=d) / H**0.5
    labels = torch.randint(0, V, (n,), device=d)
    labels[[0, 5]] = -100
    hidden[[0, 5]] = value
    return hidden.requires_grad_(), weight.requires_grad_(), labels


@_leak_case("fused_linear_logprobs")
def _fused_logprobs(backend, d, value):
    hidden, weight, labels = _fused_inputs(d, value)
    logp, ent = alignkit.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    g_h, g_w = torch.autograd.grad(logp.sum() - 0.3 * ent.sum(), (hidden, weight))
    return [logp, ent, g_h, g_w], (hidden, labels)


@_leak_case("fused_linear_ppo_loss")
def _fused_ppo(backend, d, value):
    x, m = _policy_inputs(d)
    dead = m == 0
    hidden = _poison(torch.randn(B, T, H, device=d), dead[..., None], value).requires_grad_()
    weight = (torch.randn(V, H, device=d) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=d)
    loss, metrics = alignkit.fused_linear_ppo_loss(
        hidden, weight, labels, _poison(x["old_logp"], dead, value), _poison(x["advantages"], dead, value), m,
        entropy_coef=0.01, logit_floor=_poison(torch.full((B, T), -torch.inf, device=d), dead, value),
        backend=backend,
    )  # fmt: skip
    loss.backward()
    return [loss, *metrics.values(), hidden.grad.masked_fill(dead[..., None], 0), weight.grad], (x, m)


@pytest.mark.parametrize("value", GARBAGE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", sorted(LEAK_CASES))
def test_garbage_at_masked_positions_never_leaks(case, value, backend, backend_device):
    seed = torch.initial_seed()
    torch.manual_seed(seed)
    clean, _ = LEAK_CASES[case](backend, backend_device, 0.0)
    torch.manual_seed(seed)
    with _quiet_interpreter(backend, backend_device):
        dirty, _ = LEAK_CASES[case](backend, backend_device, value)
    for i, (a, b) in enumerate(zip(clean, dirty, strict=True)):
        assert torch.isfinite(b).all(), f"{case}: output {i} holds NaN/inf from masked positions"
        torch.testing.assert_close(b, a, msg=lambda s, i=i: f"{case}: output {i} changed: {s}")


# ----------------------------------------------------------------------------- class 2: NaN stays visible


def _live_nan_outputs(case: str, backend: str, d) -> list[torch.Tensor]:
    nan = float("nan")
    if case == "gae":
        r = torch.randn(B, T, device=d)
        r[2, 4] = nan
        adv, _ = alignkit.gae(r, torch.randn(B, T, device=d), _mask().to(d), backend=backend)
        return [adv[2, 4]]
    if case == "discounted_returns":
        r = torch.randn(B, T, device=d)
        r[2, 4] = nan
        return [alignkit.discounted_returns(r, _mask().to(d), backend=backend)[2, 0]]
    if case in ("ppo_policy_loss", "ppo_policy_loss-k3"):
        x, m = _policy_inputs(d)
        x["logp"][2, 4] = nan
        kl = {"ref_logp": x["ref_logp"], "kl_coef": 0.1} if case.endswith("k3") else {}
        loss, metrics = alignkit.ppo_policy_loss(
            x["logp"], x["old_logp"], x["advantages"], m, backend=backend, **kl
        )
        return [loss, metrics["pg_loss"]]
    if case == "value_loss":
        v = torch.randn(B, T, device=d)
        v[1, 2] = nan
        loss, _ = alignkit.value_loss(
            v, v.clone(), torch.randn(B, T, device=d), _mask().to(d), backend=backend
        )
        return [loss]
    if case == "token_logprobs":
        logits = torch.randn(4, V, device=d)
        logits[2, 3] = nan
        return [alignkit.token_logprobs(logits, torch.tensor([1, 2, 3, 4], device=d), backend=backend)[2]]
    hidden, weight, labels = _fused_inputs(d, 0.0)
    hidden = hidden.detach().clone()
    hidden[3, 1] = nan
    return [alignkit.fused_linear_logprobs(hidden, weight.detach(), labels, backend=backend)[3]]


@pytest.mark.parametrize(
    "case",
    ["gae", "discounted_returns", "ppo_policy_loss", "ppo_policy_loss-k3", "value_loss", "token_logprobs",
     "fused_linear_logprobs"],
)  # fmt: skip
def test_nan_at_a_live_position_stays_visible(case, backend, backend_device):
    with _quiet_interpreter(backend, backend_device):
        outputs = _live_nan_outputs(case, backend, backend_device)
    for out in outputs:
        assert torch.isnan(out).all(), f"{case}: a NaN input at a live position gave {out}"


# ----------------------------------------------------------------------------- class 3: degenerate inputs


@pytest.mark.parametrize(
    "call",
    [
        lambda: alignkit.masked_mean(torch.randn(3, 4), torch.zeros(3, 4)),
        lambda: alignkit.masked_mean(
            torch.randn(3, 4), torch.tensor([[1.0] * 4, [0.0] * 4, [1.0] * 4]), dim=1
        ),
        lambda: alignkit.masked_var(torch.randn(3, 4), torch.zeros(3, 4)),
        lambda: alignkit.masked_whiten(torch.randn(3, 4), torch.eye(1, 12).reshape(3, 4)),
        lambda: alignkit.gae(torch.randn(2, 5), torch.randn(2, 5), torch.zeros(2, 5), whiten=True),
    ],
    ids=["mean", "mean-dim-empty-row", "var", "whiten-one-element", "gae-whiten"],
)
def test_an_empty_mask_is_a_value_error_naming_mask(call):
    with pytest.raises(ValueError, match="mask must select at least"):
        call()


@pytest.mark.parametrize(
    "agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_zero_length_rows_give_a_zero_loss(agg, backend, backend_device):
    z = torch.zeros(2, 0, device=backend_device)
    loss, metrics = alignkit.ppo_policy_loss(z, z, z, z, agg=agg, backend=backend)
    vloss, _ = alignkit.value_loss(z, z, z, z, agg=agg, backend=backend)
    for t in (loss, vloss, *metrics.values(), alignkit.agg_loss(z, z, agg=agg)):
        assert torch.equal(t, torch.zeros_like(t)), (agg, t)


def test_whiten_does_not_overflow_fp32_for_huge_values():
    x = torch.randn(4, 50, dtype=torch.float64) * 3e19
    m = (torch.rand(4, 50) > 0.3).double()
    expected = alignkit.masked_whiten(x, m)
    got = alignkit.masked_whiten(x.float(), m)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(alignkit.masked_var(x.float() / 1e10, m))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_group_ids_are_refused(bad):
    import numpy as np

    with pytest.raises(ValueError, match="index must hold finite group ids"):
        alignkit.group_advantages(torch.randn(3), [0.0, bad, bad])
    with pytest.raises(ValueError, match="index must hold finite group ids"):
        alignkit.group_advantages(torch.randn(3), np.array([0.0, bad, bad]))


def test_inplace_backward_refuses_an_expanded_view(backend, backend_device):
    logits = torch.randn(1, V, device=backend_device).expand(4, V).requires_grad_()
    labels = torch.randint(0, V, (4,), device=backend_device)
    with pytest.raises(ValueError, match="inplace_backward"):
        alignkit.token_logprobs(logits, labels, inplace_backward=True, backend=backend)


def test_reinforce_baseline_batch_of_one_names_scores():
    with pytest.raises(ValueError, match="scores must hold at least 2 sequences"):
        alignkit.group_advantages(torch.randn(1), [0], method="reinforce++-baseline")


# ----------------------------------------------------------------------------- class 4: unclear errors


def _op_calls():
    """(op name, {argument: value}, call(**arguments)) for every public op."""
    r, m = torch.randn(2, 5), torch.ones(2, 5)
    logits, labels = torch.randn(4, V), torch.randint(0, V, (4,))
    hidden, weight = torch.randn(4, H), torch.randn(V, H)
    h3, lab3 = torch.randn(2, 5, H), torch.randint(0, V, (2, 5))
    return [
        (
            "gae",
            dict(rewards=r, values=r, mask=m),
            lambda **a: alignkit.gae(a["rewards"], a["values"], a["mask"]),
        ),
        (
            "gae_packed",
            dict(rewards=r[0], values=r[0], mask=m[0], cu_seqlens=torch.tensor([0, 2, 5])),
            lambda **a: alignkit.gae_packed(a["rewards"], a["values"], a["mask"], a["cu_seqlens"]),
        ),
        (
            "discounted_returns",
            dict(rewards=r, mask=m),
            lambda **a: alignkit.discounted_returns(a["rewards"], a["mask"]),
        ),
        (
            "discounted_returns_packed",
            dict(rewards=r[0], mask=m[0], cu_seqlens=torch.tensor([0, 5])),
            lambda **a: alignkit.discounted_returns_packed(a["rewards"], a["mask"], a["cu_seqlens"]),
        ),
        (
            "group_advantages",
            dict(scores=torch.randn(3), index=torch.tensor([0, 0, 1])),
            lambda **a: alignkit.group_advantages(a["scores"], a["index"]),
        ),
        ("masked_whiten", dict(x=r, mask=m), lambda **a: alignkit.masked_whiten(a["x"], a["mask"])),
        ("masked_mean", dict(x=r, mask=m), lambda **a: alignkit.masked_mean(a["x"], a["mask"])),
        ("agg_loss", dict(loss_mat=r, mask=m), lambda **a: alignkit.agg_loss(a["loss_mat"], a["mask"])),
        ("kl_penalty", dict(logp=r, ref_logp=r), lambda **a: alignkit.kl_penalty(a["logp"], a["ref_logp"])),
        (
            "ppo_policy_loss",
            dict(logp=r, old_logp=r, advantages=r, mask=m),
            lambda **a: alignkit.ppo_policy_loss(a["logp"], a["old_logp"], a["advantages"], a["mask"]),
        ),
        (
            "value_loss",
            dict(values=r, old_values=r, returns=r, mask=m),
            lambda **a: alignkit.value_loss(a["values"], a["old_values"], a["returns"], a["mask"]),
        ),
        (
            "token_logprobs",
            dict(logits=logits, labels=labels),
            lambda **a: alignkit.token_logprobs(a["logits"], a["labels"]),
        ),
        (
            "fused_linear_logprobs",
            dict(hidden=hidden, weight=weight, labels=labels),
            lambda **a: alignkit.fused_linear_logprobs(a["hidden"], a["weight"], a["labels"]),
        ),
        (
            "fused_linear_ppo_loss",
            dict(hidden=h3, weight=weight, labels=lab3, old_logp=r, advantages=r, mask=m),
            lambda **a: alignkit.fused_linear_ppo_loss(
                a["hidden"], a["weight"], a["labels"], a["old_logp"], a["advantages"], a["mask"]
            ),
        ),
    ]


def _argument_cases():
    for op, args, call in _op_calls():
        for name in args:
            yield pytest.param(op, args, call, name, id=f"{op}-{name}")


@pytest.mark.parametrize(("op", "args", "call", "name"), list(_argument_cases()))
def test_every_argument_names_itself_when_wrong(op, args, call, name):
    call(**args)  # the valid call works
    with pytest.raises(TypeError, match=rf"\b{name}\b.*got None"):
        call(**{**args, name: None})
    if isinstance(args[name], torch.Tensor):
        with pytest.raises(ValueError, match=rf"\b{name}\b.*meta"):
            call(**{**args, name: args[name].to("meta")})


def _tiny_fused_ppo(rows=2, **kwargs):
    hidden, weight = torch.randn(rows, 3, 4), torch.randn(5, 4)
    labels, x, m = torch.zeros(rows, 3, dtype=torch.long), torch.randn(rows, 3), torch.ones(rows, 3)
    return alignkit.fused_linear_ppo_loss(hidden, weight, labels, x, x, m, **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: alignkit.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), gamma=True),
            TypeError,
            "gamma",
        ),
        (
            lambda: alignkit.gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), whiten=1),
            TypeError,
            "whiten",
        ),
        (lambda: alignkit.masked_mean(torch.randn(2, 3), torch.ones(2, 3), dim=2), ValueError, "dim"),
        (lambda: alignkit.masked_mean(torch.randn(2, 3), torch.ones(2, 3), dim=1.0), TypeError, "dim"),
        (lambda: alignkit.group_advantages(torch.randn(2), [0, 1], eps="x"), TypeError, "eps"),
        (lambda: alignkit.group_advantages(torch.randn(2), [0, 1], eps=-1.0), ValueError, "eps"),
        (
            lambda: alignkit.fused_linear_logprobs(
                torch.randn(3, 0), torch.randn(5, 0), torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            "weight must have shape",
        ),
        (
            lambda: alignkit.fused_linear_logprobs(
                torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk_size=2.5
            ),
            TypeError,
            "chunk_size",
        ),
        (
            lambda: alignkit.token_logprobs(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool)),
            TypeError,
            "labels",
        ),
        (
            lambda: alignkit.token_logprobs(
                torch.randn(3, 4), torch.zeros(3, dtype=torch.long), ignore_index=1.0
            ),
            TypeError,
            "ignore_index",
        ),
        (
            lambda: alignkit.gae_packed(torch.randn(5), torch.randn(5), torch.ones(5), [0, 2, 2, 5]),
            ValueError,
            "cu_seqlens must be strictly increasing",
        ),
        (
            lambda: alignkit.gae_packed(torch.randn(5), torch.randn(5), torch.ones(5), [0.0, 5.0]),
            TypeError,
            "cu_seqlens",
        ),
        (
            lambda: alignkit.ppo_policy_loss(*[torch.randn(2, 3)] * 3, torch.ones(2, 3), clip_low="a"),
            TypeError,
            "clip_low",
        ),
        (
            lambda: alignkit.ppo_policy_loss(*[torch.randn(2, 3)] * 3, torch.ones(2, 3), config={}),
            TypeError,
            "config",
        ),
        (lambda: _tiny_fused_ppo(logit_floor=torch.zeros(2, 4)), ValueError, "logit_floor"),
        (lambda: _tiny_fused_ppo(logit_floor=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logit_floor"),
        (lambda: _tiny_fused_ppo(rows=1, cu_seqlens=[0, 2]), ValueError, "cu_seqlens"),
        (
            lambda: alignkit.ppo_policy_loss(*[torch.randn(1, 3)] * 3, torch.ones(1, 3), cu_seqlens=[0.0, 3]),
            TypeError,
            "cu_seqlens",
        ),
        (lambda: alignkit.PolicyLossConfig(kl_estimator="full"), ValueError, "kl_estimator"),
        (lambda: alignkit.PolicyLossConfig(dual_clip=0.5), ValueError, "dual_clip"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_wrong_scalars_and_shapes_name_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.fixture(scope="module")
def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(input_ids=torch.full((2, 5), V)), ValueError, r"input_ids must lie in \[0, 37\)"),
        (dict(input_ids=torch.full((2, 5), -1)), ValueError, "input_ids must lie in"),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.bool)),
            TypeError,
            "input_ids must be an integer tensor",
        ),
        (
            dict(input_ids=torch.ones(2, 5, dtype=torch.long), position_ids=torch.arange(4)[None]),
            ValueError,
            "position_ids must have the shape",
        ),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), logits_to_keep=-1), ValueError, "logits_to_keep"),
    ],
)
def test_causal_lm_logprobs_checks_its_inputs_before_the_model(tiny_llama, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        alignkit.causal_lm_logprobs(tiny_llama, **kwargs)
