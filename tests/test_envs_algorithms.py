"""alignkit.envs.PPO / GRPO, the Stable-Baselines3 front over the trainer: the classic loop with a
language model, learn()'s timestep count and callback, save / load, bad arguments."""

from __future__ import annotations

import gymnasium
import pytest
import torch
from toy_task import save_tiny_llama

import alignkit.envs as envs
from alignkit.rollout import RolloutEngine

ENV = "alignkit/GuessNumber-v0"
SMALL = {"prompts_per_iteration": 2, "num_generations": 2, "max_new_tokens": 3, "max_turns": 3,
         "max_total_tokens": 48}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Llama and the char tokenizer, saved and reloaded (from_pretrained)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def fresh(saved):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(saved)
    return model, transformers.AutoTokenizer.from_pretrained(saved)


def play(agent, env, *, seed=None, options=None, deterministic=True):
    """The SB3 loop, the conversation carried in predict's state; returns (replies, rewards, state)."""
    obs, _info = env.reset(seed=seed, options=options)
    state, replies, rewards = None, [], []
    while True:
        action, state = agent.predict(obs, state=state, deterministic=deterministic)
        obs, reward, terminated, truncated, _info = env.step(action)
        replies.append(action)
        rewards.append(reward)
        if terminated or truncated:
            return replies, rewards, state


def test_classic_loop_with_a_language_model(saved):
    model, tokenizer = fresh(saved)
    agent = envs.GRPO(model, ENV, tokenizer=tokenizer, **SMALL)
    env = gymnasium.make(ENV)
    obs, _info = env.reset(seed=0)
    action, _ = agent.predict(obs, deterministic=True)
    assert isinstance(action, str) and action == agent.predict(obs, deterministic=True)[0]  # greedy
    obs, reward, terminated, truncated, _info = env.step(action)
    assert isinstance(obs, str) and isinstance(reward, float) and not (terminated and truncated)
    sampled, _ = agent.predict("guess 1-16:", deterministic=False)
    assert isinstance(sampled, str)
    # No env: predict still works (the SB3 load-then-predict path); learn asks for one.
    bare = envs.PPO(model, tokenizer=tokenizer, **SMALL)
    assert bare.trainer is None and bare.predict(env.reset(seed=0)[0], deterministic=True)[0] == action
    with pytest.raises(ValueError, match="learn needs an env"):
        bare.learn(total_timesteps=4)


def test_predict_state_rebuilds_the_collectors_token_history(saved):
    """Greedy predict, turn by turn with its state, sees exactly the ids collect_episodes builds."""
    model, tokenizer = fresh(saved)
    agent = envs.GRPO(model, tokenizer=tokenizer, **SMALL)
    env = envs.GuessNumberEnv(max_turns=3)
    episodes = envs.collect_episodes(
        RolloutEngine(model, tokenizer), [env], tokenizer=tokenizer, max_turns=3, max_total_tokens=48,
        max_new_tokens=3, temperature=0.0, seed=5,
    )  # fmt: skip
    replies, rewards, state = play(agent, envs.GuessNumberEnv(max_turns=3), options={"secret": env.secret})
    assert replies == episodes.replies[0]
    assert sum(rewards) == pytest.approx(float(episodes.returns[0]))
    ids = episodes.input_ids()[0][episodes.attention_mask()[0].bool()].tolist()
    assert list(state.ids) == ids


def test_learn_counts_env_steps_and_stops_at_or_after_total_timesteps(saved):
    model, tokenizer = fresh(saved)
    agent = envs.GRPO(model, ENV, tokenizer=tokenizer, **SMALL)
    seen = []
    out = agent.learn(total_timesteps=5, callback=lambda local: seen.append(dict(local)), progress_bar=False)
    assert out is agent
    # Each iteration plays 4 episodes of 1-3 replies; it stops at the first iteration reaching 5.
    counts = [local["num_timesteps"] for local in seen]
    assert counts[-1] == agent.num_timesteps >= 5 and all(c < 5 for c in counts[:-1])
    assert agent.trainer.iteration == len(seen) and len(agent.trainer.history) == len(seen)
    for local in seen:
        turns = local["metrics"]["env/turns_mean"] * 4
        assert local["timesteps"] == round(turns) and 4 <= local["timesteps"] <= 12
        assert local["model"] is agent and local["total_timesteps"] == 5
    agent.learn(total_timesteps=1, progress_bar=True, reset_num_timesteps=False)
    assert agent.num_timesteps > counts[-1] and agent.trainer.iteration == len(seen) + 1


