"""The trainer's shared-prompt forwards (``share_prompts``, alignkit/trainer/response_scoring.py)
train what whole rows train: same metrics and parameters after a few optimizer steps, for GRPO with a
KL reference and top-k truncation, PPO with its value head, a separate critic, several epochs and
several minibatches; and the rows a group repeats are forwarded once."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from toy_task import PROMPTS, digit_share, save_tiny_llama

import alignkit.trainer.response_scoring as response_scoring
import alignkit.trainer.trainer as trainer_module
from alignkit.trainer import RLConfig, Trainer
from alignkit.trainer.group_minibatches import plan_group_minibatches, split_by_length


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _run(model_dir, share, critic=False, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    options = dict(
        iterations=3, prompts_per_iteration=4, num_generations=4, max_new_tokens=8, learning_rate=3e-3,
        progress=False, seed=0, tensorboard=False, share_prompts=share,
    )  # fmt: skip
    options.update(overrides)
    value_model = None
    if critic:
        value_model = transformers.AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1)
    env = options.pop("env", None)
    inputs = {"env": env} if env is not None else {"reward_fn": digit_share, "prompts": PROMPTS}
    trainer = Trainer(model, tokenizer, config=RLConfig(**options), critic=value_model, **inputs)
    history = trainer.train()
    return trainer, history


CASES = {
    "grpo-kl-topk": dict(algorithm="grpo", kl_coef=0.1, top_k=9),
    "grpo-minibatches-epochs": dict(algorithm="grpo", minibatch_tokens=64, ppo_epochs=2),
    "dapo-top-p": dict(algorithm="dapo", top_p=0.9, temperature=0.8),
    "ppo-value-head": dict(algorithm="ppo", num_generations=2),
    "rloo-gspo": dict(algorithm="rloo", loss_type="gspo"),
    # multi-turn episodes: observation tokens inside the response span, never trained
    "env-ppo": dict(
        algorithm="ppo", env="alignkit/GuessNumber-v0", max_new_tokens=3, max_turns=3, max_total_tokens=64
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_prompts_train_what_whole_rows_train(model_dir, case):
    if "env" in CASES[case]:
        pytest.importorskip("gymnasium")
    shared, shared_history = _run(model_dir, True, **CASES[case])
    whole, whole_history = _run(model_dir, False, **CASES[case])
    assert shared.share_prompts and not whole.share_prompts
    for a, b in zip(shared_history, whole_history, strict=True):
        for key, value in b.items():
            if key.startswith("time/") or key == "tokens_per_s" or not isinstance(value, float):
                continue
            assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-5), (case, a["iteration"], key)
    for (name, p), q in zip(shared.model.named_parameters(), whole.model.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5, (case, name)


def test_shared_prompts_with_a_critic(model_dir):
    shared, shared_history = _run(model_dir, True, critic=True, algorithm="ppo", num_generations=2)
    whole, whole_history = _run(model_dir, False, critic=True, algorithm="ppo", num_generations=2)
    for a, b in zip(shared_history, whole_history, strict=True):
        assert math.isclose(a["reward/mean"], b["reward/mean"], rel_tol=1e-6)
        for key in ("value/loss", "value/mean", "policy/loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), key
    for p, q in zip(shared.critic.parameters(), whole.critic.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-5


def test_shared_prompts_forward_each_prompt_once(model_dir, monkeypatch):
    """The update's forward runs the distinct prompts (4) once, not the 16 rows."""
    calls = []
    real = response_scoring.shared_prompt_hidden

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append((prompt_ids.shape[0], args[1].shape[0]))  # (prompts, response rows)
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(response_scoring, "shared_prompt_hidden", counting)
    _run(model_dir, True, iterations=1)
    assert calls == [(4, 16)]


