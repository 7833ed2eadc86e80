"""RolloutEngine on tiny Llama (sdpa, GQA) and GPT-2 (eager, learned positions) models built from
configs, with a WordLevel tokenizer trained by the ``tokenizers`` library; everything saved and
reloaded with ``from_pretrained`` (no hub).

The parity oracle recomputes each response's log-probs in float64 from the model's full-sequence
logits: ``z = logits / t``, entries below the rollout's floor set to -inf, ``log_softmax``
(``oracles.ref_rollout_logprobs``).
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import transformers
from oracles import ref_rollout_logprobs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import alignkit
from alignkit.rollout import Rollout, RolloutEngine, SamplingParams
from alignkit.rollout.random_streams import prompt_seeds

_CORPUS = """the a cat dog sat on mat ran fast slow big small red blue green and or but is was very
here there up down left right one two three four five six seven eight nine ten yes no stop end hello
world good bad"""
WORDS = _CORPUS.split()
CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _config(kind: str, vocab: int):
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **special,
        )  # fmt: skip
    return transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, **special
    )


@pytest.fixture(scope="module")
def models_by_kind(tokenizer, tmp_path_factory):
    loaded = {}
    for kind, attention in (("llama", "sdpa"), ("gpt2", "eager")):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        transformers.AutoModelForCausalLM.from_config(_config(kind, len(tokenizer))).save_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention)
        loaded[kind] = model.train(False)
    return loaded


@pytest.fixture(params=["llama", "gpt2"])
def model(request, models_by_kind):
    return models_by_kind[request.param]


@pytest.fixture
def llama(models_by_kind):
    return models_by_kind["llama"]


def _prompts(count: int = 3, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of mixed lengths (no specials)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 8, 3, 6, 4][:count]
    return [torch.randint(4, 49, (n,), generator=gen).tolist() for n in lengths]


@contextlib.contextmanager
def _eos(model, token: int):
    """Make ``token`` the model's eos for a while (engines read it when they are built)."""
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = token
    try:
        yield
    finally:
        model.generation_config.eos_token_id = old


