"""alignkit.compat.verl (verl 0.9's functions backed by alignkit ops) against the float64 oracles of
tests/oracles.py, called with verl's argument conventions: (B, T) response masks of any dtype, uid
arrays of strings, configs read by attribute or key, global-batch normalisers, and the places where
verl's semantics differ from alignkit's own ops (the verl-specific reference pieces below are
written plainly from verl's definitions). patch()/restore() run against fake verl modules put into
sys.modules, so this file needs no verl; tests/test_compat_peers.py compares with the real one.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from oracles import (
    assert_close,
    ref_agg,
    ref_gae,
    ref_group_advantages,
    ref_kl,
    ref_logprobs,
    ref_masked_whiten,
    ref_policy,
    ref_value,
)

from alignkit.compat import PatchWarning
from alignkit.compat import verl as V

MODES = list(V.LOSS_AGG_MODES)
# verl's global-batch normalisers: none (one process), numbers (dp = 2), tensors (kept on device)
BATCH_INFOS = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 11},
    "tensors": {"batch_num_tokens": torch.tensor(37), "global_batch_size": torch.tensor(9.0)},
}


class ActorConfig:
    """Duck-typed stand-in for verl's ActorConfig (attributes plus ``.get``, as its BaseConfig)."""

    def __init__(self, **fields):
        self.clip_ratio = 0.2
        self.clip_ratio_low = None
        self.clip_ratio_high = None
        self.global_batch_info = {}
        self.__dict__.update(fields)

    def get(self, name, default=None):
        return getattr(self, name, default)


def make_batch(B=5, T=13, dtype=torch.float32, mask_dtype=torch.float32):
    """verl-style inputs: a 0/1 response mask with an all-masked row, an interior masked span
    (a multi-turn observation) and rewards at masked positions too (verl sums them)."""
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    if B > 2:
        mask[1] = False
        mask[2, 3:6] = False
    rewards = torch.randn(B, T)
    return {
        "rewards": rewards.to(dtype),
        "values": torch.randn(B, T).to(dtype),
        "mask": mask.to(mask_dtype),
    }


