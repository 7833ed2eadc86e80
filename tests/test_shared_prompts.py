"""shared_prompt_logprobs / split_shared_prompts on tiny Llama / Qwen2 / GPT-2 models: in float64,
forward and every parameter gradient equal the whole-row oracle (log_softmax of the model's own
logits over prompt + response rows), for n samples per prompt, odd lengths and edge cases.

Tolerance: Llama's and Qwen2's RMSNorm computes in float32 even in a float64 model, so the prompt
gradients (summed over the rows before or after those casts) agree to ~1e-8 relative, not 1e-15;
GPT-2 (LayerNorm in float64) agrees to rounding."""

from __future__ import annotations

import pytest
import torch
import transformers
from oracles import IGNORE, assert_close, ref_logprobs, ref_logprobs_truncated

import alignkit
from alignkit.ops.shared_prompts import supports_shared_prompts
from alignkit.trainer.modeling import enable_gradient_checkpointing

VOCAB, HIDDEN = 67, 32


def _config(kind: str):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "llama":
        return transformers.LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2)
    if kind == "qwen2":  # tied embeddings, GQA, qkv bias
        return transformers.Qwen2Config(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True
        )
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _load(path, attention="sdpa", dtype=torch.float64):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention
    )
    return model.train(False)


def _rows(prompt_lengths, n, response_lengths):
    """Whole rows, the rollout layout: prompt u (random ids, length prompt_lengths[u]) left-padded,
    repeated n times, then right-padded responses of the given lengths (one per row)."""
    P, T = max(prompt_lengths), max(response_lengths)
    rows = len(prompt_lengths) * n
    ids = torch.randint(0, VOCAB, (rows, P + T))
    mask = torch.zeros(rows, P + T, dtype=torch.long)
    for u, length in enumerate(prompt_lengths):
        prompt = torch.randint(0, VOCAB, (length,))
        for r in range(u * n, (u + 1) * n):
            ids[r, P - length : P] = prompt
            mask[r, P - length : P] = 1
    for r, length in enumerate(response_lengths):
        mask[r, P : P + length] = 1
    return ids, mask, torch.full((rows,), P)


def _right_padded(ids, mask):
    """The same rows with their real tokens moved to the left (eager attention in float64 turns a
    fully masked left-padding query into NaN, so the oracle runs right-padded rows)."""
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        out_ids[r, :n] = ids[r, mask[r].bool()]
        out_mask[r, :n] = 1
    return out_ids, out_mask, mask.argmax(-1)


def _response_logits(model, ids, mask, response_start):
    """(logits (N, T, V), labels (N, T)) of the response tokens, from the model on whole rows."""
    ids, mask, shift = _right_padded(ids, mask)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    start = response_start - shift  # the first response column, per row
    T = int((mask.sum(-1) - start).max())
    columns = (start[:, None] - 1 + torch.arange(T)).clamp(max=labels.shape[1] - 1)  # predicting columns
    real = torch.arange(T) < (mask.sum(-1) - start)[:, None]
    labels = torch.where(real, labels.gather(1, columns), IGNORE)
    return logits.gather(1, columns[..., None].expand(-1, -1, logits.shape[-1])), labels


def _oracle(model, ids, mask, response_start, temperature=1.0, floor=None):
    """(logp, entropy) of every response token, (N, T), from the model's logits on whole rows."""
    logits, labels = _response_logits(model, ids, mask, response_start)
    if floor is None:
        return ref_logprobs(logits, labels, temperature)
    return ref_logprobs_truncated(logits, labels, floor, temperature)


def _grads(model, outputs, upstream):
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum((o * g).sum() for o, g in zip(outputs, upstream, strict=True))
    return torch.autograd.grad(total, params, allow_unused=True)


