"""The trainer on CPU with a tiny Llama and a character tokenizer (built from scratch, saved and
reloaded with from_pretrained): each algorithm raises a toy reward, resume is exact, rollout /
trainer log-probs agree, and bad configurations fail before any compute."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy_task import PROMPTS, digit_share, save_tiny_llama

import alignkit
from alignkit.demo import char_tokenizer, tiny_llama
from alignkit.trainer import RewardError, RLConfig, Trainer

TIME_KEYS = ("time/rollout_s", "time/train_s", "tokens_per_s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=64, intermediate_size=128)


def _trainer(model_dir, **overrides):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    options = dict(
        iterations=30, prompts_per_iteration=4, num_generations=4, max_new_tokens=10, learning_rate=3e-3,
        progress=False, seed=0,
    )  # fmt: skip
    options.update(overrides)
    return Trainer(model, tokenizer, reward_fn=digit_share, prompts=PROMPTS, config=RLConfig(**options))


def _first_last(history, key="reward/mean", k=3):
    values = [m[key] for m in history]
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.mark.parametrize(
    ("algorithm", "options"),
    [
        ("grpo", {}),
        ("dr_grpo", {}),
        ("dapo", {}),
        ("rloo", {}),
        ("reinforce++", {"kl_coef": 0.01, "kl_in_reward": True}),
        ("reinforce++-baseline", {}),
        ("grpo", {"loss_type": "gspo"}),
        ("grpo", {"loss_type": "cispo", "ppo_epochs": 2}),
        ("grpo", {"kl_coef": 0.05, "top_k": 12}),
        ("grpo", {"rollout_correction": "tis", "top_p": 0.9}),
        ("ppo", {}),
        ("ppo", {"kl_coef": 0.01, "kl_in_reward": True, "ppo_epochs": 2}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_each_algorithm_raises_the_reward(model_dir, algorithm, options):
    history = _trainer(model_dir, algorithm=algorithm, **options).train()
    assert len(history) == 30
    first, last = _first_last(history)
    assert last > first + 0.1, f"{algorithm}: reward {first:.3f} -> {last:.3f}"
    for m in history:
        assert m["rollout/logprob_mismatch"] < 1e-4, m["rollout/logprob_mismatch"]  # fp32 parity
        assert math.isfinite(m["entropy/mean"]) and m["entropy/mean"] >= 0
        if options.get("kl_coef"):
            assert m["kl/mean"] is not None and math.isfinite(m["kl/mean"]) and m["kl/mean"] >= 0
        else:
            assert m["kl/mean"] is None


@pytest.mark.parametrize("seed", [1, 2])
def test_grpo_learns_over_seeds(model_dir, seed):
    history = _trainer(model_dir, seed=seed).train()
    first, last = _first_last(history)
    assert last > first + 0.1, f"seed {seed}: reward {first:.3f} -> {last:.3f}"


def _critic(tokenizer):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(config)


def test_ppo_with_a_separate_critic_learns(model_dir):
    trainer = _trainer(model_dir, algorithm="ppo")
    trainer = Trainer(
        trainer.model, trainer.tokenizer, reward_fn=digit_share, prompts=PROMPTS, config=trainer.config,
        critic=_critic(trainer.tokenizer),
    )  # fmt: skip
    assert trainer.value_head is None and trainer.critic is not None
    before = [p.detach().clone() for p in trainer.critic.parameters()]
    history = trainer.train()
    first, last = _first_last(history)
    assert last > first + 0.1, f"ppo + critic: reward {first:.3f} -> {last:.3f}"
    assert all(math.isfinite(m["value/loss"]) for m in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.critic.parameters(), strict=True))
    # The value targets are learned: the critic's value of the rollout states tracks the reward.
    assert abs(history[-1]["value/mean"] - history[-1]["reward/mean"]) < 0.3


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_resume_continues_exactly(model_dir, tmp_path, algorithm):
    full = _trainer(model_dir, algorithm=algorithm, iterations=4, output_dir=str(tmp_path / "full")).train()
    part = _trainer(
        model_dir, algorithm=algorithm, iterations=4, save_every=2, output_dir=str(tmp_path / "part")
    )
    part.config.iterations = 2
    part.train()
    resumed = _trainer(model_dir, algorithm=algorithm, iterations=4, output_dir=str(tmp_path / "part"))
    rest = resumed.train(resume_from="latest")
    assert [m["iteration"] for m in rest] == [2, 3]
    for a, b in zip(full[2:], rest, strict=True):
        for key, value in a.items():
            if key not in TIME_KEYS:
                assert b[key] == value, (key, value, b[key])
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3]
    saved = sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]


def test_metrics_have_the_documented_keys(model_dir, tmp_path):
    history = _trainer(model_dir, iterations=1, output_dir=str(tmp_path)).train()
    keys = {
        "iteration", "reward/mean", "reward/std", "kl/mean", "entropy/mean", "response_length/mean",
        "policy/clipfrac", "rollout/logprob_mismatch", "time/rollout_s", "time/train_s", "tokens_per_s",
    }  # fmt: skip
    assert keys <= set(history[0])
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == json.loads(json.dumps(history[0]))
    # The checkpoint's model is from_pretrained-loadable.
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1" / "model")


@pytest.mark.parametrize(
    ("reward", "pattern"),
    [
        (lambda p, c, **m: 1 / 0, "reward function .* raised ZeroDivisionError"),
        (lambda p, c, **m: [0.0], "returned 1 scores for 16 completions"),
        (lambda p, c, **m: [float("nan")] * len(c), "returned nan for sample 0"),
    ],
    ids=["raises", "wrong-length", "nan"],
)
def test_a_bad_reward_stops_with_a_clear_message(model_dir, reward, pattern):
    trainer = _trainer(model_dir, iterations=1)
    trainer.reward = alignkit.trainer.RewardFunction(reward)
    with pytest.raises(RewardError, match=pattern):
        trainer.train()


async def _async_digits(prompts, completions, **meta):
    return digit_share(prompts, completions)


def test_async_and_weighted_rewards(model_dir):
    trainer = _trainer(model_dir, iterations=1)
    trainer.reward = alignkit.trainer.RewardFunction([digit_share, _async_digits], reward_weights=[0.5, 0.5])
    (m,) = trainer.train()
    assert m["reward/digit_share"] == pytest.approx(m["reward/_async_digits"])
    assert m["reward/mean"] == pytest.approx(m["reward/digit_share"], abs=1e-6)


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"algorithm": "ppo2"}, ValueError, "algorithm must be one of"),
        ({"loss_type": "clip"}, ValueError, "loss_type must be one of"),
        ({"num_generations": 1}, ValueError, "num_generations must be >= 2"),
        ({"learning_rate": 0}, ValueError, "learning_rate"),
        ({"iterations": 1.5}, TypeError, "iterations"),
        ({"kl_in_reward": True, "kl_coef": 0.1}, ValueError, "kl_in_reward"),
        ({"top_p": 0}, ValueError, "top_p"),
        ({"agg": "mean"}, ValueError, "agg must be one of"),
        ({"algorithm": "ppo", "gae_lambda": 1.5}, ValueError, "gae_lambda"),
        ({"algorithm": "ppo", "vf_coef": -1}, ValueError, "vf_coef"),
        ({"algorithm": "ppo", "critic_learning_rate": 0}, ValueError, "critic_learning_rate"),
    ],
)
def test_config_errors_name_the_field(options, error, pattern):
    with pytest.raises(error, match=pattern):
        RLConfig(**options)


def test_config_from_mapping_and_overrides():
    cfg = RLConfig.from_dict({"algorithm": "dapo"}, ["learning_rate=1e-4", 'stop=["\\n"]'])
    assert cfg.algorithm == "dapo" and cfg.learning_rate == 1e-4 and cfg.stop == ["\n"]
    assert cfg.clip_high == 0.28 and cfg.agg == "token-mean"
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lr'\]"):
        RLConfig.from_dict({}, ["lr=1"])


def test_trainer_refuses_bad_setups_before_compute(model_dir):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
        Trainer(model, tokenizer, reward_fn=digit_share, prompts=[])
    with pytest.raises(ValueError, match="critic is for a value-based algorithm"):
        Trainer(model, tokenizer, reward_fn=digit_share, prompts=PROMPTS, critic=torch.nn.Linear(2, 1))
    with pytest.raises(TypeError, match="critic must be a torch.nn.Module"):
        Trainer(model, tokenizer, reward_fn=digit_share, prompts=PROMPTS, critic=object(),
                config=RLConfig(algorithm="ppo"))  # fmt: skip
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        RLConfig(prompts_per_iteration=0)
    with pytest.raises(TypeError, match="reward_fn entries must be callable"):
        Trainer(model, tokenizer, reward_fn=[3], prompts=PROMPTS)


def _unfused_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, *, bias, temperature, config,
                      ref_logp, is_weights, logit_floor):  # fmt: skip
    """fused_linear_ppo_loss's definition: the fused log-probs, then ppo_policy_loss."""
    logp, entropy = alignkit.fused_linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
        logit_floor=logit_floor,
    )  # fmt: skip
    return alignkit.ppo_policy_loss(
        logp, old_logp, advantages, mask, config=config, entropy=entropy, ref_logp=ref_logp,
        is_weights=is_weights,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        dict(algorithm="grpo", ppo_epochs=2, kl_coef=0.05, top_k=7, entropy_coef=0.01, minibatch_tokens=64),
        dict(algorithm="ppo", rollout_correction="tis"),
    ],
    ids=["grpo-epochs-kl-topk", "ppo-tis"],
)
def test_fused_ppo_loss_trains_what_its_definition_trains(model_dir, monkeypatch, options):
    """With old log-probs from the scoring pass the update's loss is fused_linear_ppo_loss (hidden
    states to the loss in one pass): a run equals one whose loss is the op's definition."""
    import alignkit.trainer.trainer as trainer_module

    def run():
        torch.manual_seed(0)
        trainer = _trainer(model_dir, iterations=3, **options)
        assert not trainer.old_logp_from_update
        return trainer, trainer.train()

    fused, fused_history = run()
    if options.get("kl_coef"):  # the reference is scored untruncated: a finite KL under top-k
        assert all(math.isfinite(m["kl/mean"]) for m in fused_history)
    calls = []

    def unfused(*args, **kwargs):
        calls.append(1)
        return _unfused_ppo_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_linear_ppo_loss", unfused)
    plain, plain_history = run()
    assert calls
    for a, b in zip(fused_history, plain_history, strict=True):
        for key, value in b.items():
            if key in TIME_KEYS or not isinstance(value, float):
                continue
            assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-5), (a["iteration"], key)
    for p, q in zip(fused.trainable_parameters(), plain.trainable_parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5