def verl_normaliser(
    mode, mask, T, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """verl 0.9's agg_loss as (oracle aggregation, factor): ``factor * ref_agg(L, m, agg,
    agg_scale)`` with S the masked sum and R the number of non-empty rows."""
    rows = float((mask != 0).any(-1).sum())
    gbs = rows if global_batch_size is None else float(global_batch_size)
    if mode == "seq-mean-token-mean":  # sum_b S_b / (n_b + 1e-8) / gbs * dp
        return ("seq-mean-token-mean", None), rows / gbs * dp_size
    if mode == "token-mean":  # S / tokens * dp
        tokens = float((mask != 0).sum()) if batch_num_tokens is None else float(batch_num_tokens)
        return ("token-mean", 1.0), dp_size / tokens
    if mode == "token-sum":  # S * dp
        return ("token-mean", 1.0), dp_size
    norm = 1.0 if mode == "seq-mean-token-sum" else (T if loss_scale_factor is None else loss_scale_factor)
    return ("token-mean", 1.0), dp_size / gbs / norm  # S / gbs * dp (/ loss_scale_factor)


def ref_verl_agg(loss, mask, mode, **info):
    (agg, scale), factor = verl_normaliser(mode, mask, loss.shape[-1], **info)
    return ref_agg(loss, mask, agg, scale) * factor


def ref_verl_policy(x, log_prob64, mode, info, **options):
    """(loss, metrics) of the oracle policy loss aggregated as verl does."""
    (agg, scale), factor = verl_normaliser(mode, x["mask"], log_prob64.shape[-1], **info)
    d = {k: v.double() for k, v in x.items()}
    total, metrics, magnitude = ref_policy(
        log_prob64, d["old_log_prob"], d["advantages"], x["mask"], agg=agg, agg_scale=scale, **options
    )
    return total * factor, metrics, magnitude * factor


def policy_inputs(B=6, T=17, spread=0.6):
    logp = -3 * torch.rand(B, T)
    mask = torch.rand(B, T) > 0.25
    mask[1] = False  # an all-masked row
    return {
        "log_prob": logp,
        "old_log_prob": logp + spread * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "mask": mask.float(),
        "weights": 2 * torch.rand(B, T),
    }


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (5, 257)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_is_verl_gae_whitened(shape, gamma, lam):
    x = make_batch(*shape)
    adv, ret = V.compute_gae_advantage_return(x["rewards"], x["values"], x["mask"], gamma, lam)
    ref_adv, ref_ret = ref_gae(x["rewards"], x["values"], x["mask"], gamma, lam)
    assert_close(ret, ref_ret, rtol=1e-5, name="returns (before whitening)")
    assert_close(adv, ref_masked_whiten(ref_adv, x["mask"]), rtol=1e-5, name="whitened advantages")


def test_gae_takes_tensor_gamma_and_inputs_that_require_grad():
    x = make_batch(4, 9)
    values = x["values"].clone().requires_grad_()  # verl runs under no_grad: no error here
    adv, ret = V.compute_gae_advantage_return(
        x["rewards"], values, x["mask"], torch.tensor(0.9), torch.tensor(0.8)
    )
    _, ref_ret = ref_gae(x["rewards"], x["values"], x["mask"], 0.9, 0.8)
    assert_close(ret, ref_ret, rtol=1e-5)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("norm_by_std,method", [(True, "grpo"), (False, "dr_grpo")])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_grpo_groups_by_uid_and_sums_every_position(norm_by_std, method, mask_dtype):
    x = make_batch(7, 11, mask_dtype=mask_dtype)
    uids = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p3"], dtype=object)  # p2, p3: groups of one
    adv, ret = V.compute_grpo_outcome_advantage(
        x["rewards"], x["mask"], uids, epsilon=1e-4, norm_adv_by_std_in_grpo=norm_by_std
    )
    scores = x["rewards"].double().sum(-1)  # verl sums all positions, masked ones included
    expected = ref_group_advantages(scores, list(uids), method, eps=1e-4, mask=x["mask"])
    assert ret is adv
    assert_close(adv, expected, rtol=1e-5, name=method)


def test_grpo_equal_scores_give_zero_and_group_of_one_scales_by_one_plus_eps():
    rewards = torch.zeros(3, 4)
    rewards[:, -1] = torch.tensor([1.0, 1.0, 2.0])
    mask = torch.ones(3, 4)
    adv, _ = V.compute_grpo_outcome_advantage(rewards, mask, np.array(["a", "a", "b"]))
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert_close(adv[2], torch.full((4,), 2.0 / (1 + 1e-6)), rtol=1e-6)


@pytest.mark.parametrize("estimator,method", [
    (V.compute_rloo_outcome_advantage, "rloo"),
    (V.compute_reinforce_plus_plus_baseline_outcome_advantage, "reinforce++-baseline"),
])  # fmt: skip
def test_group_estimators(estimator, method):
    x = make_batch(8, 10)
    uids = np.array([0, 1, 0, 1, 2, 0, 1, 3])
    adv, ret = estimator(x["rewards"], x["mask"], uids, config=None, unused_kwarg=1)
    expected = ref_group_advantages(x["rewards"].double().sum(-1), list(uids), method, mask=x["mask"])
    assert ret is adv
    assert_close(adv, expected, rtol=1e-5, name=method)


def ref_verl_reinforce_returns(rewards, mask, gamma):
    """verl 0.9's REINFORCE++ loop: masked positions keep the running return and report 0."""
    r, m = rewards.double().tolist(), mask.double().tolist()
    out = [[0.0] * len(row) for row in r]
    for b in range(len(r)):
        running = 0.0
        for t in reversed(range(len(r[b]))):
            if m[b][t] != 0:
                running = r[b][t] + gamma * running
                out[b][t] = running
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("config", [ActorConfig(gamma=None), {"gamma": None}], ids=["attribute", "mapping"])
def test_reinforce_plus_plus_carries_through_observation_spans(gamma, config):
    if isinstance(config, dict):
        config = {"gamma": gamma}
    else:
        config.gamma = gamma
    x = make_batch(5, 16)
    adv, ret = V.compute_reinforce_plus_plus_outcome_advantage(x["rewards"], x["mask"], config=config)
    expected = ref_verl_reinforce_returns(x["rewards"], x["mask"], gamma)
    assert_close(ret, expected, rtol=1e-5, name="returns")
    whitened = torch.where(x["mask"] != 0, ref_masked_whiten(expected, x["mask"]), 0.0)
    assert_close(adv, whitened, rtol=1e-5, name="advantages")


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", list(BATCH_INFOS), ids=list(BATCH_INFOS))
@pytest.mark.parametrize("shape", [(1, 1), (6, 19), (3, 257)])
def test_agg_loss_has_verl_normalisers(mode, info, shape):
    loss = torch.randn(*shape, dtype=torch.float64).requires_grad_()
    mask = torch.rand(*shape) > 0.4
    mask[0, 0] = True
    if shape[0] > 2:
        mask[2] = False
    kwargs = BATCH_INFOS[info]
    got = V.agg_loss(loss, mask, mode, **kwargs)
    expected = ref_verl_agg(loss, mask, mode, **kwargs)
    assert got.dim() == 0
    assert_close(got, expected, rtol=1e-10, name=f"{mode} {info}")
    (g,) = torch.autograd.grad(got, loss)
    (ref_g,) = torch.autograd.grad(expected, loss)
    assert_close(g, ref_g, rtol=1e-10, name="gradient")


def test_agg_loss_seq_mean_token_sum_norm_divides_by_rows_and_scale():
    # verl 0.9 divides seq-mean-token-sum-norm by the non-empty rows too (<= 0.8 did not)
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert float(V.agg_loss(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx(7 / 2 / 3)
    assert float(V.agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=7)) == pytest.approx(0.5)
    assert float(V.agg_loss(loss, mask, "token-sum", dp_size=4)) == pytest.approx(28.0)


def test_agg_loss_all_masked_is_zero_not_nan():
    loss = torch.randn(3, 4)
    mask = torch.zeros(3, 4)
    for mode in MODES:
        assert float(V.agg_loss(loss, mask, mode)) == 0.0  # verl divides 0 by 0 here


# ----------------------------------------------------------------------------- policy losses


def _check_actor_metrics(metrics, ref_metrics, lower=True):
    ref_metrics = {k: float(v.detach()) for k, v in ref_metrics.items()}
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["pg_clipfrac"], abs=1e-7)
    assert metrics["actor/ppo_kl"] == pytest.approx(ref_metrics["ppo_kl"], rel=1e-5, abs=1e-7)
    expected_lower = ref_metrics["pg_clipfrac_lower"] if lower else 0.0
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(expected_lower, abs=1e-7)


def run_policy(function, x, config, mode, with_weights=True, **options):
    """The compat loss and its oracle on the same inputs: loss, gradient, metrics."""
    log_prob = x["log_prob"].clone().requires_grad_()
    weights = x["weights"] if with_weights else None
    loss, metrics = function(x["old_log_prob"], log_prob, x["advantages"], x["mask"], mode, config, weights)
    (grad,) = torch.autograd.grad(loss, log_prob)
    lp64 = x["log_prob"].double().requires_grad_()
    if with_weights:
        options["is_weights"] = x["weights"].double()
    ref_loss, ref_metrics, magnitude = ref_verl_policy(x, lp64, mode, config.global_batch_info, **options)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp64)
    assert loss.dim() == 0
    assert_close(loss, ref_loss, rtol=1e-5, scale=float(magnitude), name=f"{function.__name__} {mode}")
    assert_close(grad, ref_grad, rtol=1e-5, name=f"{function.__name__} {mode} gradient")
    return metrics, ref_metrics


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", list(BATCH_INFOS), ids=list(BATCH_INFOS))
def test_policy_loss_vanilla(mode, info):
    x = policy_inputs()
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.5)
    config.global_batch_info = dict(BATCH_INFOS[info])
    metrics, ref_metrics = run_policy(
        V.compute_policy_loss_vanilla, x, config, mode, clip_low=0.1, clip_high=0.28, dual_clip=2.5
    )
    _check_actor_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("config", [
    ActorConfig(clip_ratio=0.3),  # clip_ratio_low/high None: both take clip_ratio; clip_ratio_c 3.0
    {"clip_ratio": 0.3},  # a plain mapping (an omegaconf DictConfig reads the same way)
    types.SimpleNamespace(clip_ratio=0.3),  # no .get, no global_batch_info
], ids=["actor-config", "mapping", "namespace"])  # fmt: skip
def test_policy_loss_reads_config_by_attribute_or_key(config):
    x = policy_inputs(4, 9, spread=1.5)
    log_prob = x["log_prob"].clone().requires_grad_()
    loss, metrics = V.compute_policy_loss_vanilla(
        old_log_prob=x["old_log_prob"], log_prob=log_prob, advantages=x["advantages"],
        response_mask=x["mask"], config=config,
    )  # fmt: skip
    d = {k: v.double() for k, v in x.items()}
    ref_loss, ref_metrics, magnitude = ref_policy(
        d["log_prob"],
        d["old_log_prob"],
        d["advantages"],
        x["mask"],
        clip_low=0.3,
        clip_high=0.3,
        dual_clip=3.0,
    )
    assert_close(loss, ref_loss, rtol=1e-5, scale=float(magnitude))
    _check_actor_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", ["local", "global"])
