"""alignkit.envs.collect_episodes on a tiny Llama and the demo's character tokenizer (saved and
reloaded with from_pretrained): the log-prob parity contract over whole multi-turn sequences, the
ids of turn k a prefix of those of turn k + 1, observation tokens masked out, turn rewards on the
turn ends, the chat-template delta, tools inside episodes, the budgets and bad input.

A scripted engine (replies fixed in advance, the real Rollout type) drives the tests about layout;
the real RolloutEngine drives the parity tests."""

from __future__ import annotations

import string

import gymnasium
import pytest
import torch

import alignkit
import alignkit.envs as envs
from alignkit.demo import char_tokenizer, save_and_reload, tiny_llama
from alignkit.demo.models import DEFAULT_CHARS
from alignkit.rollout import Rollout, RolloutEngine

CHARS = DEFAULT_CHARS + string.ascii_uppercase + '<>{}"/_[]\n'
CONTEXT = 128
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = char_tokenizer(CHARS)
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=CONTEXT, seed=0)  # fmt: skip
    model, tokenizer = save_and_reload(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"))
    return model.eval(), tokenizer


class CountingEnv(envs.TextEnv):
    """Deterministic multi-turn env: prompt of ``prompt_len`` characters, observation k is
    ``"o" * k + ":"``, reward of turn k is ``k + 0.5``; it terminates after ``turns`` replies."""

    def __init__(self, *, turns: int, prompt_len: int = 3) -> None:
        super().__init__(max_turns=50)
        self.turns, self.prompt_len = turns, prompt_len

    def start(self, options):
        return "p" * (self.prompt_len - 1) + ":", {}

    def respond(self, reply):
        return "o" * self.turn + ":", self.turn + 0.5, self.turn >= self.turns, {"reply": reply}


class ScriptedEngine:
    """An engine whose replies are fixed: ``script(prompt ids, call index)`` -> (ids, finish reason).
    It records every call's prompts; it has no model (collect_episodes needs none)."""

    def __init__(self, script) -> None:
        self.script, self.calls = script, []

    def generate(
        self, prompts, *, n, max_new_tokens, temperature, top_k, top_p, stop, seed, min_new_tokens=0
    ):
        assert n == 1
        self.calls.append([list(p) for p in prompts])
        rows = [self.script(list(p), len(self.calls) - 1) for p in prompts]
        rows = [(ids[:max_new_tokens], "length" if len(ids) > max_new_tokens else why) for ids, why in rows]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        prompt_ids = torch.ones((len(rows), 1), dtype=torch.int64)
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_ids.clone(), response_ids=ids, response_mask=mask,
            logprobs=-0.5 * mask.float(), logit_floor=None, finish_reason=[why for _, why in rows],
            group_ids=torch.arange(len(rows)),
        )  # fmt: skip