def test_callback_returning_false_stops_early(saved):
    model, tokenizer = fresh(saved)
    agent = envs.PPO(model, ENV, tokenizer=tokenizer, **SMALL)
    calls = []
    agent.learn(total_timesteps=10_000, callback=lambda local: calls.append(local["iteration"]) or False,
                progress_bar=False)  # fmt: skip
    assert calls == [0] and agent.trainer.iteration == 1 and 0 < agent.num_timesteps < 10_000
    assert agent.policy is model and agent.env == ENV


def test_save_load_round_trip_predicts_the_same_greedy_action(saved, tmp_path):
    model, tokenizer = fresh(saved)
    agent = envs.PPO(model, ENV, tokenizer=tokenizer, learning_rate=1e-2, **SMALL)
    agent.learn(total_timesteps=1, progress_bar=False)  # weights and value head move
    agent.save(tmp_path / "agent")
    loaded = envs.PPO.load(tmp_path / "agent")  # the saved env id comes back
    assert loaded.env == ENV and loaded.config == agent.config and loaded.num_timesteps == agent.num_timesteps
    for a, b in zip(agent.trainer.value_head.state_dict().values(),
                    loaded.trainer.value_head.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for secret in (1, 9, 16):
        expected = play(agent, envs.GuessNumberEnv(max_turns=3), options={"secret": secret})
        assert play(loaded, envs.GuessNumberEnv(max_turns=3), options={"secret": secret})[:2] == expected[:2]
    overridden = envs.PPO.load(tmp_path / "agent", env=lambda: envs.GuessNumberEnv(high=8), max_turns=2)
    assert overridden.config.max_turns == 2 and overridden.config.learning_rate == 1e-2
    with pytest.raises(ValueError, match="holds a saved PPO, not a GRPO"):
        envs.GRPO.load(tmp_path / "agent")
    with pytest.raises(FileNotFoundError, match="alignkit_algorithm.json"):
        envs.PPO.load(tmp_path)


def test_policy_from_a_path_loads_model_and_tokenizer(saved):
    agent = envs.GRPO(str(saved), ENV, **SMALL)
    assert isinstance(agent.policy, torch.nn.Module) and agent.tokenizer.eos_token == "<eos>"
    assert isinstance(agent.predict("guess 1-16:", deterministic=True)[0], str)


def test_bad_arguments_raise_clear_errors(saved):
    model, tokenizer = fresh(saved)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rat'\]"):
        envs.PPO(model, ENV, tokenizer=tokenizer, learning_rat=1e-3)
    with pytest.raises(ValueError, match="PPO fixes algorithm='ppo', got algorithm='grpo'"):
        envs.PPO(model, ENV, tokenizer=tokenizer, algorithm="grpo")
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        envs.GRPO(model, ENV, tokenizer=tokenizer, num_generations=1)
    with pytest.raises(TypeError, match="policy must be a causal LM .* got int"):
        envs.PPO(42, ENV, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass its tokenizer="):
        envs.PPO(model, ENV)
    with pytest.raises(ValueError, match="is not a registered Gymnasium id"):
        envs.PPO(model, "alignkit/Nope-v0", tokenizer=tokenizer)
    agent = envs.GRPO(model, ENV, tokenizer=tokenizer, **SMALL)
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="total_timesteps must be a positive int"):
            agent.learn(total_timesteps=bad)
    with pytest.raises(TypeError, match="callback must be a callable"):
        agent.learn(total_timesteps=4, callback="stop")
    with pytest.raises(TypeError, match="observation must be text .* got int"):
        agent.predict(7)
    with pytest.raises(TypeError, match="state must be None or the Conversation"):
        agent.predict("higher:", state=[1, 2])
    assert agent.trainer.iteration == 0  # nothing ran