def test_gradient_checkpointing_still_shares_prompts(model_dir):
    checkpointed, history = _run(model_dir, True, iterations=2, gradient_checkpointing=True)
    plain, plain_history = _run(model_dir, True, iterations=2)
    assert checkpointed.share_prompts and plain.share_prompts
    assert [m["reward/mean"] for m in history] == [m["reward/mean"] for m in plain_history]
    for (name, a), b in zip(checkpointed.model.named_parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_group_minibatches_keep_groups_and_the_budget():
    g = torch.Generator().manual_seed(0)
    prompt = torch.tensor([5] * 4 + [3] * 4 + [7] * 4)
    response = torch.tensor([4, 6, 2, 6, 1, 1, 3, 2, 8, 8, 8, 8])
    groups = torch.arange(3).repeat_interleave(4)
    for budget in (200, 40, 30):
        plan = plan_group_minibatches(prompt, response, groups, max_tokens=budget, generator=g)
        assert sorted(r for rows in plan for r in rows) == list(range(12))
        for rows in plan:
            members = {int(groups[r]) for r in rows}
            cost = len(members) * max(int(prompt[r]) for r in rows) + len(rows) * max(
                int(response[r]) for r in rows
            )
            assert cost <= budget, (budget, rows)
            if budget >= 40:  # every group fits alone: none is split
                assert all(sum(int(groups[r]) == m for r in rows) == 4 for m in members)
    assert len(plan_group_minibatches(prompt, response, groups, max_tokens=200, generator=g)) == 1
    split = plan_group_minibatches(prompt, response, groups, max_tokens=30, generator=g)
    assert any(len(rows) < 4 for rows in split)  # group 2 (7 + 4 x 8 = 39 tokens) is split
    with pytest.raises(ValueError, match="minibatch_tokens"):
        plan_group_minibatches(prompt, response, groups, max_tokens=14, generator=g)


def test_minibatches_forward_whole_groups(model_dir, monkeypatch):
    """With a budget of about two groups, every shared forward holds whole groups of 4 rows (the
    planner's minibatches, not cut further by response length here)."""
    monkeypatch.setattr(trainer_module, "split_by_length", lambda rows, *args, **kwargs: [rows])
    calls = []
    real = response_scoring.shared_prompt_hidden

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append((prompt_ids.shape[0], args[1].shape[0]))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(response_scoring, "shared_prompt_hidden", counting)
    _run(model_dir, True, iterations=1, minibatch_tokens=90)
    assert sum(rows for _, rows in calls) == 16 and len(calls) > 1
    assert all(rows == 4 * prompts for prompts, rows in calls), calls


def test_split_by_length_cuts_where_padding_pays():
    """Long, spread responses: two parts of similar length; short ones: one part (an extra forward
    would cost more than the padding it saves); every row once; a group split across parts counts
    its prompt in each."""
    g = torch.Generator().manual_seed(0)
    groups = [r // 8 for r in range(64)]
    prompts = [11] * 64
    spread = (torch.randint(35, 65, (64,), generator=g)).tolist()
    parts = split_by_length(list(range(64)), prompts, spread, groups)
    assert len(parts) > 1 and sorted(r for p in parts for r in p) == list(range(64))
    assert max(spread[r] for r in parts[0]) < 64  # the shorter part pads to less than the longest
    short = torch.randint(14, 25, (64,), generator=g)
    short[::7] = 24  # the small trainer benchmark's lengths: two parts would save 2.5%, not worth it
    short = short.tolist()
    assert split_by_length(list(range(64)), prompts, short, groups) == [
        sorted(range(64), key=lambda r: (short[r], groups[r]))
    ]
    assert len(split_by_length(list(range(64)), prompts, [20] * 64, groups)) == 1
    # long prompts make cutting groups apart expensive: the same responses stay together
    assert len(split_by_length(list(range(64)), [4000] * 64, spread, groups)) == 1
    assert split_by_length([], [], [], []) == [] and split_by_length([3], prompts, spread, groups) == [[3]]


def test_length_parts_train_what_one_minibatch_trains(model_dir, monkeypatch):
    """The parts' gradients add up to the one minibatch's (one optimizer step per epoch, global
    normalisers): the same parameters and metrics, with more forwards."""
    calls = []
    real = response_scoring.shared_prompt_hidden

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append(args[1].shape[0])
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(response_scoring, "shared_prompt_hidden", counting)
    # halves by response length, whatever the lengths are (the rule's choice is tested above)
    halves = lambda rows, p, r, g: [sorted(rows, key=r.__getitem__)[: len(rows) // 2],  # noqa: E731
                                    sorted(rows, key=r.__getitem__)[len(rows) // 2 :]]  # fmt: skip
    monkeypatch.setattr(trainer_module, "split_by_length", halves)
    split, split_history = _run(model_dir, True, iterations=2, algorithm="grpo", kl_coef=0.1)
    assert calls == [16, 8, 8] * 2  # the KL's scoring pass, then the update's two parts
    monkeypatch.setattr(trainer_module, "split_by_length", lambda rows, *args, **kwargs: [rows])
    whole, whole_history = _run(model_dir, True, iterations=2, algorithm="grpo", kl_coef=0.1)
    for a, b in zip(split_history, whole_history, strict=True):
        for key in ("reward/mean", "kl/mean", "entropy/mean", "policy/clipfrac"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), key
    for (name, p), q in zip(split.model.named_parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