def _runs(mask_row: torch.Tensor, attention_row: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, value) of the runs of ``mask_row`` over the attended positions."""
    runs: list[tuple[int, int, int]] = []
    for t in range(int(attention_row.sum())):
        value = int(mask_row[t])
        if runs and runs[-1][2] == value and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1, value)
        else:
            runs.append((t, t + 1, value))
    return runs


# ----------------------------------------------------------------------------- parity on the real engine


SETTINGS = {"temperature": (0.8, 0, 1.0), "top_k+top_p": (1.2, 8, 0.9)}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_multi_turn_logprobs_match_the_trainer_recomputation(tiny, setting):
    model, tokenizer = tiny
    temperature, top_k, top_p = SETTINGS[setting]
    # 3 groups of 2: mixed prompt lengths, mixed turn counts, and a single-turn env among them
    pool = [
        lambda: CountingEnv(turns=3, prompt_len=2), lambda: envs.GuessNumberEnv(max_turns=3),
        lambda: gymnasium.make("alignkit/Addition-v0"),
    ]  # fmt: skip
    env_list = [pool[g]() for g in range(3) for _ in range(2)]
    engine = RolloutEngine(model, tokenizer)
    out = envs.collect_episodes(
        engine, env_list, tokenizer=tokenizer, max_turns=4, max_total_tokens=64, max_new_tokens=4,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=5, group_ids=[0, 0, 1, 1, 2, 2],
    )  # fmt: skip
    assert len(out) == 6 and out.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.observations[0][0] == out.observations[1][0]  # one group, one reset seed
    assert out.observations[4][0] == out.observations[5][0]
    assert len({len(r) for r in out.replies}) > 1, out.replies  # mixed turn counts
    assert len(set(out.response_attention.sum(-1).tolist())) > 1  # mixed lengths
    assert (out.logit_floor is not None) == (setting == "top_k+top_p")
    live = out.response_mask.bool()
    recomputed = alignkit.causal_lm_logprobs(
        model, out.input_ids(), out.attention_mask(), position_ids=out.position_ids(),
        logits_to_keep=out.response_ids.shape[1], temperature=temperature, logit_floor=out.logit_floor,
    )  # fmt: skip
    torch.testing.assert_close(recomputed[live], out.logprobs[live], rtol=0, atol=1e-5)
    assert bool((out.logprobs[~live] == 0).all()) and bool((out.logprobs[live] <= 0).all())
    if out.logit_floor is not None:
        assert bool((out.logit_floor[~live] == float("-inf")).all())
        assert bool(torch.isfinite(out.logit_floor[live]).any())
    # the same seed repeats exactly
    again = envs.collect_episodes(
        engine, [pool[g]() for g in range(3) for _ in range(2)], tokenizer=tokenizer, max_turns=4,
        max_total_tokens=64, max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, seed=5,
        group_ids=[0, 0, 1, 1, 2, 2],
    )  # fmt: skip
    assert torch.equal(again.input_ids(), out.input_ids()) and again.replies == out.replies


def test_episodes_are_a_rollout_for_the_trainers_reads(tiny):
    model, tokenizer = tiny
    out = envs.collect_episodes(
        RolloutEngine(model, tokenizer), [envs.GuessNumberEnv() for _ in range(3)], tokenizer=tokenizer,
        max_turns=3, max_total_tokens=48, max_new_tokens=3, seed=0,
    )  # fmt: skip
    N, P, T = len(out), out.prompt_ids.shape[1], out.response_ids.shape[1]
    assert out.input_ids().shape == out.attention_mask().shape == out.position_ids().shape == (N, P + T)
    for name in ("response_mask", "response_attention", "logprobs", "turn_rewards"):
        assert getattr(out, name).shape == (N, T)
    assert out.logprobs.dtype == out.turn_rewards.dtype == out.returns.dtype == torch.float32
    assert out.logit_floor is None and out.returns.shape == (N,)
    torch.testing.assert_close(out.returns, out.turn_rewards.sum(-1))
    assert bool((out.response_mask <= out.response_attention).all())
    positions = out.position_ids()[out.attention_mask().bool()]
    lengths = out.attention_mask().sum(-1).tolist()
    assert positions.tolist() == [t for n in lengths for t in range(n)]  # contiguous, from 0
    assert set(out.finish_reason) <= set(envs.EPISODE_END_REASONS)


# ----------------------------------------------------------------------------- layout (scripted engine)


def test_history_is_a_prefix_observations_are_masked_and_rewards_sit_on_turn_ends(tiny):
    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    replies = {0: "ab", 1: "c", 2: "dde"}  # call k's reply; every row ends with eos except the last call

    def script(prompt, call):
        ids = tokenizer.encode(replies[call % 3], add_special_tokens=False)
        return ([*ids, eos], "eos") if call < 2 else (ids, "length")

    engine = ScriptedEngine(script)
    env_list = [CountingEnv(turns=1, prompt_len=2), CountingEnv(turns=3, prompt_len=5), CountingEnv(turns=2)]
    out = envs.collect_episodes(
        engine, env_list, tokenizer=tokenizer, max_turns=5, max_total_tokens=100, max_new_tokens=8
    )
    assert [len(r) for r in out.replies] == [1, 3, 2] and out.finish_reason == ["terminated"] * 3
    assert out.replies[1] == ["ab", "c", "dde"]
    # every call's prompt is the previous one plus the sampled ids plus the observation ids
    histories = {}
    for k, prompts in enumerate(engine.calls):
        live = [i for i in range(3) if len(out.replies[i]) > k]
        assert len(prompts) == len(live)
        for i, prompt in zip(live, prompts, strict=True):
            if i in histories:
                assert prompt[: len(histories[i])] == histories[i]
            histories[i] = prompt
    full = out.input_ids()[out.attention_mask().bool()].split(out.attention_mask().sum(-1).tolist())
    for i, prompt in histories.items():
        assert full[i].tolist()[: len(prompt)] == prompt
    for i in range(3):
        runs = _runs(out.response_mask[i], out.response_attention[i])
        model_runs = [(s, e) for s, e, v in runs if v == 1]
        obs_runs = [(s, e) for s, e, v in runs if v == 0]
        assert len(model_runs) == len(out.replies[i]) and len(obs_runs) == len(out.replies[i]) - 1
        ids = out.response_ids[i]
        for k, (s, e) in enumerate(obs_runs):  # the observation tokens: exactly the env's text
            assert tokenizer.decode(ids[s:e].tolist()) == "o" * (k + 1) + ":"
        for k, (s, e) in enumerate(model_runs):
            assert out.turn_rewards[i, e - 1] == k + 1.5  # turn k + 1's reward on its last token
            assert bool((out.turn_rewards[i, s : e - 1] == 0).all())
        assert float(out.returns[i]) == sum(k + 1.5 for k in range(len(model_runs)))
        assert out.turn_rewards[i][out.response_mask[i] == 0].abs().sum() == 0
    assert out.turn_finish_reasons[1] == ["eos", "eos", "length"]
    assert out.texts[1] == "ab" + "o:" + "c" + "oo:" + "dde"


def test_chat_template_delta(tiny):
    _, tokenizer = tiny
    tokenizer = char_tokenizer(CHARS)
    tokenizer.chat_template = TEMPLATE
    eos = tokenizer.eos_token_id

    def script(prompt, call):
        ids = tokenizer.encode(["hi", "yo", "ok"][call], add_special_tokens=False)
        return ([*ids, eos], "eos") if call != 1 else (ids, "length")  # turn 2 is cut: no eos

    start = [{"role": "user", "content": "go"}]
    out = envs.collect_episodes(
        ScriptedEngine(script),
        [envs.reward_env(lambda p, c, **m: [0.0], [start])],
        tokenizer=tokenizer,
        max_turns=3,
        max_total_tokens=200,
        max_new_tokens=8,
    )
    # a single-turn env: one turn; now a multi-turn chat env
    assert out.replies == [["hi"]]

    class ChatEnv(CountingEnv):
        def start(self, options):
            return tuple(start), {}

    out = envs.collect_episodes(
        ScriptedEngine(script), [ChatEnv(turns=3)], tokenizer=tokenizer, max_turns=3,
        max_total_tokens=200, max_new_tokens=8,
    )  # fmt: skip
    text = tokenizer.decode(out.input_ids()[0][out.attention_mask()[0].bool()].tolist())
    conversation = [*start, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "o:"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "oo:"}]  # fmt: skip
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == rendered + "ok<eos>"  # the same text as the template, never re-tokenised
    # eos in order: turn 1's (sampled, mask 1), user turn 1's (template), the template's closing of
    # turn 2 (which was cut, so that eos is an observation token), user turn 2's, turn 3's (sampled)
    ids, mask = out.response_ids[0], out.response_mask[0]
    eos_positions = (ids == eos).nonzero().flatten().tolist()
    assert [int(mask[t]) for t in eos_positions] == [1, 0, 0, 0, 1]
    assert (
        tokenizer.decode(ids[eos_positions[1] - 2 : eos_positions[2] + 1].tolist())
        == "o:<eos>\nassistant: yo<eos>"
    )
    # chat=True turns a string first observation into a user message
    out = envs.collect_episodes(
        ScriptedEngine(script), [CountingEnv(turns=1)], tokenizer=tokenizer, max_turns=1,
        max_total_tokens=200, max_new_tokens=8, chat=True,
    )  # fmt: skip
    head = out.prompt_ids[0][out.prompt_mask[0].bool()].tolist()
    assert tokenizer.decode(head) == "user: pp:<eos>\nassistant: "


def test_tool_calls_inside_episodes(tiny):
    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    turns = ['<tool>add({"a": 2, "b": 3})</tool>', "<tool>boom()</tool>", "5"]

    def boom():
        raise RuntimeError("no")

    def script(prompt, call):
        return [*tokenizer.encode(turns[call], add_special_tokens=False), eos], "eos"

    def add(a, b):
        return a + b

    env = envs.ToolEnv(CountingEnv(turns=1), [add, boom])
    out = envs.collect_episodes(
        ScriptedEngine(script), [env], tokenizer=tokenizer, max_turns=5, max_total_tokens=127,
        max_new_tokens=40,
    )  # fmt: skip
    assert out.replies[0] == turns and out.finish_reason == ["terminated"]
    results = ["<result>5</result>", "<error>tool boom raised RuntimeError: no</error>"]
    assert out.observations[0][1:3] == results
    runs = _runs(out.response_mask[0], out.response_attention[0])
    observed = [tokenizer.decode(out.response_ids[0, s:e].tolist()) for s, e, v in runs if v == 0]
    assert observed == results  # tool results are observation tokens (mask 0)
    assert out.returns.tolist() == [1.5] and out.turn_rewards[0].nonzero().numel() == 1  # tool turns: 0
    strict = envs.ToolEnv(CountingEnv(turns=1), [add, boom], tool_errors="raise")
    with pytest.raises(envs.ToolError, match="boom raised RuntimeError: no"):
        envs.collect_episodes(
            ScriptedEngine(script), [strict], tokenizer=tokenizer, max_turns=5, max_total_tokens=127,
            max_new_tokens=40,
        )  # fmt: skip


# ----------------------------------------------------------------------------- budgets


def test_turn_and_token_budgets(tiny):
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    out = envs.collect_episodes(
        engine, [CountingEnv(turns=10) for _ in range(3)], tokenizer=tokenizer, max_turns=2,
        max_total_tokens=100, max_new_tokens=2, seed=1,
    )  # fmt: skip
    assert out.finish_reason == ["max_turns"] * 3 and [len(r) for r in out.replies] == [2, 2, 2]
    out = envs.collect_episodes(
        engine, [CountingEnv(turns=50, prompt_len=p) for p in (2, 9)], tokenizer=tokenizer, max_turns=50,
        max_total_tokens=24, max_new_tokens=5, seed=2,
    )  # fmt: skip
    assert out.finish_reason == ["max_total_tokens"] * 2
    assert out.attention_mask().sum(-1).max() <= 24
    live = out.response_mask.bool()
    recomputed = alignkit.causal_lm_logprobs(
        model,
        out.input_ids(),
        out.attention_mask(),
        position_ids=out.position_ids(),
        logits_to_keep=out.response_ids.shape[1],
    )  # a reply cut at the budget keeps its sampled prefix exactly
    torch.testing.assert_close(recomputed[live], out.logprobs[live], rtol=0, atol=1e-5)


def test_a_reply_cut_by_the_total_budget_still_reaches_the_env(tiny):
    _, tokenizer = tiny
    long_reply = tokenizer.encode("abcdefgh", add_special_tokens=False)
    out = envs.collect_episodes(
        ScriptedEngine(lambda p, c: (long_reply, "length")), [CountingEnv(turns=5, prompt_len=4)],
        tokenizer=tokenizer, max_turns=5, max_total_tokens=10, max_new_tokens=8,
    )  # fmt: skip
    assert out.replies == [["abcdef"]] and out.turn_finish_reasons == [["length"]]
    assert out.finish_reason == ["max_total_tokens"] and int(out.attention_mask().sum()) == 10


# ----------------------------------------------------------------------------- bad input


class _RawEnv(gymnasium.Env):
    """A plain gymnasium env (not a TextEnv) returning whatever it is told to."""

    observation_space = envs.text_space()
    action_space = envs.text_space()

    def __init__(self, first="go:", step=("ok", 0.0, False, False, {})) -> None:
        self.first, self.result = first, step

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.first, {}

    def step(self, action):
        return self.result


@pytest.mark.parametrize(
    ("env", "error", "match"),
    [
        (_RawEnv(first=7), envs.EnvError, r"envs\[0\] \(_RawEnv\)\.reset must return a string .*int: 7"),
        (_RawEnv(first=""), envs.EnvError, r"envs\[0\] \(_RawEnv\)\.reset returned an empty observation"),
        (_RawEnv(step=(b"x", 0.0, False, False, {})), envs.EnvError, r"\.step must return a string.*bytes"),
        (
            _RawEnv(step=("x", float("nan"), False, False, {})),
            envs.EnvError,
            r"\(_RawEnv\)\.step returned the reward nan",
        ),
        (_RawEnv(step=("x", None, False, False, {})), envs.EnvError, r"reward of type NoneType"),
        (_RawEnv(step=("x", 1.0, "no", False, {})), envs.EnvError, r"terminated='no'"),
        (_RawEnv(step=("x", 1.0, False)), envs.EnvError, r"must return \(observation, reward, terminated"),
    ],
    ids=["int-reset", "empty-reset", "bytes-obs", "nan-reward", "none-reward", "str-flag", "short-tuple"],
)
def test_bad_envs_fail_with_a_message_naming_them(tiny, env, error, match):
    _, tokenizer = tiny
    engine = ScriptedEngine(lambda p, c: ([5], "eos"))
    with pytest.raises(error, match=match):
        envs.collect_episodes(
            engine, [env], tokenizer=tokenizer, max_turns=3, max_total_tokens=50, max_new_tokens=2
        )


def test_bad_arguments(tiny):
    model, tokenizer = tiny
    engine = RolloutEngine(model, tokenizer)
    kwargs = dict(tokenizer=tokenizer, max_turns=2, max_total_tokens=50, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one environment"):
        envs.collect_episodes(engine, [], **kwargs)
    env = CountingEnv(turns=1)
    with pytest.raises(ValueError, match="distinct instances"):
        envs.collect_episodes(engine, [env, env], **kwargs)
    with pytest.raises(TypeError, match=r"envs\[0\] must be a gymnasium env"):
        envs.collect_episodes(engine, ["alignkit/Addition-v0"], **kwargs)
    with pytest.raises(ValueError, match=r"max_total_tokens must be at most the model's context \(128"):
        envs.collect_episodes(engine, [env], **{**kwargs, "max_total_tokens": 500})
    with pytest.raises(ValueError, match="max_turns must be a positive int"):
        envs.collect_episodes(engine, [env], **{**kwargs, "max_turns": 0})
    with pytest.raises(ValueError, match="group_ids must hold one id per env"):
        envs.collect_episodes(engine, [env], group_ids=[0, 1], **kwargs)
    with pytest.raises(ValueError, match="leaving no room for a reply"):
        envs.collect_episodes(engine, [CountingEnv(turns=1, prompt_len=60)], **kwargs)
