"""Trainer options on CPU with a tiny Llama: LoRA (adapters only, the reference is the base with
adapters off), bf16 autocast, gradient checkpointing, TensorBoard, the per-iteration callback, the
skipped scoring pass (old log-probs from the update's own forward) and Gymnasium envs."""

from __future__ import annotations

import math

import pytest
import torch
from toy_task import PROMPTS, digit_share, save_tiny_llama

from alignkit.trainer import RLConfig, Trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _trainer(model_dir, **overrides):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    options = dict(
        iterations=2, prompts_per_iteration=4, num_generations=4, max_new_tokens=8, learning_rate=3e-3,
        progress=False, seed=0, tensorboard=False,
    )  # fmt: skip
    env = overrides.pop("env", None)
    reward_fn = overrides.pop("reward_fn", None)
    options.update(overrides)
    inputs = {"env": env} if env is not None else {"reward_fn": digit_share, "prompts": PROMPTS}
    if reward_fn is not None:
        inputs["reward_fn"] = reward_fn
    return Trainer(model, tokenizer, config=RLConfig(**options), **inputs)


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_lora_trains_the_adapters_only_and_resumes(model_dir, tmp_path):
    trainer = _trainer(model_dir, lora_rank=4, kl_coef=0.05, output_dir=str(tmp_path))
    assert trainer.ref_model is None and trainer.reference_is_base  # no copy of the weights
    before = _params(trainer.model)
    history = trainer.train()
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:4]
    assert all(m["kl/mean"] is not None and math.isfinite(m["kl/mean"]) for m in history)
    assert history[-1]["kl/mean"] > 0  # the adapters moved the policy away from the base
    saved = tmp_path / "checkpoint-2" / "model"
    assert (saved / "adapter_config.json").is_file()
    resumed = _trainer(model_dir, lora_rank=4, kl_coef=0.05, output_dir=str(tmp_path))
    resumed.resume("latest")
    assert all(torch.equal(after[k], v) for k, v in _params(resumed.model).items())


def test_bf16_autocast_trains_with_a_small_mismatch(model_dir):
    history = _trainer(model_dir, precision="bf16").train()
    for m in history:
        assert math.isfinite(m["policy/grad_norm"]) and m["policy/grad_norm"] > 0
        assert m["rollout/logprob_mismatch"] < 0.05  # bf16 rounding, not a different distribution


def test_gradient_checkpointing_gives_the_same_update(model_dir):
    plain, checkpointed = _trainer(model_dir), _trainer(model_dir, gradient_checkpointing=True)
    plain.train(), checkpointed.train()
    for name, value in _params(plain.model).items():
        torch.testing.assert_close(_params(checkpointed.model)[name], value, atol=1e-6, rtol=0)


def test_old_log_probs_from_the_update_equal_a_scoring_pass(model_dir):
    fused = _trainer(model_dir, iterations=3)
    scored = _trainer(model_dir, iterations=3)
    assert fused.old_logp_from_update
    scored.old_logp_from_update = False  # the separate no-grad policy pass
    a, b = fused.train(), scored.train()
    for name, value in _params(scored.model).items():
        torch.testing.assert_close(_params(fused.model)[name], value, atol=1e-6, rtol=0)
    for x, y in zip(a, b, strict=True):
        assert x["rollout/logprob_mismatch"] < 1e-5 and y["rollout/logprob_mismatch"] < 1e-5
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
    assert not _trainer(model_dir, ppo_epochs=2).old_logp_from_update
    assert not _trainer(model_dir, rollout_correction="tis").old_logp_from_update


def test_tensorboard_and_the_callback(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    seen = []
    trainer = _trainer(model_dir, iterations=3, tensorboard=True, output_dir=str(tmp_path))
    history = trainer.train(callback=lambda m: seen.append(m["iteration"]) or len(seen) < 2)
    assert [m["iteration"] for m in history] == seen == [0, 1]  # False after the second stops it
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_env_rollouts_train(model_dir, algorithm):
    pytest.importorskip("gymnasium")
    trainer = _trainer(
        model_dir, env="alignkit/GuessNumber-v0", algorithm=algorithm, max_new_tokens=3, max_turns=3,
        max_total_tokens=64,
    )  # fmt: skip
    history = trainer.train()
    for m in history:
        assert m["env/steps"] >= 16 and 1 <= m["env/turns_mean"] <= 3
        assert m["rollout/logprob_mismatch"] < 1e-4  # observation tokens are never scored as samples
        # Response length counts the model's tokens only (at most 3 turns x 3 tokens).
        assert m["response_length/mean"] <= 9
        assert math.isfinite(m["policy/grad_norm"])


def test_env_setups_are_checked(model_dir):
    pytest.importorskip("gymnasium")
    with pytest.raises(ValueError, match="either env= or reward_fn="):
        _trainer(model_dir, env="alignkit/GuessNumber-v0", reward_fn=digit_share)
    with pytest.raises(ValueError, match="dapo"):
        _trainer(model_dir, env="alignkit/GuessNumber-v0", algorithm="dapo")
    with pytest.raises(ValueError, match="not a registered Gymnasium id"):
        _trainer(model_dir, env="alignkit/NoSuchEnv-v0")


def test_lora_adapters_are_seeded_and_checkpointing_matches(model_dir):
    """The adapters' initialisation follows config.seed (not the global generator: two trainers in
    one process start equal, another seed differs); LoRA under gradient checkpointing still
    forwards each prompt once and trains what the same run without checkpointing trains."""
    plain = _trainer(model_dir, lora_rank=4, kl_coef=0.05)
    checkpointed = _trainer(model_dir, lora_rank=4, kl_coef=0.05, gradient_checkpointing=True)
    other = _params(_trainer(model_dir, lora_rank=4, kl_coef=0.05, seed=1).model)
    start = _params(plain.model)
    assert all(torch.equal(_params(checkpointed.model)[k], v) for k, v in start.items())
    assert any(not torch.equal(other[k], v) for k, v in start.items() if "lora_A" in k)
    assert plain.share_prompts and checkpointed.share_prompts
    plain.train(), checkpointed.train()
    for name, value in _params(plain.model).items():
        torch.testing.assert_close(_params(checkpointed.model)[name], value, atol=1e-6, rtol=0)
