"""alignkit.envs: the text envs (Gymnasium's check_env, registration), tools, the reward/env protocol
and bad input. The multi-turn collection (parity, masks, rewards, budgets) is in
tests/test_envs_collect.py."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import alignkit.envs as envs
from alignkit.demo import task
from alignkit.trainer import RewardError

# ----------------------------------------------------------------------------- registration, check_env


@pytest.mark.parametrize("env_id", ["alignkit/Addition-v0", "alignkit/GuessNumber-v0"])
def test_builtin_envs_are_registered_and_pass_check_env(env_id):
    env = gymnasium.make(env_id)
    assert env.spec.id == env_id
    # check_env on the unwrapped env (make's wrappers would make check_env warn that it is wrapped);
    # make set its spec, so the render-mode and close checks run too. No warning is filtered.
    check_env(env.unwrapped)
    observation, _info = env.reset(seed=3)
    assert isinstance(observation, str) and observation in env.observation_space
    assert env.action_space.contains("42")


def test_registration_is_idempotent_and_import_alignkit_does_not_import_gymnasium(monkeypatch):
    import importlib

    importlib.reload(envs)  # a second registration must not warn (warnings are errors)
    for name in [m for m in sys.modules if m == "alignkit.envs" or m.startswith("alignkit.envs.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"alignkit.envs needs gymnasium: pip install"):
        importlib.import_module("alignkit.envs")
    monkeypatch.undo()
    code = "import sys, alignkit; assert 'gymnasium' not in sys.modules, 'gymnasium imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_reward_env_passes_check_env_for_string_and_chat_prompts():
    def always_one(prompts, completions, **meta):
        return [1.0] * len(completions)

    # No spec (not built by gymnasium.make): check_env cannot test other render modes; skipping the
    # render check is what its warning asks for, and the ansi mode is tested through the builtins.
    check_env(envs.reward_env(always_one, ["ab", "cd"]), skip_render_check=True)
    chat = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
    ]
    check_env(envs.reward_env(always_one, chat), skip_render_check=True)


# ----------------------------------------------------------------------------- the built-in envs


def test_addition_env_rewards_exactly_as_the_demo():
    env = gymnasium.make("alignkit/Addition-v0")
    observation, info = env.reset(options={"a": 7, "b": 38})
    assert observation == "07+38=" and info["answer"] == "045"
    weights = dict(zip(task.REWARD_FUNCTIONS, task.REWARD_WEIGHTS, strict=True))
    for reply in ("045", " 045 ", "046", "45", "abc", ""):
        env.reset(options={"a": 7, "b": 38})
        _, reward, terminated, truncated, info = env.step(reply)
        expected = sum(w * fn(["07+38="], [reply], answer=["045"])[0] for fn, w in weights.items())
        assert reward == pytest.approx(expected) and terminated and not truncated
        assert info["correct"] == (reply.strip() == "045")
    assert env.unwrapped.max_turns == 1


def test_guess_number_feedback_rewards_and_turn_limit():
    env = envs.GuessNumberEnv(
        low=1, high=16, max_turns=4, step_cost=0.1, invalid_penalty=0.1, render_mode="ansi"
    )
    observation, _ = env.reset(options={"secret": 5})
    assert observation == "guess 1-16:"
    assert env.step("8")[:4] == ("lower:", 0.0, False, False)
    assert env.step("3")[:4] == ("higher:", 0.0, False, False)
    observation, reward, terminated, truncated, info = env.step("i say 5")
    assert (observation, terminated, truncated, info["solved"]) == ("correct", True, False, True)
    assert reward == pytest.approx(1.0 - 0.1 * 2)  # solved on turn 3
    assert "[model] i say 5" in env.render()
    with pytest.raises(RuntimeError, match="finished episode"):
        env.step("5")
    env.reset(options={"secret": 5})
    assert env.step("x")[:2] == ("invalid:", -0.1)
    for guess in ("1", "2"):
        assert env.step(guess)[3] is False
    assert env.step("3")[3] is True  # the 4th reply without solving: truncated
    fast = envs.GuessNumberEnv()
    fast.reset(options={"secret": 9})
    assert fast.step("9")[1] == 1.0  # more for fewer turns


def test_builtin_resets_are_seeded():
    a, b = envs.GuessNumberEnv(), envs.GuessNumberEnv()
    secrets_a = [(a.reset(seed=s), a.secret)[1] for s in range(20)]
    secrets_b = [(b.reset(seed=s), b.secret)[1] for s in range(20)]
    assert secrets_a == secrets_b and len(set(secrets_a)) > 3
    add = envs.AdditionEnv()
    assert add.reset(seed=1)[0] == add.reset(seed=1)[0]


# ----------------------------------------------------------------------------- tools


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def slow_upper(text: str) -> str:
    await asyncio.sleep(0.01)
    return text.upper()


def divide(a, b):
    return a / b


def sleepy():
    time.sleep(1.0)


async def sleepy_async():
    await asyncio.sleep(5.0)


def _tool_env(**kwargs):
    return envs.ToolEnv(envs.GuessNumberEnv(), [add, slow_upper, divide, sleepy, sleepy_async], **kwargs)


def test_parse_tool_call():
    assert envs.parse_tool_call("no call here") is None
    call = envs.parse_tool_call('let me see <tool>add({"a": 2, "b": 3})</tool> then')
    assert (call.name, call.args, call.kwargs) == ("add", (), {"a": 2, "b": 3})
    assert envs.parse_tool_call("<tool>add([2, 3])</tool>").args == (2, 3)
    assert envs.parse_tool_call("<tool> now() </tool>") == envs.ToolCall("now")
    for bad in ("<tool>add</tool>", "<tool>add({a: 1})</tool>", "<tool>add(3)</tool>"):
        with pytest.raises(envs.ToolError, match="malformed|JSON object or array"):
            envs.parse_tool_call(bad)


def test_tool_env_runs_sync_and_async_tools_and_passes_other_replies_on():
    env = _tool_env()
    env.reset(options={"secret": 5})
    observation, reward, terminated, truncated, info = env.step('<tool>add({"a": 2, "b": 3})</tool>')
    assert (observation, reward, terminated, truncated) == ("<result>5</result>", 0.0, False, False)
    assert info == {"tool": "add", "tool_error": False, "tool_calls": 1}
    assert env.step('<tool>slow_upper(["abc"])</tool>')[0] == "<result>ABC</result>"
    assert env.unwrapped.turn == 0  # tool turns never reach the wrapped env
    assert env.step("5")[:3] == ("correct", 1.0, True)  # an ordinary reply is the env's step


def test_tool_env_runs_async_tools_inside_a_running_event_loop():
    async def main():
        env = _tool_env()
        env.reset(options={"secret": 5})
        return env.step('<tool>slow_upper({"text": "x"})</tool>')[0]

    assert asyncio.run(main()) == "<result>X</result>"


def test_failing_tools_are_observed_or_raise():
    env = _tool_env()
    env.reset(options={"secret": 5})
    observation, reward, terminated, truncated, info = env.step("<tool>divide([1, 0])</tool>")
    assert observation == "<error>tool divide raised ZeroDivisionError: division by zero</error>"
    assert (reward, terminated, truncated, info["tool_error"]) == (0.0, False, False, True)
    assert "unknown tool 'nope'" in env.step("<tool>nope()</tool>")[0]
    assert "malformed" in env.step("<tool>add(</tool>")[0]
    assert "add() missing" in env.step('<tool>add({"a": 1})</tool>')[0]  # a TypeError inside the call
    strict = _tool_env(tool_errors="raise")
    strict.reset(options={"secret": 5})
    with pytest.raises(envs.ToolError, match="divide raised ZeroDivisionError"):
        strict.step("<tool>divide([1, 0])</tool>")
    with pytest.raises(ValueError, match="tool_errors"):
        _tool_env(tool_errors="ignore")


def test_tool_timeouts_never_hang():
    env = _tool_env(timeout_s=0.1)
    env.reset(options={"secret": 5})
    t0 = time.perf_counter()
    assert env.step("<tool>sleepy()</tool>")[0] == "<error>tool sleepy timed out after 0.1 s</error>"
    assert (
        env.step("<tool>sleepy_async()</tool>")[0] == "<error>tool sleepy_async timed out after 0.1 s</error>"
    )
    assert time.perf_counter() - t0 < 0.9  # both returned at their timeout, not at the tools' end


def test_tool_call_limit_truncates_and_announce_lists_the_tools():
    env = envs.ToolEnv(envs.GuessNumberEnv(), {"plus": add}, max_tool_calls=2, announce=True)
    observation, _ = env.reset(options={"secret": 5})
    assert observation.startswith("tools (call one as <tool>name(json-args)</tool>):\n- plus(a: int, b: int)")
    assert observation.endswith("guess 1-16:")
    for _ in range(2):
        assert env.step("<tool>plus([1, 1])</tool>")[3] is False
    observation, _, _, truncated, _ = env.step("<tool>plus([1, 1])</tool>")
    assert truncated and "limit (2)" in observation
    with pytest.raises(TypeError, match="tools must be"):
        envs.ToolEnv(envs.GuessNumberEnv(), "add")
    with pytest.raises(ValueError, match="identifiers"):
        envs.ToolEnv(envs.GuessNumberEnv(), {"not a name": add})


# ----------------------------------------------------------------------------- one protocol


def test_reward_env_wraps_a_trl_reward_function():
    rows = task.as_prompts([task.format_problem(7, 38, digits=2), task.format_problem(1, 2, digits=2)])
    env = envs.reward_env(task.REWARD_FUNCTIONS, rows, reward_weights=task.REWARD_WEIGHTS)
    observation, info = env.reset(options={"index": 0})
    assert observation == "07+38=" and info["index"] == 0
    _, reward, terminated, truncated, info = env.step("045")
    assert reward == pytest.approx(1.1) and terminated and not truncated
    assert info["reward/correctness"] == 1.0

    async def async_len(prompts, completions, **meta):
        return [float(len(c)) for c in completions]

    env = envs.reward_env(async_len, ["p"])
    env.reset()
    assert env.step("abc")[1] == 3.0


def test_env_reward_scores_completions_for_the_trainer():
    rows = envs.env_prompts("alignkit/Addition-v0", 4, seed=10)
    assert all(set(r) == {"prompt", "env_seed"} for r in rows)
    reward = envs.env_reward("alignkit/Addition-v0")
    answers = [str(int(r["prompt"][:2]) + int(r["prompt"][3:5])).zfill(3) for r in rows]
    meta = {"env_seed": [r["env_seed"] for r in rows]}
    completions = [answers[0], answers[1], "999", "x"]
    scores = reward([r["prompt"] for r in rows], completions, **meta)
    assert scores[:2] == [pytest.approx(1.1)] * 2 and scores[3] == 0.0
    assert scores[2] == pytest.approx(0.1 if answers[2] != "999" else 1.1)
    with pytest.raises(KeyError, match="env_seed"):
        reward(["x"], ["y"])
    # the same protocol round trip: a reward function -> env -> reward function
    back = envs.env_reward(
        envs.reward_env(task.correctness, task.as_prompts([task.format_problem(1, 2, digits=2)]))
    )
    assert back(["01+02="], ["003"], env_seed=[0]) == [1.0]


@pytest.mark.slow
def test_an_env_trains_through_todays_trainer(tmp_path):
    import alignkit
    from alignkit.demo import char_tokenizer, save_and_reload, tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(
        len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model, tokenizer = save_and_reload(model, tokenizer, tmp_path)
    config = alignkit.RLConfig(
        iterations=1, prompts_per_iteration=2, num_generations=2, max_new_tokens=4, kl_coef=0.0,
        progress=False, seed=0,
    )  # fmt: skip
    trainer = alignkit.Trainer(
        model, tokenizer, reward_fn=envs.env_reward("alignkit/Addition-v0"),
        prompts=envs.env_prompts("alignkit/Addition-v0", 8, seed=0), config=config,
    )  # fmt: skip
    (metrics,) = trainer.train()
    assert "reward/env_reward(alignkit/Addition-v0)" in metrics and math.isfinite(metrics["reward/mean"])


# ----------------------------------------------------------------------------- bad input


class _BadEnv(envs.TextEnv):
    def __init__(self, observation=None, reward=0.0):
        super().__init__(max_turns=3)
        self.bad_observation, self.bad_reward = observation, reward

    def start(self, options):
        return "go:", {}

    def respond(self, reply):
        return self.bad_observation, self.bad_reward, False, {}


def test_text_env_rejects_bad_observations_rewards_and_actions():
    env = _BadEnv(observation=42)
    env.reset()
    with pytest.raises(
        TypeError, match=r"_BadEnv\.step must return a string or a list of chat messages.*int: 42"
    ):
        env.step("a")
    for reward, kind in ((math.nan, ValueError), (math.inf, ValueError), ("1", TypeError), (True, TypeError)):
        env = _BadEnv(observation="ok", reward=reward)
        env.reset()
        with pytest.raises(kind, match=r"_BadEnv\.step returned .*reward"):
            env.step("a")
    env = _BadEnv(observation="ok")
    env.reset()
    with pytest.raises(TypeError, match="reply as a string"):
        env.step(3)
    with pytest.raises(TypeError, match="role' and 'content"):
        envs.check_observation([{"role": "user", "content": 3}], "x")


def test_reward_env_reports_a_non_finite_reward():
    env = envs.reward_env(lambda prompts, completions, **meta: [math.nan], ["p"])
    env.reset()
    with pytest.raises(RewardError, match="RewardEnv.*nan"):
        env.step("a")