def test_policy_loss_gspo(mode, info):
    x = policy_inputs(spread=0.3)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    config.global_batch_info = dict(BATCH_INFOS[info])
    metrics, ref_metrics = run_policy(
        V.compute_policy_loss_gspo, x, config, mode, loss_type="gspo", clip_low=3e-4, clip_high=4e-4
    )
    _check_actor_metrics(metrics, ref_metrics, lower=False)


def ref_verl_gspo(log_prob, old, advantages, mask, clip_low, clip_high):
    """verl's GSPO per-token loss (float64): the sequence mean of the *unclamped* log-ratios."""
    keep = mask != 0
    lr = log_prob - old
    s = torch.where(keep, lr, 0.0).sum(-1) / keep.sum(-1).clamp(min=1)
    ratio = (log_prob - log_prob.detach() + s.detach()[:, None]).clamp(max=10).exp()
    l1, l2 = -advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.where(l2 > l1, l2, l1)
    return ref_agg(loss, mask, "seq-mean-token-mean"), torch.where(keep, -lr, 0.0).sum() / keep.sum()


def test_gspo_averages_unclamped_log_ratios_as_verl():
    x = policy_inputs(4, 8, spread=0.3)
    x["old_log_prob"][0, 0] = x["log_prob"][0, 0] - 26.0  # |log-ratio| > 20 at a live token
    x["old_log_prob"][2, 3] = x["log_prob"][2, 3] + 23.0
    x["mask"][0, 0] = x["mask"][2, 3] = 1.0
    config = ActorConfig(clip_ratio=0.2)
    log_prob = x["log_prob"].clone().requires_grad_()
    loss, metrics = V.compute_policy_loss_gspo(
        x["old_log_prob"], log_prob, x["advantages"], x["mask"], config=config
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    d = {k: v.double() for k, v in x.items()}
    lp64 = d["log_prob"].clone().requires_grad_()
    ref_loss, ref_kl_metric = ref_verl_gspo(lp64, d["old_log_prob"], d["advantages"], x["mask"], 0.2, 0.2)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp64)
    assert_close(loss, ref_loss, rtol=1e-5, scale=1.0)
    assert_close(grad, ref_grad, rtol=1e-5)
    assert metrics["actor/ppo_kl"] == pytest.approx(float(ref_kl_metric.detach()), rel=1e-5)
    # alignkit's own GSPO (per-token log-ratios clamped at +-20) gives another loss here
    clamped, _, _ = ref_policy(
        d["log_prob"],
        d["old_log_prob"],
        d["advantages"],
        x["mask"],
        agg="seq-mean-token-mean",
        loss_type="gspo",
    )
    assert abs(float(clamped) - float(ref_loss.detach())) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_cispo(mode):
    x = policy_inputs(spread=0.4)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_high=0.28)
    metrics, ref_metrics = run_policy(
        V.compute_policy_loss_cispo, x, config, mode, loss_type="cispo", clip_low=0.2, clip_high=0.28
    )
    _check_actor_metrics(metrics, ref_metrics, lower=False)


