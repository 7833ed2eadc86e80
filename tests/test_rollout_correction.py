"""alignkit.rollout_correction_weights against the float64 loop oracle of tests/oracles.py
(docs/formulas.md, "Rollout correction"): every level and mode, odd shapes, all-masked rows and
batches, a ratio exactly at the threshold, overflowing ratios, NaN at masked and live positions,
and the errors of bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import assert_close, ref_policy, ref_rollout_correction

from alignkit import ppo_policy_loss
from alignkit.ops.rollout_correction import rollout_correction_weights

LEVELS = ["token", "sequence"]
MODES = ["tis", "mis"]
METRIC_KEYS = {
    "rollout/logprob_mismatch",
    "rollout/logprob_mismatch_max",
    "rollout_is/mean",
    "rollout_is/max",
    "rollout_is/clipfrac",
}


def make_inputs(B=4, T=33, dtype=torch.float32, spread=0.3, empty_row=True, device=None):
    old = -3 * torch.rand(B, T)
    rollout = old + spread * torch.randn(B, T)
    mask = torch.rand(B, T) > 0.25
    if empty_row and B > 1:
        mask[1] = False
    return old.to(dtype).to(device), rollout.to(dtype).to(device), mask.to(device)


def check(old, rollout, mask, rtol=1e-6, **opts):
    weights, metrics = rollout_correction_weights(old, rollout, mask, **opts)
    ref_weights, ref_metrics = ref_rollout_correction(old, rollout, mask, **opts)
    expected = torch.float64 if old.dtype == torch.float64 else torch.float32
    assert weights.dtype == expected and weights.shape == old.shape and weights.device == old.device
    assert not weights.requires_grad
    assert_close(weights, ref_weights, rtol, name="weights")
    assert (weights[mask == 0] == 0).all()
    assert set(metrics) == METRIC_KEYS
    for key, value in metrics.items():
        assert value.dim() == 0 and value.dtype == expected and value.device == old.device, key
        assert_close(value, ref_metrics[key], rtol, scale=max(float(ref_metrics[key].abs()), 1.0), name=key)
    return weights, metrics


@pytest.mark.parametrize("threshold", [2.0, 1.1, 5.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_matches_oracle(device, dtype, level, mode, threshold):
    # Sequence level: a small per-token spread keeps the row sums near 0, so some sequences are
    # truncated and some are not.
    spread, B = (0.3, 4) if level == "token" else (0.04, 16)
    old, rollout, mask = make_inputs(B=B, dtype=dtype, spread=spread, device=device)
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    _, metrics = check(old, rollout, mask, rtol, level=level, mode=mode, threshold=threshold)
    if threshold == 1.1:  # both sides of the threshold occur
        assert 0.0 < float(metrics["rollout_is/clipfrac"]) < 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 257), (3, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_shapes(device, shape, level, mode):
    old, rollout, mask = make_inputs(*shape, spread=0.1, empty_row=False, device=device)
    check(old, rollout, mask, 1e-5, level=level, mode=mode, threshold=1.1)


def test_defaults_are_token_tis_at_2(device):
    old, rollout, mask = make_inputs(device=device)
    weights, metrics = rollout_correction_weights(old, rollout, mask)
    explicit = rollout_correction_weights(old, rollout, mask, level="token", mode="tis", threshold=2.0)
    assert torch.equal(weights, explicit[0])
    assert all(torch.equal(metrics[k], explicit[1][k]) for k in metrics)
    assert float(weights.max()) <= 2.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_all_masked_rows_and_batch(device, level, mode):
    old, rollout, mask = make_inputs(B=5, T=9, device=device)
    mask[3] = False
    weights, _ = check(old, rollout, mask, 1e-5, level=level, mode=mode)
    assert (weights[1] == 0).all() and (weights[3] == 0).all()
    mask[:] = False
    weights, metrics = check(old, rollout, mask, level=level, mode=mode)
    assert (weights == 0).all() and all(float(v) == 0.0 for v in metrics.values())
    old, rollout, mask = make_inputs(B=4, T=1, empty_row=False, device=device)  # T = 1
    mask[:, 0] = torch.tensor([True, False, True, False])
    check(old, rollout, mask, 1e-5, level=level, mode=mode, threshold=1.05)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_ratio_exactly_at_threshold_is_kept(device, level, mode):
    """rho == C (fp64, exact): not truncated, not zeroed, not counted in the clip fraction."""
    old = torch.full((3, 4), -1.0, dtype=torch.float64, device=device)
    rollout = old - 0.5  # exact: d = 0.5 at every token
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    if level == "sequence":
        mask[:, 1:] = False  # one live token per row: the row sum is 0.5 too
    threshold = math.exp(0.5)
    assert float(torch.tensor(0.5, dtype=torch.float64).exp()) == threshold
    weights, metrics = check(old, rollout, mask, 1e-15, level=level, mode=mode, threshold=threshold)
    assert (weights[mask] == threshold).all()
    assert float(metrics["rollout_is/clipfrac"]) == 0.0
    # just above: truncated to C (TIS) or zeroed (MIS), and counted
    weights, metrics = check(
        old, rollout, mask, 1e-15, level=level, mode=mode, threshold=threshold * (1 - 1e-15)
    )
    assert float(metrics["rollout_is/clipfrac"]) == 1.0
    assert (weights[mask] == (threshold * (1 - 1e-15) if mode == "tis" else 0.0)).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_overflowing_ratios_stay_finite(device, level, mode):
    """Log-ratios beyond exp's range (token: 100 in fp32; sequence: row sums of 800): rho = inf, the
    weight C (TIS) or 0 (MIS), never NaN; a ratio of exp(-100) or exp(-800) is kept (about 0)."""
    old, rollout, mask = make_inputs(B=3, T=8, empty_row=False, device=device)
    mask[:] = True
    rollout[0] = old[0] - 100.0
    rollout[1] = old[1] + 100.0
    weights, _ = check(old, rollout, mask, 1e-5, level=level, mode=mode)
    assert torch.isfinite(weights).all()
    assert (weights[0] == (2.0 if mode == "tis" else 0.0)).all()
    assert (weights[1] < 1e-30).all()  # exp(-100): 0 in fp64 terms (a denormal in fp32)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_garbage_at_masked_positions_does_not_leak(device, level, mode, fill):
    old, rollout, mask = make_inputs(device=device)
    clean = rollout_correction_weights(old, rollout, mask, level=level, mode=mode, threshold=1.1)
    dead = mask == 0
    dirty = rollout_correction_weights(
        old.masked_fill(dead, fill),
        rollout.masked_fill(dead, -fill),
        mask,
        level=level,
        mode=mode,
        threshold=1.1,
    )
    assert torch.equal(clean[0], dirty[0])
    assert all(torch.equal(clean[1][k], dirty[1][k]) for k in clean[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_nan_at_a_live_position_stays_visible(device, level, mode):
    """Neither truncation nor masking turns a NaN ratio into a plausible weight (C or 0)."""
    for which in ("old", "rollout"):
        old, rollout, mask = make_inputs(B=3, T=6, empty_row=False, device=device)
        mask[0, 2] = True
        (old if which == "old" else rollout)[0, 2] = float("nan")
        weights, metrics = rollout_correction_weights(old, rollout, mask, level=level, mode=mode)
        nan_tokens = torch.zeros_like(mask)  # the token itself, or every live token of its sequence
        if level == "token":
            nan_tokens[0, 2] = True
        else:
            nan_tokens[0] = mask[0]
        assert torch.isnan(weights[nan_tokens]).all(), which
        assert not torch.isnan(weights[~nan_tokens]).any(), which
        assert torch.isnan(metrics["rollout/logprob_mismatch"]) and torch.isnan(metrics["rollout_is/mean"])


def test_weights_are_stop_gradient(device):
    old, rollout, mask = make_inputs(device=device)
    old, rollout = old.requires_grad_(), rollout.requires_grad_()
    weights, metrics = rollout_correction_weights(old, rollout, mask, level="sequence")
    assert not weights.requires_grad and not any(v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["ppo_clip", "cispo"])
def test_weights_feed_the_policy_loss(loss_type):
    """The weights are the policy loss's ``is_weights``: the loss is the oracle's with them."""
    old, rollout, mask = make_inputs(B=4, T=20)
    logp = (old + 0.2 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn_like(old)
    weights, _ = rollout_correction_weights(old, rollout, mask, mode="mis")
    loss, _ = ppo_policy_loss(logp, old, adv, mask, is_weights=weights, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, logp)
    logp64 = logp.detach().double().requires_grad_()
    ref_weights, _ = ref_rollout_correction(old, rollout, mask, mode="mis")
    total, _, magnitude = ref_policy(
        logp64, old.double(), adv.double(), mask, is_weights=ref_weights, loss_type=loss_type
    )
    (ref_grad,) = torch.autograd.grad(total, logp64)
    assert_close(loss, total, 1e-6, scale=magnitude, name="loss")
    assert_close(grad, ref_grad, 1e-6, name="d logp")


def test_exported():
    import alignkit

    if hasattr(alignkit, "rollout_correction_weights"):  # once alignkit/__init__.py lists it
        assert alignkit.rollout_correction_weights is rollout_correction_weights


# ----------------------------------------------------------------------------- bad input

GOOD = {"old_logp": torch.zeros(2, 5), "rollout_logp": torch.zeros(2, 5), "mask": torch.ones(2, 5)}
BAD = [
    ({"old_logp": torch.zeros(10)}, ValueError, r"^old_logp must have 2 dimensions"),
    ({"old_logp": torch.zeros(2, 5, dtype=torch.int64)}, TypeError, r"^old_logp must be a floating-point"),
    ({"old_logp": [[0.0]]}, TypeError, r"^old_logp must be a torch.Tensor"),
    ({"rollout_logp": torch.zeros(2, 4)}, ValueError, r"^rollout_logp must have the shape of old_logp"),
    ({"rollout_logp": None}, TypeError, r"^rollout_logp must be a torch.Tensor, got None"),
    ({"mask": torch.ones(2, 6)}, ValueError, r"^mask must have the shape of old_logp"),
    ({"mask": torch.full((2, 5), 0.5)}, ValueError, r"^mask must contain only 0 and 1"),
    ({"level": "batch"}, ValueError, r"^level must be one of token, sequence, got 'batch'"),
    ({"level": None}, ValueError, r"^level must be one of token, sequence"),
    ({"mode": "tis+"}, ValueError, r"^mode must be one of tis, mis, got 'tis\+'"),
    ({"threshold": 0.0}, ValueError, r"^threshold must be a positive finite number, got 0.0"),
    ({"threshold": -2.0}, ValueError, r"^threshold must be a positive"),
    ({"threshold": float("nan")}, ValueError, r"^threshold must be a positive"),
    ({"threshold": float("inf")}, ValueError, r"^threshold must be a positive"),
    ({"threshold": "2"}, TypeError, r"^threshold must be a positive float, got str"),
    ({"threshold": True}, TypeError, r"^threshold must be a positive float, got bool"),
]


@pytest.mark.parametrize("override, exc, match", BAD, ids=[b[2] for b in BAD])
def test_bad_input_names_the_argument(override, exc, match):
    with pytest.raises(exc, match=match):
        rollout_correction_weights(**{**GOOD, **override})


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        rollout_correction_weights(*GOOD.values(), "sequence")