class _ForwardLog:
    """Rows of every forward through the model's body (a pre-hook): what really ran."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        self.handle = model.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(int(ids.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _common_token(out: Rollout) -> int:
    """The token sampled most often (a handy eos that many rows hit early)."""
    return int(torch.bincount(out.response_ids[out.response_mask.bool()]).argmax())


# ----------------------------------------------------------------------------- parity contract


def _reference_logprobs(model, out: Rollout, temperature: float) -> torch.Tensor:
    """float64 log-probs of the response tokens from the full-sequence logits (the oracle)."""
    with torch.no_grad():
        logits = model(
            input_ids=out.input_ids(), attention_mask=out.attention_mask(), position_ids=out.position_ids()
        ).logits.double()
    width, steps = out.prompt_ids.shape[1], out.response_ids.shape[1]
    z = logits[:, width - 1 : width + steps - 1] / (temperature or 1.0)  # (N, T, V)
    return ref_rollout_logprobs(z, out.response_ids, out.logit_floor)


SETTINGS = {  # name: (temperature, top_k, top_p)
    "temperature": (0.7, 0, 1.0),
    "top_k": (1.3, 5, 1.0),
    "top_p": (0.9, 0, 0.8),
    "top_k+top_p": (1.1, 8, 0.7),
    "greedy": (0.0, 0, 1.0),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_logprobs_match_the_trainer_recomputation(model, setting):
    temperature, top_k, top_p = SETTINGS[setting]
    out = RolloutEngine(model).generate(
        _prompts(3), n=2, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=11
    )
    live = out.response_mask.bool()
    assert (out.logit_floor is not None) == (setting not in ("temperature", "greedy"))
    torch.testing.assert_close(
        out.logprobs[live].double(), _reference_logprobs(model, out, temperature)[live], rtol=0, atol=1e-5
    )
    assert bool((out.logprobs[~live] == 0).all()) and bool((out.logprobs <= 0).all())
    if out.logit_floor is not None:
        assert bool((out.logit_floor[~live] == float("-inf")).all())
    if "logit_floor" in inspect.signature(alignkit.causal_lm_logprobs).parameters:
        # The trainer's fused recomputation (no [tokens x vocab] logits) with the rollout's floor.
        recomputed = alignkit.causal_lm_logprobs(
            model, out.input_ids(), out.attention_mask(), position_ids=out.position_ids(),
            logits_to_keep=out.response_ids.shape[1], temperature=temperature or 1.0,
            logit_floor=out.logit_floor,
        )  # fmt: skip
        torch.testing.assert_close(recomputed[live], out.logprobs[live], rtol=0, atol=1e-5)


def test_triton_backend_matches_the_reference(llama):
    # The sampling kernel inside the decode loop (interpreted on CPU: kept tiny).
    pytest.importorskip("triton")
    out = RolloutEngine(llama, backend="triton").generate(
        _prompts(2), max_new_tokens=3, temperature=0.9, top_k=6, seed=0
    )
    live = out.response_mask.bool()
    torch.testing.assert_close(
        out.logprobs[live].double(), _reference_logprobs(llama, out, 0.9)[live], rtol=0, atol=1e-5
    )


# ----------------------------------------------------------------------------- decoding behaviour


def test_greedy_equals_hf_generate(model):
    prompts = _prompts(4)
    engine = RolloutEngine(model)
    first = engine.generate(prompts, max_new_tokens=12, temperature=0)
    eos = int(first.response_ids[1, 4])  # an eos that at least one row reaches early
    with _eos(model, eos):
        out = RolloutEngine(model).generate(prompts, max_new_tokens=12, temperature=0)
    with torch.no_grad():
        hf = model.generate(
            out.prompt_ids, attention_mask=out.prompt_mask, do_sample=False, max_new_tokens=12,
            eos_token_id=eos, pad_token_id=0,
        )[:, out.prompt_ids.shape[1] :]  # fmt: skip
    assert "eos" in out.finish_reason
    for row in range(len(prompts)):
        length = int(out.response_mask[row].sum())
        assert out.response_ids[row, :length].tolist() == hf[row, :length].tolist()
        if out.finish_reason[row] == "eos":
            assert int(out.response_ids[row, length - 1]) == eos  # eos included in the response
            assert bool((hf[row, length:] == 0).all())  # HF pads after its eos too
        else:
            assert length == 12 and out.finish_reason[row] == "length"


def test_seeded_runs_repeat_and_seeds_differ(llama):
    engine = RolloutEngine(llama)
    runs = [engine.generate(_prompts(3), n=2, max_new_tokens=8, top_p=0.9, seed=s) for s in (5, 5, 6)]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs) and torch.equal(
        runs[0].logit_floor, runs[1].logit_floor
    )
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids)
    # an int seed is the per-prompt seeds derived from (seed, prompt index)
    derived = engine.generate(_prompts(3), n=2, max_new_tokens=8, top_p=0.9, seed=prompt_seeds(5, 3))
    assert torch.equal(derived.response_ids, runs[0].response_ids)
    assert torch.equal(derived.logprobs, runs[0].logprobs)
    torch.manual_seed(0)
    a = engine.generate(_prompts(3), max_new_tokens=8)
    torch.manual_seed(0)  # seed=None draws from torch's global generator
    b = engine.generate(_prompts(3), max_new_tokens=8)
    assert torch.equal(a.response_ids, b.response_ids)


def _rows(out: Rollout) -> list[tuple]:
    """Each row unpadded: (prompt ids, tokens, log-probs, floors, finish reason)."""
    rows = []
    for i in range(len(out)):
        length = int(out.response_mask[i].sum())
        floor = None if out.logit_floor is None else out.logit_floor[i, :length].tolist()
        prompt = out.prompt_ids[i][out.prompt_mask[i].bool()].tolist()
        rows.append((prompt, out.response_ids[i, :length].tolist(), out.logprobs[i, :length].tolist(), floor,
                     out.finish_reason[i]))  # fmt: skip
    return rows


def _assert_same_rows(split: list[tuple], whole: list[tuple]) -> None:
    assert len(split) == len(whole)
    for a, b in zip(split, whole, strict=True):
        assert a[0] == b[0] and a[1] == b[1] and a[4] == b[4]  # prompt, tokens, finish reason: exact
        # log-probs and floors: the model's logits of a row shift by rounding with the batch it runs in
        # (matmul blocking, padding width), never the sampler's draw.
        torch.testing.assert_close(torch.tensor(a[2]), torch.tensor(b[2]), rtol=0, atol=1e-5)
        if a[3] is not None:
            torch.testing.assert_close(torch.tensor(a[3]), torch.tensor(b[3]), rtol=0, atol=1e-5)


def test_per_prompt_seeds_make_rows_batch_invariant(llama):
    # Row j of a prompt samples from (prompt seed, j, step) only: splitting the call (other batch
    # size, other padding width, other rows retiring) gives the same rows.
    prompts, seeds = _prompts(4), [11, 0, 2**40 + 3, 7]
    first = RolloutEngine(llama).generate(prompts, n=4, max_new_tokens=12, seed=seeds)
    with _eos(llama, _common_token(first)):  # rows finish at different steps and leave the batch
        engine = RolloutEngine(llama)
        settings = {"n": 4, "max_new_tokens": 12, "temperature": 1.1, "top_p": 0.9}
        whole = engine.generate(prompts, seed=seeds, **settings)
        halves = [engine.generate(prompts[:2], seed=seeds[:2], **settings),
                  engine.generate(prompts[2:], seed=seeds[2:], **settings)]  # fmt: skip
        reversed_ = engine.generate(prompts[::-1], seed=seeds[::-1], **settings)
    assert len(set(whole.finish_reason)) > 1
    rows = _rows(whole)
    _assert_same_rows(_rows(halves[0]) + _rows(halves[1]), rows)
    back = _rows(reversed_)
    _assert_same_rows([r for g in reversed(range(4)) for r in back[4 * g : 4 * g + 4]], rows)
    assert len({tuple(r[1]) for r in rows[:4]}) > 1  # the n samples of a prompt still differ


def test_per_prompt_seeds_triton_backend(llama):
    # The kernel keys Philox per row too (interpreted on CPU: kept tiny; floors: test_rollout_sampling).
    pytest.importorskip("triton")
    engine = RolloutEngine(llama, backend="triton")
    prompts, settings = _prompts(2), {"n": 2, "max_new_tokens": 3, "temperature": 0.9}  # no bisection
    whole = engine.generate(prompts, seed=[5, 9], **settings)
    split = [
        engine.generate(prompts[:1], seed=[5], **settings),
        engine.generate(prompts[1:], seed=[9], **settings),
    ]
    _assert_same_rows(_rows(split[0]) + _rows(split[1]), _rows(whole))


def test_top_k_one_is_greedy(model):
    engine = RolloutEngine(model)
    greedy = engine.generate(_prompts(3), max_new_tokens=8, temperature=0)
    top1 = engine.generate(_prompts(3), max_new_tokens=8, temperature=0.7, top_k=1, seed=3)
    assert torch.equal(greedy.response_ids, top1.response_ids)
    assert bool((top1.logprobs == 0).all())  # one token kept: probability 1
    assert bool(torch.isfinite(top1.logit_floor).all())


def test_stop_strings_stop_tokens_and_length(llama, tokenizer):
    engine = RolloutEngine(llama, tokenizer)
    base = engine.generate(_prompts(3), max_new_tokens=10, temperature=0)
    word = tokenizer.decode(base.response_ids[0, 2:4].tolist())
    out = engine.generate(_prompts(3), max_new_tokens=10, temperature=0, stop=[word])

    def stop_length(ids):  # the first response prefix whose text holds the stop string
        return next((k for k in range(1, len(ids) + 1) if word in tokenizer.decode(ids[:k])), None)

    for row in range(3):
        ids, length = base.response_ids[row].tolist(), int(out.response_mask[row].sum())
        expected = stop_length(ids)
        if expected is None:  # rows without the string run to their length
            assert out.finish_reason[row] == "length" and length == 10
        else:
            assert out.finish_reason[row] == "stop" and length == expected <= (4 if row == 0 else 10)
            assert out.response_ids[row, :length].tolist() == ids[:length]  # the stop token is kept
            assert word in tokenizer.decode(ids[:length])
    token = int(base.response_ids[1, 3])
    by_id = engine.generate(_prompts(3), max_new_tokens=10, temperature=0, stop=token)
    first = base.response_ids[1].tolist().index(token)
    assert by_id.finish_reason[1] == "stop" and int(by_id.response_mask[1].sum()) == first + 1
    assert int(by_id.response_ids[1, first]) == token
    short = engine.generate(_prompts(3), max_new_tokens=3, temperature=0)
    assert short.response_ids.shape[1] == 3 and all(r in ("length", "eos") for r in short.finish_reason)


def test_eos_and_min_new_tokens(llama):
    engine = RolloutEngine(llama)
    first = engine.generate(_prompts(4), n=4, max_new_tokens=12, temperature=0.5, seed=1)
    eos = _common_token(first)
    with _eos(llama, eos):
        engine = RolloutEngine(llama)
        out = engine.generate(_prompts(4), n=4, max_new_tokens=12, temperature=0.5, seed=1)
        held = engine.generate(
            _prompts(4), n=4, max_new_tokens=12, min_new_tokens=12, temperature=0.5, seed=1
        )
    lengths = out.response_mask.sum(-1)
    for row, reason in enumerate(out.finish_reason):
        ids = out.response_ids[row, : int(lengths[row])].tolist()
        if reason == "eos":
            assert ids[-1] == eos and eos not in ids[:-1]
        else:
            assert eos not in ids and len(ids) == 12
    assert out.finish_reason.count("eos") >= 4
    assert held.finish_reason == ["length"] * 16 and eos not in held.response_ids.flatten().tolist()


def test_n_samples_share_one_prefill_yet_differ(llama):
    prompts = _prompts(3)
    with _ForwardLog(llama) as log:
        out = RolloutEngine(llama).generate(prompts, n=4, max_new_tokens=6, seed=2)
    assert log.rows[0] == 3  # one prefill row per prompt, not per sample
    assert log.rows[1] == int((out.response_mask.sum(-1) > 1).sum())  # then every unfinished row
    assert out.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # prompt-major
    for g in range(3):
        block = slice(4 * g, 4 * g + 4)
        assert bool((out.prompt_ids[block] == out.prompt_ids[4 * g]).all())
        assert len({tuple(r) for r in out.response_ids[block].tolist()}) > 1  # the samples differ
        ids = out.prompt_ids[4 * g][out.prompt_mask[4 * g].bool()].tolist()
        assert ids == prompts[g]  # token ids in are used as given


def test_finished_rows_leave_the_batch(llama):
    first = RolloutEngine(llama).generate(_prompts(4), n=4, max_new_tokens=12, temperature=0.5, seed=1)
    with _eos(llama, _common_token(first)):
        engine = RolloutEngine(llama)
        with _ForwardLog(llama) as log:
            out = engine.generate(_prompts(4), n=4, max_new_tokens=12, temperature=0.5, seed=1)
    lengths = out.response_mask.sum(-1)
    decode_rows = log.rows[1:]
    assert len(decode_rows) == int(lengths.max()) - 1  # one forward per step after the prefill
    for step, rows in enumerate(decode_rows, start=1):  # the forward feeding token `step`
        assert rows == int((lengths > step).sum())  # exactly the rows still sampling
    assert sum(decode_rows) < 16 * len(decode_rows)
    assert engine.runner.forward_rows == log.rows


@pytest.mark.parametrize("sync_every", [1, 4])
def test_non_finite_logits_are_reported(llama, sync_every):
    """A model that turns out NaN logits (a diverged run) stops the rollout with a clear error, not
    with an index error or garbage token ids."""
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the third forward: decode step 2
            output = output.clone()
            output[1] = float("nan")
        return output

    handle = llama.get_output_embeddings().register_forward_hook(poison)
    runner = alignkit.rollout.TransformersRunner(llama, sync_every=sync_every)
    try:
        with pytest.raises(RuntimeError, match=r"non-finite logits \(NaN or inf\) for row\(s\) \[1\]"):
            RolloutEngine(llama, runner=runner).generate(
                _prompts(3), max_new_tokens=8, min_new_tokens=8, seed=0
            )
    finally:
        handle.remove()


def test_rollout_fields(llama, tokenizer):
    prompts = ["the cat sat", [5, 6, 7, 8, 9, 10, 11], "a dog"]
    out = RolloutEngine(llama, tokenizer).generate(prompts, n=2, max_new_tokens=5, top_k=10, seed=0)
    n, width, steps = 6, 7, out.response_ids.shape[1]
    assert isinstance(out, Rollout) and len(out) == n and steps <= 5
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "group_ids"):
        assert getattr(out, name).dtype == torch.int64
    assert out.prompt_ids.shape == out.prompt_mask.shape == (n, width)
    assert out.response_ids.shape == out.response_mask.shape == out.logprobs.shape == out.logit_floor.shape
    assert out.logprobs.dtype == out.logit_floor.dtype == torch.float32
    assert out.prompt_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]  # left padding
    assert out.prompt_ids[0, 4:].tolist() == tokenizer.encode("the cat sat")
    assert bool(
        (out.response_mask.cumsum(-1) == torch.arange(1, steps + 1)).logical_or(out.response_mask == 0).all()
    )
    assert out.texts == [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                         for r, m in zip(out.response_ids, out.response_mask, strict=True)]  # fmt: skip
    positions = out.position_ids()
    assert positions[0, 4:7].tolist() == [0, 1, 2] and positions[0, 7] == 3


def test_chat_prompts_use_the_template(llama, tokenizer):
    messages = [{"role": "user", "content": "hello world"}]
    engine = RolloutEngine(llama, tokenizer)
    plain = engine.generate([messages], max_new_tokens=2, temperature=0)  # no template: role: content
    assert plain.prompt_ids[0].tolist() == tokenizer.encode("user: hello world\nassistant:")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}yes{% endif %}"
    )
    try:
        templated = engine.generate([messages], max_new_tokens=2, temperature=0)
    finally:
        tokenizer.chat_template = None
    assert templated.prompt_ids[0].tolist() == tokenizer.encode("hello world yes")


def test_context_limit(model):
    engine = RolloutEngine(model)
    out = engine.generate([[5] * (CONTEXT - 3), [6, 7]], max_new_tokens=10, temperature=0)
    assert int(out.response_mask[0].sum()) == 3 and out.finish_reason[0] in ("length", "eos")
    with pytest.raises(ValueError, match=r"prompts\[1\].*context"):
        engine.generate([[5], [5] * CONTEXT], max_new_tokens=1)


def test_progress_bar_and_runner_seam(llama, tokenizer):
    out = RolloutEngine(llama).generate(_prompts(2), max_new_tokens=3, progress=True, seed=0)
    assert out.response_ids.shape[0] == 2

    class EchoRunner:  # a backend behind the same Rollout (what a vLLM runner would be)
        def generate(self, prompt_ids, params, *, progress):
            self.seen = (prompt_ids, params)
            rows = torch.tensor(prompt_ids)
            return Rollout(rows, torch.ones_like(rows), rows, torch.ones_like(rows), torch.zeros(rows.shape),
                           None, ["length"] * len(rows), torch.arange(len(rows)))  # fmt: skip

    runner = EchoRunner()
    echoed = RolloutEngine(llama, tokenizer, runner=runner).generate(["the cat"], max_new_tokens=4, top_p=0.5)
    assert runner.seen == ([tokenizer.encode("the cat")], SamplingParams(max_new_tokens=4, top_p=0.5))
    assert echoed.texts == ["the cat"]


BAD = [
    ({"prompts": []}, ValueError, "prompts"),
    ({"prompts": "the cat"}, TypeError, "prompts"),
    ({"prompts": ["the cat"]}, TypeError, r"prompts\[0\].*tokenizer"),
    ({"prompts": [[5, "x"]]}, TypeError, r"prompts\[0\]\[1\]"),
    ({"prompts": [[]]}, ValueError, r"prompts\[0\]"),
    ({"prompts": [[5, 10_000]]}, ValueError, r"prompts\[0\].*vocabulary"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens"),
    ({"min_new_tokens": 5}, ValueError, "min_new_tokens"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"n": 0}, ValueError, "n must"),
    ({"stop": ["end"]}, TypeError, "stop.*tokenizer"),
    ({"stop": [1.5]}, TypeError, "stop"),
    ({"seed": "x"}, TypeError, "seed"),
    ({"seed": 2.0}, TypeError, "seed"),
    ({"seed": [1, 2]}, ValueError, r"seed must have one entry per prompt \(1\), got 2"),
    ({"seed": []}, ValueError, "seed must not be an empty"),
    ({"seed": [-1]}, ValueError, r"seed\[0\] must be >= 0"),
    ({"seed": [1.5]}, TypeError, r"seed\[0\] must be an int"),
    ({"seed": [True]}, TypeError, r"seed\[0\] must be an int"),
    ({"seed": {3}}, TypeError, "seed must be None, an int or a sequence"),
]


@pytest.mark.parametrize(("override", "error", "match"), BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused_before_any_compute(llama, override, error, match):
    kwargs = {"prompts": [[5, 6]], "max_new_tokens": 4, **override}
    with _ForwardLog(llama) as log, pytest.raises(error, match=match):
        RolloutEngine(llama).generate(kwargs.pop("prompts"), **kwargs)
    assert log.rows == []
