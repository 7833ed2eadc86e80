"""alignkit.compat against the real peers, when installed (the bench extra; skipped in CI, where
they are absent): every compat function against the verl / TRL function it replaces on random
inputs (fp32, within 1e-6 relative: ``assert_close`` with the summands' magnitude as the absolute
scale), patch()/restore() on the real modules, and two TRL GRPO steps patched vs unpatched.

Run with the peers on the path, e.g. ``PYTHONPATH=<dir with verl, trl and their deps> pytest
tests/test_compat_peers.py``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import assert_close

import alignkit
from alignkit.compat import trl as T
from alignkit.compat import verl as V


def _import_peer(name):
    with warnings.catch_warnings():  # peers' import-time deprecation notices are not ours to fail on
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            pytest.skip(f"peer {name} not installed ({exc})", allow_module_level=True)


RTOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def close(actual, expected, name, scale=None):
    if isinstance(actual, dict):
        assert actual.keys() == expected.keys(), (name, actual.keys(), expected.keys())
        for key in actual:
            assert actual[key] == pytest.approx(expected[key], rel=RTOL, abs=1e-7), (name, key)
        return
    assert_close(actual, expected, rtol=RTOL, scale=scale, name=name)


# ----------------------------------------------------------------------------- verl


@pytest.fixture(scope="module")
def verl():
    core = _import_peer(V.CORE_ALGOS)
    functional = _import_peer(V.TORCH_FUNCTIONAL)
    config = _import_peer("verl.workers.config")
    return core, functional, config


def actor_config(config_module, **fields):
    return config_module.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


def verl_batch(B=8, T=33):
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1
    mask[2, 5:9] = 0  # an observation span
    logp = -3 * torch.rand(B, T)
    return {
        "rewards": torch.randn(B, T),
        "values": torch.randn(B, T),
        "mask": mask,
        "log_prob": logp,
        "old_log_prob": logp + 0.4 * torch.randn(B, T),
        "advantages": torch.randn(B, T),
        "weights": 2 * torch.rand(B, T),
        "uid": np.array([f"p{i % 3}" for i in range(B)], dtype=object),
    }


def same_signature(ours, theirs):
    """Parameter names, kinds and defaults equal (annotations may differ)."""
    a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    assert [(p.name, p.kind, p.default) for p in a.values()] == [
        (p.name, p.kind, p.default) for p in b.values()
    ], ours.__name__


def test_verl_signatures(verl):
    core, functional, _ = verl
    for name in V.CORE_ALGOS_FUNCTIONS:
        same_signature(getattr(V, name), getattr(core, name))
    for name in V.TORCH_FUNCTIONAL_FUNCTIONS:
        same_signature(getattr(V, name), getattr(functional, name))


def test_verl_advantages(verl):
    core, _, _ = verl
    x = verl_batch()
    for i in (0, 1):
        close(
            V.compute_gae_advantage_return(x["rewards"], x["values"], x["mask"], 0.99, 0.95)[i],
            core.compute_gae_advantage_return(x["rewards"], x["values"], x["mask"], 0.99, 0.95)[i],
            f"gae {i}",
        )
    for norm in (True, False):
        close(
            V.compute_grpo_outcome_advantage(x["rewards"], x["mask"], x["uid"], norm_adv_by_std_in_grpo=norm)[
                0
            ],
            core.compute_grpo_outcome_advantage(
                x["rewards"], x["mask"], x["uid"], norm_adv_by_std_in_grpo=norm
            )[0],
            f"grpo {norm}",
        )
    for name in ("compute_rloo_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage"):
        close(
            getattr(V, name)(x["rewards"], x["mask"], x["uid"])[0],
            getattr(core, name)(x["rewards"], x["mask"], x["uid"])[0],
            name,
        )
    config = {"gamma": 0.9}

    class AlgoConfig:
        gamma = 0.9

    for i in (0, 1):
        close(
            V.compute_reinforce_plus_plus_outcome_advantage(x["rewards"], x["mask"], config=config)[i],
            core.compute_reinforce_plus_plus_outcome_advantage(x["rewards"], x["mask"], config=AlgoConfig())[
                i
            ],
            f"reinforce++ {i}",
        )


@pytest.mark.parametrize("mode", V.LOSS_AGG_MODES)
@pytest.mark.parametrize(
    "info", [{}, {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 16, "loss_scale_factor": 40}]
)
def test_verl_losses(verl, mode, info):
    core, _, config_module = verl
    x = verl_batch()
    x["old_log_prob"][0, 1] = x["log_prob"][0, 1] - 25.0  # a |log-ratio| > 20 (verl's GSPO does not clamp)
    config = actor_config(config_module, clip_ratio_low=0.2, clip_ratio_high=0.28)
    config.global_batch_info.update(info)
    for name in ("compute_policy_loss_vanilla", "compute_policy_loss_gspo", "compute_policy_loss_cispo"):
        ours_lp, theirs_lp = x["log_prob"].clone().requires_grad_(), x["log_prob"].clone().requires_grad_()
        ours = getattr(V, name)(
            x["old_log_prob"], ours_lp, x["advantages"], x["mask"], mode, config, x["weights"]
        )
        theirs = getattr(core, name)(
            x["old_log_prob"], theirs_lp, x["advantages"], x["mask"], mode, config, x["weights"]
        )
        magnitude = float(core.agg_loss((x["advantages"] * 2).abs(), x["mask"], mode, **info))
        close(ours[0], theirs[0], f"{name} {mode}", scale=magnitude)
        close(ours[1], theirs[1], f"{name} metrics")
        ours[0].backward()
        theirs[0].backward()
        close(ours_lp.grad, theirs_lp.grad, f"{name} gradient")
    loss = torch.randn(8, 33)
    magnitude = float(core.agg_loss(loss.abs(), x["mask"], mode, **info))
    close(
        V.agg_loss(loss, x["mask"], mode, **info),
        core.agg_loss(loss, x["mask"], mode, **info),
        "agg",
        magnitude,
    )
    vpreds = x["values"] + 0.5 * torch.randn(8, 33)
    for i in (0, 1):
        close(
            V.compute_value_loss(vpreds, x["rewards"], x["values"], x["mask"], 0.2, mode, **info)[i],
            core.compute_value_loss(vpreds, x["rewards"], x["values"], x["mask"], 0.2, mode, **info)[i],
            f"value {i}",
        )


@pytest.mark.parametrize("name", [n + suffix for n in V.KL_PENALTIES for suffix in ("", "+")])
def test_verl_kl_penalty(verl, name):
    # fp64: verl's k3 is exp(u) - u - 1, whose fp32 rounding near u = 0 is larger than the value
    core, _, _ = verl
    logp = -3 * torch.rand(6, 40, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(6, 40, dtype=torch.float64)
    ours_x, theirs_x = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    ours, theirs = V.kl_penalty(ours_x, ref, name), core.kl_penalty(theirs_x, ref, kl_penalty=name)
    close(ours, theirs, name)
    ours.sum().backward()
    theirs.sum().backward()
    close(ours_x.grad, theirs_x.grad, f"{name} gradient")
    for bad in ("full", "k4"):
        with pytest.raises(NotImplementedError):
            core.kl_penalty(logp, ref, bad)
        with pytest.raises(NotImplementedError):
            V.kl_penalty(logp, ref, bad)


def test_verl_torch_functional(verl):
    _, functional, _ = verl
    x = verl_batch()
    for shift in (True, False):
        close(
            V.masked_whiten(x["rewards"], x["mask"], shift),
            functional.masked_whiten(x["rewards"], x["mask"], shift),
            "whiten",
        )
    logits = 3 * torch.randn(4, 9, 1000)
    labels = torch.randint(0, 1000, (4, 9))
    close(V.logprobs_from_logits(logits, labels), functional.logprobs_from_logits(logits, labels), "logprobs")
    close(V.entropy_from_logits(logits), functional.entropy_from_logits(logits), "entropy")
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        verl[0].agg_loss(logits[..., 0], x["mask"][:4, :9], "sample-mean")


def test_verl_patch_and_restore(verl):
    core, functional, _ = verl
    losses = _import_peer("verl.workers.utils.losses")
    original = {name: getattr(core, name) for name in V.CORE_ALGOS_FUNCTIONS}
    with V.patch() as handle:
        assert handle.active
        for name in V.CORE_ALGOS_FUNCTIONS:
            assert getattr(core, name) is getattr(V, name)
        for name in V.TORCH_FUNCTIONAL_FUNCTIONS:
            assert getattr(functional, name) is getattr(V, name)
        assert losses.agg_loss is V.agg_loss and losses.kl_penalty is V.kl_penalty
        assert losses.compute_value_loss is V.compute_value_loss
        assert core.get_policy_loss_fn("vanilla") is V.compute_policy_loss_vanilla
        assert core.get_policy_loss_fn("gspo") is V.compute_policy_loss_gspo
        assert core.get_adv_estimator_fn("grpo") is V.compute_grpo_outcome_advantage
        assert (
            core.get_adv_estimator_fn("reinforce_plus_plus")
            is V.compute_reinforce_plus_plus_outcome_advantage
        )
    assert {name: getattr(core, name) for name in V.CORE_ALGOS_FUNCTIONS} == original
    assert core.get_policy_loss_fn("vanilla") is original["compute_policy_loss_vanilla"]
    assert losses.agg_loss is original["agg_loss"]


# ----------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl_utils():
    return _import_peer(T.UTILS)


def test_trl_signatures(trl_utils):
    for name in T.UTILS_FUNCTIONS:
        if hasattr(trl_utils, name):
            same_signature(getattr(T, name), getattr(trl_utils, name))


def test_trl_helpers(trl_utils):
    logits = 3 * torch.randn(3, 11, 2000)
    index = torch.randint(0, 2000, (3, 11))
    row_mask = torch.rand(3, 11) > 0.3
    for temperature in (1.0, 0.7):
        close(
            T.selective_log_softmax(logits, index, temperature, row_mask),
            trl_utils.selective_log_softmax(logits, index, temperature, row_mask),
            "selective_log_softmax",
        )
    top = torch.randint(0, 2000, (3, 11, 4))
    close(T.selective_log_softmax(logits, top), trl_utils.selective_log_softmax(logits, top), "top-k")
    close(T.entropy_from_logits(logits), trl_utils.entropy_from_logits(logits), "entropy")
    if hasattr(trl_utils, "selective_log_softmax_and_entropy"):
        ours = T.selective_log_softmax_and_entropy(logits, index, False, 1.3, row_mask)
        theirs = trl_utils.selective_log_softmax_and_entropy(logits, index, False, 1.3, row_mask)
        for a, b in zip(ours, theirs, strict=True):
            close(a, b, "selective_log_softmax_and_entropy")


def test_trl_patch_and_restore(trl_utils):
    grpo = _import_peer(T.GRPO_TRAINER)
    method = grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD]
    originals = {name: getattr(trl_utils, name) for name in T.UTILS_FUNCTIONS if hasattr(trl_utils, name)}
    with T.patch() as handle:
        for name in originals:
            assert getattr(trl_utils, name) is getattr(T, name)
        assert grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD].__wrapped__ is method
        assert handle.active
    assert {name: getattr(trl_utils, name) for name in originals} == originals
    assert grpo.GRPOTrainer.__dict__[T.PER_TOKEN_METHOD] is method


def _bench_compat():
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("bench_compat")


def _train_two_steps(patched: bool, count_calls: list[int]):
    bench = _bench_compat()
    fused = alignkit.fused_linear_logprobs

    def counting(*args, **kwargs):
        count_calls.append(1)
        return fused(*args, **kwargs)

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = T.patch() if patched else None
        try:
            alignkit.fused_linear_logprobs = counting  # the compat module calls alignkit.<op>
            trainer = bench.grpo_trainer(
                out,
                completions=4,
                completion_length=12,
                vocab=1000,
                max_steps=2,
                logging_steps=1,
                learning_rate=1e-2,
            )
            trainer.train()
        finally:
            alignkit.fused_linear_logprobs = fused
            if handle is not None:
                handle.restore()
    return [log for log in trainer.state.log_history if "loss" in log]


def test_trl_grpo_two_steps_patched_equal_unpatched(trl_utils):
    _import_peer("datasets")
    plain_calls, patched_calls = [], []
    plain = _train_two_steps(False, plain_calls)
    patched = _train_two_steps(True, patched_calls)
    assert not plain_calls and patched_calls  # the patched trainer scored with the fused op
    assert len(plain) == len(patched) == 2
    for step, (a, b) in enumerate(zip(plain, patched, strict=True)):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key in ("step_time",) or not isinstance(value, float):
                continue
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key, value, b[key])
