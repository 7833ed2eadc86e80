"""alignkit.PolicyLossConfig: defaults, validation (errors name the field), normalisation, and its
equivalence with the option keywords of alignkit.ppo_policy_loss (same results, keywords override
fields). The loss values themselves are checked against the float64 oracle in tests/test_losses.py;
here one oracle comparison per loss type confirms that a config reaches the pass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracles import assert_close, ref_policy

import alignkit
from alignkit import PolicyLossConfig, ppo_policy_loss
from alignkit.loss_layout import LOSS_CODES

LOSS_TYPES = ["ppo_clip", "gspo", "cispo"]


def make_policy_inputs(B=3, T=20):
    logp = -3 * torch.rand(B, T)
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # a fully masked row
    return {
        "logp": logp,
        "old_logp": logp + 0.7 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "mask": mask,
        "is_weights": 2 * torch.rand(B, T),
        "ref_logp": logp + 0.5 * torch.randn(B, T),
        "entropy": 2 * torch.rand(B, T),
    }


def policy_call(**overrides):
    """A ppo_policy_loss call on small inputs, with ``overrides`` as its keywords (run it to raise)."""
    inputs = make_policy_inputs(B=2, T=6)
    args = {k: inputs[k] for k in ("logp", "old_logp", "advantages", "mask")}
    args.update(overrides)
    return lambda: ppo_policy_loss(**args)


def test_policy_loss_config_defaults():
    cfg = PolicyLossConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip) == (0.2, 0.2, 3.0)
    assert (cfg.agg, cfg.agg_scale, cfg.loss_type) == ("token-mean", None, "ppo_clip")
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef) == (0.0, "k3", 0.0)
    assert alignkit.PolicyLossConfig is PolicyLossConfig and "PolicyLossConfig" in alignkit.__all__


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_config_loss_types(loss_type):
    cfg = PolicyLossConfig(loss_type=loss_type, dual_clip=2.5)
    assert cfg.loss_type == loss_type and cfg.dual_clip == 2.5
    # Only the clipped PPO objective has a dual clip; GSPO and CISPO ignore the field.
    assert cfg.active_dual_clip == (2.5 if loss_type == "ppo_clip" else None)
    assert cfg.sequence_ratio == (loss_type == "gspo")
    assert cfg.loss_code == LOSS_CODES[loss_type]


def test_ratio_level_is_gone():
    """One name per concept: the loss type is ``loss_type``; ``ratio_level`` was its GSPO half."""
    with pytest.raises(TypeError, match="ratio_level"):
        PolicyLossConfig(ratio_level="sequence")
    with pytest.raises(TypeError, match="ratio_level"):
        policy_call(ratio_level="sequence")()


BAD_CONFIG = [
    ("clip_low", -0.1, ValueError),
    ("clip_low", float("inf"), ValueError),
    ("clip_low", "0.2", TypeError),
    ("clip_high", float("nan"), ValueError),
    ("clip_high", None, TypeError),
    ("dual_clip", 1.0, ValueError),
    ("dual_clip", 0.5, ValueError),
    ("dual_clip", float("inf"), ValueError),
    ("dual_clip", "3", TypeError),
    ("agg", "mean", ValueError),
    ("agg", None, ValueError),
    ("agg_scale", -3.0, ValueError),
    ("agg_scale", 0.0, ValueError),
    ("agg_scale", "10", TypeError),
    ("loss_type", "group", ValueError),
    ("loss_type", "sequence", ValueError),
    ("loss_type", "GSPO", ValueError),
    ("loss_type", None, ValueError),
    ("kl_coef", float("nan"), ValueError),
    ("kl_coef", True, TypeError),
    ("kl_estimator", "full", ValueError),
    ("kl_estimator", "k3+", ValueError),
    ("entropy_coef", float("inf"), ValueError),
    ("entropy_coef", [0.1], TypeError),
]


@pytest.mark.parametrize(("field", "value", "exc"), BAD_CONFIG, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIG])
def test_policy_loss_config_validation_names_the_field(field, value, exc):
    with pytest.raises(exc, match=rf"^{field} "):
        PolicyLossConfig(**{field: value})
    with pytest.raises(exc, match=rf"^{field} "):  # a variant is validated the same way
        dataclasses.replace(PolicyLossConfig(), **{field: value})
    with pytest.raises(exc, match=rf"^{field} "):  # and so is a keyword override of a loss call
        policy_call(config=PolicyLossConfig(), **{field: value})()


def test_policy_loss_config_agg_scale_needs_a_mode_that_takes_it():
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        assert PolicyLossConfig(agg=agg, agg_scale=64).agg_scale == 64.0
    for agg in ("seq-mean-token-sum", "seq-mean-token-mean"):
        with pytest.raises(ValueError, match=r"^agg_scale applies to token-mean"):
            PolicyLossConfig(agg=agg, agg_scale=64.0)


CANONICAL_KL = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}


@pytest.mark.parametrize(("name", "canonical"), CANONICAL_KL.items())
def test_policy_loss_config_stores_the_canonical_kl_estimator(name, canonical):
    cfg = PolicyLossConfig(kl_estimator=name)
    assert cfg.kl_estimator == canonical
    assert cfg == PolicyLossConfig(kl_estimator=canonical)


def test_policy_loss_config_normalises_numbers():
    cfg = PolicyLossConfig(clip_low=0, clip_high=1, dual_clip=4, kl_coef=1, entropy_coef=0, agg_scale=7)
    for field in ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "agg_scale"):
        assert type(getattr(cfg, field)) is float, field
    assert PolicyLossConfig(dual_clip=None).dual_clip is None


def test_policy_loss_config_is_frozen():
    cfg = PolicyLossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_low = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kl_estimator = "k1"
    variant = dataclasses.replace(cfg, clip_high=0.28)
    assert variant.clip_high == 0.28 and cfg.clip_high == 0.2
    assert hash(cfg) == hash(PolicyLossConfig())  # frozen dataclasses hash by value


CONFIG_OPTIONS = {
    "clip_low": 0.1,
    "clip_high": 0.28,
    "dual_clip": None,
    "agg": "seq-mean-token-sum-norm",
    "agg_scale": 30.0,
    "kl_coef": 0.1,
    "kl_estimator": "low_var_kl",
    "entropy_coef": 0.01,
}


def _policy_outputs(inputs, backend, **kwargs):
    logp = inputs["logp"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    loss, metrics = ppo_policy_loss(
        logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], ref_logp=inputs["ref_logp"],
        entropy=ent, is_weights=inputs["is_weights"], backend=backend, **kwargs,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, logp.grad, ent.grad


def _assert_same_outputs(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_config_equals_keywords(backend, loss_type):
    inputs = make_policy_inputs(B=3, T=20)
    opts = {**CONFIG_OPTIONS, "loss_type": loss_type}
    by_config = _policy_outputs(inputs, backend, config=PolicyLossConfig(**opts))
    by_keywords = _policy_outputs(inputs, backend, **opts)
    _assert_same_outputs(by_config, by_keywords)
    d = {k: v.double() for k, v in inputs.items() if v.is_floating_point()}
    total, _, magnitude = ref_policy(
        d["logp"], d["old_logp"], d["advantages"], inputs["mask"], is_weights=d["is_weights"],
        ref_logp=d["ref_logp"], entropy=d["entropy"], **opts,
    )  # fmt: skip
    assert_close(by_config[0], total, 1e-6, scale=magnitude, name="loss")  # and both are the oracle's


def test_keywords_override_config_fields(backend):
    inputs = make_policy_inputs(B=3, T=20)
    config = PolicyLossConfig(**CONFIG_OPTIONS)
    overrides = {
        "clip_high": 0.5,
        "agg": "token-mean",
        "agg_scale": None,
        "dual_clip": 2.0,
        "kl_estimator": "k1",
    }
    got = _policy_outputs(inputs, backend, config=config, **overrides)
    expected = _policy_outputs(inputs, backend, **{**CONFIG_OPTIONS, **overrides})
    _assert_same_outputs(got, expected)
    differs = _policy_outputs(inputs, backend, config=config)
    assert not torch.equal(got[0], differs[0])  # the overrides did change something
    # None is a value, not "unset": dual_clip=None switches off the config's dual clip
    off = _policy_outputs(inputs, backend, config=PolicyLossConfig(dual_clip=3.0), dual_clip=None)
    _assert_same_outputs(off, _policy_outputs(inputs, backend, dual_clip=None))
    assert config.clip_high == 0.28  # the config itself is untouched


def test_config_must_be_a_policy_loss_config():
    with pytest.raises(TypeError, match="config must be an alignkit.PolicyLossConfig"):
        policy_call(config={"clip_low": 0.2})()