def _assert_same_grads(model_dir, model, got, want):
    """Every parameter gradient equals the oracle's (see the module docstring for the tolerance)."""
    rtol = 1e-12 if "gpt2" in str(model_dir) else 1e-6
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        if w is None:
            assert g is None or g.abs().max() == 0, name
            continue
        assert_close(g, w, rtol=rtol, name=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("prompt_lengths", "n", "response_lengths"),
    [
        ([3, 7, 1], 4, [5, 1, 6, 6, 2, 6, 3, 4, 6, 1, 1, 5]),  # padding on both sides
        ([5], 1, [1]),  # one row, T = 1
        ([2, 2], 3, [4, 0, 4, 2, 3, 1]),  # equal lengths, different tokens; an empty response
    ],
)
def test_shared_prompt_logprobs_match_whole_rows_float64(
    model_dir, attention, prompt_lengths, n, response_lengths
):
    model = _load(model_dir, attention)
    ids, mask, start = _rows(prompt_lengths, n, response_lengths)
    batch = alignkit.split_shared_prompts(ids, mask, start)
    assert batch.prompt_ids.shape[0] == len(prompt_lengths)  # one forward per distinct prompt
    temperature = 0.7
    logp, ent = alignkit.shared_prompt_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
        batch.prompt_index, temperature=temperature, return_entropy=True,
    )  # fmt: skip
    ref_logp, ref_ent = _oracle(model, ids, mask, start, temperature)
    assert logp.dtype == torch.float64 and logp.shape == ref_logp.shape == batch.response_ids.shape
    assert_close(logp, ref_logp, rtol=1e-7, name="logp")
    assert_close(ent, ref_ent, rtol=1e-7, name="entropy")
    assert (logp[batch.response_mask] <= 0).all() and (logp[~batch.response_mask] == 0).all()
    upstream = [torch.randn_like(logp), torch.randn_like(ent)]
    got = _grads(model, (logp, ent), upstream)
    want = _grads(model, _oracle(model, ids, mask, start, temperature), upstream)
    _assert_same_grads(model_dir, model, got, want)


def test_shared_prompt_logprobs_floor_and_hidden(model_dir):
    model = _load(model_dir)
    ids, mask, start = _rows([4, 6], 3, [3, 5, 5, 1, 5, 2])
    batch = alignkit.split_shared_prompts(ids, mask, start)
    # A floor at or below each sampled token's logit (the token survives truncation), above others.
    logits, labels = _response_logits(model, ids, mask, start)
    label_logit = logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0].detach()
    floor = label_logit - torch.rand(label_logit.shape, dtype=torch.float64) * logits.detach().std()
    logp, ent, hidden = alignkit.shared_prompt_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
        batch.prompt_index, return_entropy=True, logit_floor=floor, return_hidden=True,
    )  # fmt: skip
    ref_logp, ref_ent = _oracle(model, ids, mask, start, floor=floor)
    states = alignkit.shared_prompt_hidden(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
        batch.prompt_index,
    )  # fmt: skip
    assert torch.equal(states, hidden)  # the body part alone
    assert_close(logp, ref_logp, rtol=1e-7, name="logp")
    assert_close(ent, ref_ent, rtol=1e-7, name="entropy")
    # The states that predict the responses: the body's on whole rows, at columns P - 1 ... P + T - 2.
    right_ids, right_mask, shift = _right_padded(ids, mask)
    states = model.base_model(input_ids=right_ids, attention_mask=right_mask).last_hidden_state
    T = batch.response_ids.shape[1]
    columns = (start - shift - 1)[:, None] + torch.arange(T)
    want = states.gather(1, columns.clamp(max=states.shape[1] - 1)[..., None].expand(-1, -1, HIDDEN))
    real = batch.response_mask
    assert hidden.shape == want.shape and hidden.requires_grad
    assert_close(hidden[real], want[real], rtol=1e-7, name="hidden")


def test_shared_prompt_logprobs_column_positions(model_dir):
    """prompt_position_ids=arange(P): the positions of whole left-padded rows scored without
    position ids (TRL's convention), which GPT-2's learned positions tell apart."""
    model = _load(model_dir)
    ids, mask, start = _rows([2, 5], 3, [4, 2, 4, 3, 4, 1])
    b = alignkit.split_shared_prompts(ids, mask, start)
    P = int(start[0])
    assert b.prompt_ids.shape[1] == P  # the longest prompt fills the prompt columns
    columns = torch.arange(P).expand_as(b.prompt_ids)
    logp = alignkit.shared_prompt_logprobs(
        model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.prompt_index,
        prompt_position_ids=columns,
    )  # fmt: skip
    logits = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1]  # no position ids
    labels = ids[:, P:].masked_fill(mask[:, P:] == 0, IGNORE)
    ref, _ = ref_logprobs(logits, labels[:, : logits.shape[1]])
    assert_close(logp, ref[:, : logp.shape[1]], rtol=1e-7, name="logp")
    with pytest.raises(ValueError, match="prompt_position_ids"):
        alignkit.shared_prompt_logprobs(
            model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.prompt_index,
            prompt_position_ids=columns[:, :1],
        )  # fmt: skip