# ----------------------------------------------------------------------------- value loss, KL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", list(BATCH_INFOS), ids=list(BATCH_INFOS))
def test_value_loss_takes_verl_argument_order(mode, info):
    B, T = 5, 23
    returns, old = torch.randn(B, T), torch.randn(B, T)
    vpreds = (old + 0.6 * torch.randn(B, T)).requires_grad_()
    mask = torch.rand(B, T) > 0.3
    mask[3] = False
    kwargs = BATCH_INFOS[info]
    loss, clipfrac = V.compute_value_loss(vpreds, returns, old, mask, 0.2, mode, **kwargs)
    (grad,) = torch.autograd.grad(loss, vpreds)
    v64 = vpreds.detach().double().requires_grad_()
    (agg, scale), factor = verl_normaliser(mode, mask, T, **kwargs)
    ref_loss, ref_clipfrac = ref_value(
        v64, old.double(), returns.double(), mask, clip=0.2, agg=agg, agg_scale=scale
    )
    ref_loss = ref_loss * factor
    (ref_grad,) = torch.autograd.grad(ref_loss, v64)
    assert isinstance(clipfrac, torch.Tensor) and clipfrac.dim() == 0
    assert_close(loss, ref_loss, rtol=1e-5)
    assert_close(grad, ref_grad, rtol=1e-5)
    assert_close(clipfrac, ref_clipfrac, rtol=1e-6)


