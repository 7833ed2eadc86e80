"""Static-shape decode steps (alignkit/rollout/decode_graphs.py): what a CUDA-graph replay runs.

On CPU the ``"static"`` mode runs the graphs mode's step without capturing it. Checked here: it
samples what the dynamic (``"eager"``) step samples, on Llama (GQA, sdpa), Qwen2 (q/k/v biases,
sdpa) and GPT-2 (eager attention), with mixed prompt lengths, n > 1 and rows finishing at different
steps; it stays right when the cache's Python state is frozen at its "capture" values (a replay
re-runs kernels, not Python); it makes no host read (a capture forbids them); the batch runs at
the bucket sizes. On CUDA (marked gpu, bench/gpu.sh) the captured graphs replay what the static
step computes.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import alignkit
from alignkit.rollout import engine as engine_module
from alignkit.rollout.decode_graphs import StaticDecoder, buckets, resolve_decode, static_length
from alignkit.rollout.forward import ModelSpec

VOCAB, CONTEXT = 50, 64
EOS_IDS = list(range(3, VOCAB, 6))  # ~1 in 6 tokens ends a row: rows finish at different steps
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
SETTINGS = {
    "temperature": {"temperature": 0.9},
    "top_k": {"temperature": 1.2, "top_k": 6},
    "top_p": {"temperature": 1.0, "top_p": 0.8},
}


def _config(kind: str):
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": EOS_IDS}
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, **special
        )
    config_class = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    return config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **special,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    loaded = {}
    for kind, attention in (("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "eager")):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        transformers.AutoModelForCausalLM.from_config(_config(kind)).save_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention)
        # float64: the static step attends over max_len columns (the unfilled ones masked), a
        # different summation than the dynamic step's; in float64 that difference is far below
        # the fp32 logits both hand to the sampler, so the sampled tokens must agree exactly.
        loaded[kind] = model.double().train(False)
    return loaded


def _generate(model, decode: str, **settings):
    engine = alignkit.RolloutEngine(model, decode=decode)
    out = engine.generate(PROMPTS, n=3, max_new_tokens=12, seed=3, **settings)
    return out, engine.runner.forward_rows


def _assert_same(a, b, atol: float = 1e-6) -> None:
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert a.finish_reason == b.finish_reason
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=atol)
    if a.logit_floor is None:
        assert b.logit_floor is None
    else:
        torch.testing.assert_close(a.logit_floor, b.logit_floor, rtol=0, atol=atol)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_static_decode_samples_what_eager_decode_samples(models, kind, setting):
    eager, _ = _generate(models[kind], "eager", **SETTINGS[setting])
    static, rows = _generate(models[kind], "static", **SETTINGS[setting])
    lengths = eager.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2  # rows finished at different steps: the cache compacted
    _assert_same(eager, static)
    # prefill on the 3 distinct prompts, then steps at the bucket of the rows still sampling
    assert rows[0] == 3
    for step, size in enumerate(rows[1:], start=1):
        assert size == min(b for b in buckets(9) if b >= int((lengths > step).sum()))


def test_buckets_and_cache_length():
    assert [static_length(n) for n in (1, 16, 17, 40)] == [16, 16, 32, 48]
    assert buckets(1) == [1]
    assert buckets(9) == [9, 8, 4, 2, 1]
    assert buckets(16) == [16, 8, 4, 2, 1]
    assert buckets(64) == [64, 32, 16, 8, 4, 2, 1]


class _FrozenPython(StaticDecoder):
    """The static step with the cache's Python state (filled length, active rows) set back to what
    it was at the first step of each bucket: what a CUDA-graph replay sees, since it re-runs the
    kernels recorded at capture and none of the Python."""

    def step(self, size: int) -> torch.Tensor:
        frozen = self.__dict__.setdefault("frozen", {})
        state = (self.cache.length, self.cache.active)
        length, active = frozen.setdefault(size, state)
        objects = [self.cache, *self.cache.layers]
        saved = [(o.__dict__.get("length"), o.active) for o in objects]
        for layer in self.cache.layers:
            layer.length = length
        for o in objects:
            o.active = active
        try:
            return super().step(size)
        finally:
            for o, (old_length, old_active) in zip(objects, saved, strict=True):
                if old_length is not None:
                    o.length = old_length
                o.active = old_active


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_static_step_does_not_depend_on_python_state(models, kind, monkeypatch):
    eager, _ = _generate(models[kind], "eager", **SETTINGS["top_k"])
    monkeypatch.setattr(engine_module, "StaticDecoder", _FrozenPython)
    frozen, _ = _generate(models[kind], "static", **SETTINGS["top_k"])
    _assert_same(eager, frozen)


class _HostReads(TorchDispatchMode):
    """Records the ops that read tensor data on the host or have data-dependent output shapes."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "repeat_interleave")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING or "_unique" in name:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_static_step_makes_no_host_read(models, kind, monkeypatch):
    reads, steps = _HostReads(), []
    original = StaticDecoder.step

    def watched(self, size):
        steps.append(size)
        with reads:
            return original(self, size)

    monkeypatch.setattr(StaticDecoder, "step", watched)
    _generate(models[kind], "static", **SETTINGS["top_p"])
    assert len(steps) > 3
    assert reads.seen == []
    # the counter does see one (so the empty list above means something)
    with reads:
        torch.tensor([1.0]).item()
    assert reads.seen


def test_decode_modes_and_errors(models):
    llama = models["llama"]
    spec = ModelSpec.of(llama)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode("auto", spec, cpu) == "eager"
    assert resolve_decode("auto", spec, cuda) == "graphs"
    assert resolve_decode("auto", dataclasses.replace(spec, attention="flash_attention_2"), cuda) == "eager"
    with pytest.raises(ValueError, match="decode='static' needs an attention implementation"):
        resolve_decode("static", dataclasses.replace(spec, attention="flex_attention"), cpu)
    with pytest.raises(ValueError, match="decode must be one of"):
        alignkit.RolloutEngine(llama, decode="fast")
    with pytest.raises(ValueError, match="decode must be one of"):
        alignkit.RolloutEngine(llama, decode=None)
    with pytest.raises(ValueError, match="decode='graphs' needs a model on CUDA"):
        alignkit.RolloutEngine(llama, decode="graphs").generate(PROMPTS, max_new_tokens=3)
    runner = alignkit.rollout.TransformersRunner(llama)
    with pytest.raises(ValueError, match="decode applies to the built-in runner"):
        alignkit.RolloutEngine(llama, runner=runner, decode="static")


def test_auto_is_eager_on_cpu(models):
    auto, rows = _generate(models["llama"], "auto")
    eager, eager_rows = _generate(models["llama"], "eager")
    _assert_same(auto, eager)
    assert rows == eager_rows  # the dynamic step: exactly the live rows, no buckets
    assert any(size not in buckets(9) for size in rows)


# ----------------------------------------------------------------------------- CUDA (bench/gpu.sh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cuda_graph_decode_replays_the_static_step_gpu(models, kind, precision):
    model = copy.deepcopy(models[kind]).float().to("cuda")
    outs, rows = {}, {}
    for mode in ("static", "graphs", "eager"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "fp32"):
            outs[mode], rows[mode] = _generate(model, mode, **SETTINGS["top_k"])
    assert rows["graphs"] == rows["static"]
    _assert_same(outs["static"], outs["graphs"])  # the replays run the static step's kernels
    if precision == "fp32":  # other attention lengths, other summation: the parity tolerance
        _assert_same(outs["eager"], outs["graphs"], atol=1e-5)