def test_split_shared_prompts_layouts():
    """The rollout layout (left-padded prompts) and the buffer's (right-padded rows) split alike."""
    ids, mask, start = _rows([3, 1, 3], 2, [2, 4, 1, 3, 4, 2])
    left = alignkit.split_shared_prompts(ids, mask, start)
    right_ids, right_mask, shift = _right_padded(ids, mask)  # the buffer's padded layout
    right = alignkit.split_shared_prompts(right_ids, right_mask, start - shift)
    for a, b in zip(left[:5], right[:5], strict=True):
        assert torch.equal(a, b)
    # response_columns gathers the input layout into the response layout.
    gathered = right_ids.gather(1, right.response_columns).masked_fill(~right.response_mask, 0)
    assert torch.equal(gathered, right.response_ids)
    assert right.prompt_ids.shape[0] == 3 and torch.equal(right.prompt_index[::2], right.prompt_index[1::2])
    # The prompt rows are the distinct prompts, left-padded.
    for r in range(ids.shape[0]):
        u = int(right.prompt_index[r])
        prompt = right.prompt_ids[u][right.prompt_mask[u]]
        assert torch.equal(prompt, ids[r, : int(start[r])][mask[r, : int(start[r])].bool()])
        assert right.prompt_mask[u, -1]


def test_split_shared_prompts_all_distinct_and_empty():
    ids, mask, start = _rows([2, 3, 4], 1, [1, 2, 3])
    batch = alignkit.split_shared_prompts(ids, mask, start)
    assert batch.prompt_ids.shape[0] == 3 and sorted(batch.prompt_index.tolist()) == [0, 1, 2]
    empty = alignkit.split_shared_prompts(ids[:0], mask[:0], start[:0])
    assert empty.response_ids.shape == (0, 0) and empty.prompt_index.shape == (0,)


def test_shared_prompts_bad_input(model_dir):
    model = _load(model_dir)
    ids, mask, start = _rows([3, 2], 2, [2, 1, 2, 2])
    b = alignkit.split_shared_prompts(ids, mask, start)
    args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.prompt_index)
    with pytest.raises(ValueError, match="response_start"):
        alignkit.split_shared_prompts(ids, mask, start[:3])
    with pytest.raises(ValueError, match="response_start"):
        alignkit.split_shared_prompts(ids, mask, start - 3)  # no prompt token left in some rows
    with pytest.raises(ValueError, match="contiguous"):
        holes = mask.clone()
        holes[0, -1] = 1
        holes[0, -2] = 0
        alignkit.split_shared_prompts(ids, holes, start)
    with pytest.raises(TypeError, match="input_ids"):
        alignkit.split_shared_prompts(ids.float(), mask, start)
    with pytest.raises(ValueError, match="prompt_index"):
        alignkit.shared_prompt_logprobs(model, *args[:4], b.prompt_index + 5)
    with pytest.raises(ValueError, match="prompt_index"):
        alignkit.shared_prompt_logprobs(model, *args[:4], b.prompt_index[:2])
    with pytest.raises(ValueError, match="left-padded"):
        alignkit.shared_prompt_logprobs(model, args[0], args[1].flip(-1), *args[2:])
    with pytest.raises(ValueError, match="response_mask"):
        alignkit.shared_prompt_logprobs(model, *args[:3], b.response_mask[:, :1], args[4])
    with pytest.raises(ValueError, match="input_ids must lie"):
        alignkit.shared_prompt_logprobs(model, args[0], args[1], args[2] + VOCAB, *args[3:])
    with pytest.raises(TypeError, match="return_hidden"):
        alignkit.shared_prompt_logprobs(model, *args, return_hidden="yes")
    # a reentrant checkpoint sends no gradient to the prompt states (not its inputs): refused
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    assert not supports_shared_prompts(model)
    with pytest.raises(ValueError, match="non-reentrant"):
        alignkit.shared_prompt_logprobs(model, *args)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