@pytest.mark.parametrize("name", list(V.KL_PENALTIES))
def test_kl_penalty_names(name):
    logp = -3 * torch.rand(4, 33, dtype=torch.float64)
    ref = logp + 0.8 * torch.randn(4, 33, dtype=torch.float64)
    ref[0, 0] = logp[0, 0] + 30.0  # the k3 clamps
    x = logp.clone().requires_grad_()
    got = V.kl_penalty(x, ref, name)
    assert_close(got, ref_kl(logp, ref, name), rtol=1e-12, name=name)
    x64 = logp.clone().requires_grad_()
    (g,) = torch.autograd.grad(got.sum(), x)
    (ref_g,) = torch.autograd.grad(ref_kl(x64, ref, name).sum(), x64)
    assert_close(g, ref_g, rtol=1e-12, name=f"{name} gradient")


@pytest.mark.parametrize("name", ["k1+", "kl+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"])
def test_kl_penalty_plus_suffix_is_value_with_k2_gradient(name):
    logp = -3 * torch.rand(3, 17)
    ref = logp + 0.5 * torch.randn(3, 17)
    x = logp.clone().requires_grad_()
    got = V.kl_penalty(logprob=x, ref_logprob=ref, kl_penalty=name)
    assert_close(got, ref_kl(logp.double(), ref.double(), name[:-1]), rtol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), x)
    assert_close(g, (logp - ref).double(), rtol=1e-6, name="k2 gradient: d - 0")


# ----------------------------------------------------------------------------- torch_functional


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x = 5 + 3 * torch.randn(6, 41)
    mask = torch.rand(6, 41) > 0.5
    got = V.masked_whiten(x, mask, shift_mean)
    assert_close(got, ref_masked_whiten(x, mask, shift_mean), rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 7)])
def test_logprobs_and_entropy_from_logits(shape):
    vocab = 50257 if shape == (1, 1) else 101
    logits = (3 * torch.randn(*shape, vocab)).requires_grad_()
    labels = torch.randint(0, vocab, shape)
    logp = V.logprobs_from_logits(logits, labels)
    entropy = V.entropy_from_logits(logits)
    ref_logp, ref_ent = ref_logprobs(logits.detach(), labels)
    assert logp.shape == entropy.shape == shape
    assert_close(logp, ref_logp, rtol=1e-5)
    assert_close(entropy, ref_ent, rtol=1e-5)
    z64 = logits.detach().double().requires_grad_()
    (g,) = torch.autograd.grad((logp + entropy).sum(), logits)
    lp64, ent64 = ref_logprobs(z64, labels)
    (ref_g,) = torch.autograd.grad((lp64 + ent64).sum(), z64)
    assert_close(g, ref_g, rtol=1e-5)


def test_logprobs_inplace_backward_never_overwrites_a_leaf():
    leaf = torch.randn(4, 50).requires_grad_()
    kept = leaf.detach().clone()
    labels = torch.randint(0, 50, (4,))
    V.logprobs_from_logits(leaf, labels, inplace_backward=True).sum().backward()
    assert torch.equal(leaf.detach(), kept)
    # logits produced by an op (the lm_head output verl passes) take the in-place backward
    weight = torch.randn(50, 8).requires_grad_()
    hidden = torch.randn(4, 8)
    V.logprobs_from_logits(hidden @ weight.T, labels, inplace_backward=True).sum().backward()
    w64 = weight.detach().double().requires_grad_()
    ref, _ = ref_logprobs(hidden.double() @ w64.T, labels)
    (ref_g,) = torch.autograd.grad(ref.sum(), w64)
    assert_close(weight.grad, ref_g, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_as_verl_does():
    x = policy_inputs(3, 5)
    args = (x["old_log_prob"], x["log_prob"], x["advantages"], x["mask"])
    with pytest.raises(ValueError, match="Invalid loss_agg_mode: sample-mean"):
        V.agg_loss(x["log_prob"], x["mask"], "sample-mean")
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        V.compute_policy_loss_vanilla(*args, "seq-mean", ActorConfig())
    with pytest.raises(ValueError, match="batch_num_tokens is required when dp_size > 1"):
        V.agg_loss(x["log_prob"], x["mask"], "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size is required when dp_size > 1"):
        V.compute_value_loss(
            x["log_prob"], x["log_prob"], x["log_prob"], x["mask"], 0.5, "seq-mean-token-sum", 2
        )
    with pytest.raises(ValueError, match="batch_num_tokens must be a positive"):
        V.agg_loss(x["log_prob"], x["mask"], "token-mean", batch_num_tokens=0)
    for function in (V.compute_policy_loss_vanilla, V.compute_policy_loss_gspo, V.compute_policy_loss_cispo):
        with pytest.raises(AssertionError, match="needs config"):  # verl: assert config is not None
            function(*args)
        with pytest.raises(AttributeError, match="clip_ratio"):  # verl reads config.clip_ratio
            function(*args, config=types.SimpleNamespace(clip_ratio_low=0.2))
    with pytest.raises(AssertionError, match="clip_ratio_c"):
        V.compute_policy_loss_vanilla(*args, config=ActorConfig(clip_ratio_c=1.0))
    with pytest.raises(AssertionError, match="needs config"):
        V.compute_reinforce_plus_plus_outcome_advantage(x["log_prob"], x["mask"])
    with pytest.raises(NotImplementedError, match="'full' is not implemented"):
        V.kl_penalty(x["log_prob"], x["old_log_prob"], "full")
    with pytest.raises(NotImplementedError, match="k4"):
        V.kl_penalty(x["log_prob"], x["old_log_prob"], "k4")
    with pytest.raises(ValueError, match="at least 2"):  # verl: "The sum of the mask is one"
        V.masked_whiten(torch.randn(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="mask must have the shape"):
        V.compute_gae_advantage_return(x["log_prob"], x["log_prob"], x["mask"][:, :2], 1.0, 1.0)
    with pytest.raises(TypeError, match="token_level_rewards must be a torch.Tensor"):
        V.compute_grpo_outcome_advantage([1.0, 2.0], x["mask"], np.array(["a", "b"]))
    with pytest.raises(ValueError, match="index must hold 3 group ids"):
        V.compute_grpo_outcome_advantage(x["log_prob"], x["mask"], np.array(["a", "b"]))


# ----------------------------------------------------------------------------- patch()


def _fake(module_name: str, name: str):
    def function(*args, **kwargs):
        return ("verl", name)

    function.__name__ = function.__qualname__ = name
    function.__module__ = module_name
    return function


@pytest.fixture
def fake_verl(monkeypatch):
    """A fake verl in sys.modules: the defining modules, registries, a module that re-imported
    the functions by name, and one holding a *different* function of the same name."""
    modules = {}
    for name in (
        "verl",
        "verl.trainer",
        "verl.trainer.ppo",
        "verl.utils",
        "verl.workers",
        "verl.workers.utils",
    ):
        modules[name] = types.ModuleType(name)
    core = modules[V.CORE_ALGOS] = types.ModuleType(V.CORE_ALGOS)
    functional = modules[V.TORCH_FUNCTIONAL] = types.ModuleType(V.TORCH_FUNCTIONAL)
    for name in V.CORE_ALGOS_FUNCTIONS:
        setattr(core, name, _fake(V.CORE_ALGOS, name))
    for name in (*V.TORCH_FUNCTIONAL_FUNCTIONS, "masked_mean"):
        setattr(functional, name, _fake(V.TORCH_FUNCTIONAL, name))
    core.verl_F = functional
    core.POLICY_LOSS_REGISTRY = {
        "vanilla": core.compute_policy_loss_vanilla,
        "gspo": core.compute_policy_loss_gspo,
        "cispo": core.compute_policy_loss_cispo,
        "sapo": _fake(V.CORE_ALGOS, "compute_policy_loss_sapo"),
    }
    core.ADV_ESTIMATOR_REGISTRY = {
        "gae": core.compute_gae_advantage_return,
        "grpo": core.compute_grpo_outcome_advantage,
        "rloo": core.compute_rloo_outcome_advantage,
        "reinforce_plus_plus": core.compute_reinforce_plus_plus_outcome_advantage,
        "reinforce_plus_plus_baseline": core.compute_reinforce_plus_plus_baseline_outcome_advantage,
        "remax": _fake(V.CORE_ALGOS, "compute_remax_outcome_advantage"),
    }
    losses = modules["verl.workers.utils.losses"] = types.ModuleType("verl.workers.utils.losses")
    losses.agg_loss, losses.kl_penalty = core.agg_loss, core.kl_penalty
    losses.compute_value_loss, losses.masked_mean = core.compute_value_loss, functional.masked_mean
    losses.my_whiten = functional.masked_whiten  # re-imported under another name: replaced too
    other = modules["verl.experimental.other"] = types.ModuleType("verl.experimental.other")
    other.entropy_from_logits = _fake("verl.experimental.other", "entropy_from_logits")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_patch_replaces_everywhere_and_restore_puts_back(fake_verl):
    core, functional = fake_verl[V.CORE_ALGOS], fake_verl[V.TORCH_FUNCTIONAL]
    losses, other = fake_verl["verl.workers.utils.losses"], fake_verl["verl.experimental.other"]
    before = {
        "core": dict(vars(core)), "functional": dict(vars(functional)), "losses": dict(vars(losses)),
        "policy": dict(core.POLICY_LOSS_REGISTRY), "adv": dict(core.ADV_ESTIMATOR_REGISTRY),
    }  # fmt: skip
    other_entropy = other.entropy_from_logits
    handle = V.patch()
    assert handle.active
    for name in V.CORE_ALGOS_FUNCTIONS:
        assert getattr(core, name) is getattr(V, name)
    for name in V.TORCH_FUNCTIONAL_FUNCTIONS:
        assert getattr(functional, name) is getattr(V, name)
    assert losses.agg_loss is V.agg_loss and losses.kl_penalty is V.kl_penalty
    assert losses.compute_value_loss is V.compute_value_loss and losses.my_whiten is V.masked_whiten
    assert losses.masked_mean is before["losses"]["masked_mean"]  # not ours to replace
    assert other.entropy_from_logits is other_entropy  # same name, different function: untouched
    assert core.POLICY_LOSS_REGISTRY["vanilla"] is V.compute_policy_loss_vanilla
    assert core.POLICY_LOSS_REGISTRY["gspo"] is V.compute_policy_loss_gspo
    assert core.POLICY_LOSS_REGISTRY["sapo"] is before["policy"]["sapo"]
    assert core.ADV_ESTIMATOR_REGISTRY["gae"] is V.compute_gae_advantage_return
    assert (
        core.ADV_ESTIMATOR_REGISTRY["reinforce_plus_plus"] is V.compute_reinforce_plus_plus_outcome_advantage
    )
    assert core.ADV_ESTIMATOR_REGISTRY["remax"] is before["adv"]["remax"]
    assert "verl.workers.utils.losses.my_whiten" in handle.replaced
    assert V.patch().replaced == []  # patching twice replaces nothing twice
    handle.restore()
    assert not handle.active
    assert dict(vars(core)) == before["core"] and dict(vars(functional)) == before["functional"]
    assert dict(vars(losses)) == before["losses"]
    assert before["policy"] == core.POLICY_LOSS_REGISTRY and before["adv"] == core.ADV_ESTIMATOR_REGISTRY
    handle.restore()  # twice: a no-op


def test_patch_as_context_manager_and_for_modules_imported_later(fake_verl, monkeypatch):
    core = fake_verl[V.CORE_ALGOS]
    original = core.agg_loss
    with V.patch():
        late = types.ModuleType("verl.late")
        late.agg_loss = core.agg_loss  # `from core_algos import agg_loss` after the patch
        monkeypatch.setitem(sys.modules, "verl.late", late)
        assert late.agg_loss is V.agg_loss
    assert core.agg_loss is original


def test_patch_without_verl_warns_and_does_nothing(monkeypatch):
    for name in [n for n in sys.modules if n == "verl" or n.startswith("verl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "verl", None)  # import verl -> ModuleNotFoundError
    with pytest.warns(PatchWarning, match="verl is not installed"):
        handle = V.patch()
    assert not handle.active and handle.replaced == []
    handle.restore()