class _SavedBytes:
    """Bytes autograd saves for backward inside the context (what checkpointing cuts)."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def test_shared_prompt_logprobs_with_gradient_checkpointing(model_dir):
    """Gradient checkpointing on (transformers' non-reentrant per-layer kind, as the trainer turns it
    on): values and every parameter gradient still equal the whole-row oracle, the layers really
    recompute in backward (the prompt pass as one block, the response pass per layer), and autograd
    keeps a fraction of what it keeps without checkpointing."""
    ids, mask, start = _rows([3, 7, 1], 3, [5, 1, 6, 6, 2, 6, 3, 4, 6])
    batch = alignkit.split_shared_prompts(ids, mask, start)
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, batch.prompt_index)
    plain, checkpointed = _no_dropout(_load(model_dir)).train(), _no_dropout(_load(model_dir)).train()
    enable_gradient_checkpointing(checkpointed)
    assert supports_shared_prompts(checkpointed)
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        mlp_calls: list[int] = []
        mlps = [m for n, m in model.named_modules() if n.endswith("mlp")]
        # pre-hooks: a recompute stops once it has rebuilt the last saved tensor (inside the MLP)
        hooks = [m.register_forward_pre_hook(lambda *a, calls=mlp_calls: calls.append(1)) for m in mlps]
        with _SavedBytes() as saved:
            logp, ent = alignkit.shared_prompt_logprobs(model, *args, temperature=0.7, return_entropy=True)
        forward_calls = len(mlp_calls)
        torch.manual_seed(1)
        upstream = [torch.randn_like(logp), torch.randn_like(ent)]
        grads = _grads(model, (logp, ent), upstream)
        for h in hooks:
            h.remove()
        results[name] = (logp, ent, grads, forward_calls, len(mlp_calls) - forward_calls, saved.total)
    assert results["plain"][3] == 2 * len(mlps) and results["plain"][4] == 0  # prompts, responses
    assert results["checkpointed"][3] == 2 * len(mlps)
    assert results["checkpointed"][4] == 2 * len(mlps)  # backward ran both passes again
    assert results["checkpointed"][5] < 0.5 * results["plain"][5], (
        results["checkpointed"][5],
        results["plain"][5],
    )
    plain.train(False)
    ref_logp, ref_ent = _oracle(plain, ids, mask, start, 0.7)
    logp, ent, grads = results["checkpointed"][:3]
    assert_close(logp, ref_logp, rtol=1e-7, name="logp")
    assert_close(ent, ref_ent, rtol=1e-7, name="entropy")
    want = _grads(plain, _oracle(plain, ids, mask, start, 0.7), upstream)
    _assert_same_grads(model_dir, plain, grads, want)


def test_shared_prompts_reject_sliding_window():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, use_sliding_window=True, sliding_window=4, max_window_layers=0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert not alignkit.ops.shared_prompts.supports_shared_prompts(model)
    ids, mask, start = _rows([3], 2, [2, 2])
    b = alignkit.split_shared_prompts(ids, mask, start)
    with pytest.raises(ValueError, match="full\\s+attention"):
        alignkit.shared_prompt_logprobs(
            model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.prompt_index
        )


@pytest.mark.gpu
def test_shared_prompt_logprobs_gpu_fp32(model_dir):
    """On CUDA (Triton fused log-probs, fp32): no further from the float64 oracle than whole rows in
    fp32, and the same parameter gradients."""
    ids, mask, start = _rows([3, 9, 5], 4, [7, 1, 8, 8, 2, 8, 3, 4, 8, 1, 6, 5])
    with torch.no_grad():
        oracle, _ = _oracle(_load(model_dir), ids, mask, start)
    model = _load(model_dir, dtype=torch.float32).cuda()
    ids, mask, start = ids.cuda(), mask.cuda(), start.cuda()
    b = alignkit.split_shared_prompts(ids, mask, start)
    logp = alignkit.shared_prompt_logprobs(
        model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.prompt_index
    )
    T = b.response_ids.shape[1]
    whole = alignkit.causal_lm_logprobs(
        model, ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=T
    )[:, : ids.shape[1] - int(start[0])]
    err = float((logp.detach().cpu().double() - oracle).abs().max())
    whole_err = float((whole.detach().cpu().double() - oracle[:, : whole.shape[1]]).abs().max())
    assert err <= whole_err + 1e-5, (err, whole_err)
    upstream = torch.randn_like(logp)
    got = _grads(model, (logp,), (upstream,))
    want = _grads(model, (whole,), (upstream[:, : whole.shape[1]],))
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        if w is not None:
            assert_close(g, w, rtol=1e-4, name=name)
