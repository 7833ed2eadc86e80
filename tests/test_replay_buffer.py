"""alignkit.ReplayBuffer: layouts, sampling strategies, persistence and bad input."""

from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from alignkit import ReplayBuffer, SequenceField, TokenField, token_budget_minibatches


def make_buffer(capacity_tokens: int = 1000, **kw) -> ReplayBuffer:
    return ReplayBuffer(
        [
            TokenField("tokens", torch.int32, pad=-1),
            TokenField("logprobs", torch.float32),
            TokenField("loss_mask", torch.uint8),
        ],
        [
            SequenceField("score", torch.float32),
            SequenceField("group_id", torch.int64),
            SequenceField("policy_version", torch.int64),
        ],
        capacity_tokens=capacity_tokens,
        group_field="group_id",
        version_field="policy_version",
        **kw,
    )


def seq(key: int, length: int, group: int = 0, version: int = 0) -> dict:
    t = torch.arange(length, dtype=torch.int32)
    return {
        "tokens": key * 100 + t,
        "logprobs": -(t.float() + key),
        "loss_mask": (t % 2).to(torch.uint8),
        "score": float(key),
        "group_id": group,
        "policy_version": version,
    }


def test_add_single_and_padded_batch_right_and_left() -> None:
    rb = make_buffer()
    ids = [rb.add(**seq(k, n)) for k, n in [(1, 3), (2, 7), (3, 1)]]
    assert ids == [0, 1, 2]
    assert len(rb) == 3 and rb.num_tokens == 11
    for side in ("right", "left"):
        b = rb.get(ids, padding_side=side, pad_values={"logprobs": 9.5})
        assert b["tokens"].shape == (3, 7) and b.attention_mask.shape == (3, 7)
        for r, (k, n) in enumerate([(1, 3), (2, 7), (3, 1)]):
            s = seq(k, n)
            sl = slice(0, n) if side == "right" else slice(7 - n, 7)
            pad = slice(n, 7) if side == "right" else slice(0, 7 - n)
            assert torch.equal(b["tokens"][r, sl], s["tokens"])
            assert torch.equal(b["logprobs"][r, sl], s["logprobs"])
            assert (b["tokens"][r, pad] == -1).all() and (b["logprobs"][r, pad] == 9.5).all()
            assert b.attention_mask[r].sum() == n and b.attention_mask[r, sl].all()
        assert b["score"].tolist() == [1.0, 2.0, 3.0]
        assert b.lengths.tolist() == [3, 7, 1]


def test_add_padded_with_lengths_mask_and_packed_round_trip() -> None:
    rb = make_buffer()
    B, T = 4, 6
    lens = torch.tensor([6, 1, 3, 4])
    tokens = torch.arange(B * T, dtype=torch.int32).reshape(B, T)
    common = {
        "logprobs": torch.randn(B, T),
        "loss_mask": torch.ones(B, T, dtype=torch.uint8),
        "score": torch.zeros(B),
        "group_id": torch.arange(B),
        "policy_version": torch.zeros(B, dtype=torch.int64),
    }
    ids_left = rb.add_padded(tokens=tokens, lengths=lens, padding_side="left", **common)
    mask = torch.arange(T)[None, :] >= (T - lens)[:, None]
    ids_mask = rb.add_padded(tokens=tokens, mask=mask, **common)
    out = rb.get(torch.cat([ids_left, ids_mask]), layout="packed")
    assert out.cu_seqlens.tolist() == [0, 6, 7, 10, 14, 20, 21, 24, 28]
    expect = torch.cat([tokens[b, T - n :] for b, n in enumerate(lens.tolist())])
    assert torch.equal(out["tokens"], torch.cat([expect, expect]))
    assert torch.equal(out.position_ids[:6], torch.arange(6)) and out.position_ids[6] == 0
    # Packed input -> same ids/data back.
    cu = out.cu_seqlens.long()
    ids_packed = rb.add_packed(
        tokens=out["tokens"][:14],
        logprobs=out["logprobs"][:14],
        loss_mask=out["loss_mask"][:14],
        cu_seqlens=cu[:5],
        score=out["score"][:4],
        group_id=out["group_id"][:4],
        policy_version=out["policy_version"][:4],
    )
    again = rb.get(ids_packed, layout="packed")
    assert torch.equal(again["tokens"], out["tokens"][:14]) and torch.equal(
        again["logprobs"], out["logprobs"][:14]
    )
    # NumPy input works like torch input.
    i = rb.add(**{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in seq(5, 4).items()})
    assert torch.equal(rb.get([i])["tokens"][0], seq(5, 4)["tokens"])


def test_fifo_eviction_by_tokens_and_sequences() -> None:
    rb = make_buffer(capacity_tokens=10, capacity_sequences=3)
    for k, n in enumerate([4, 4, 2]):
        rb.add(**seq(k, n))
    assert rb.live_ids == range(0, 3) and rb.num_tokens == 10
    rb.add(**seq(3, 3))  # 13 > 10 tokens: evicts id 0 only
    assert rb.live_ids == range(1, 4) and rb.num_tokens == 9
    rb.add(**seq(4, 1))  # 4 sequences > 3: evicts id 1
    assert rb.live_ids == range(2, 5)
    b = rb.get(list(rb.live_ids), layout="packed")  # data that wrapped around the ring end
    assert torch.equal(b["tokens"], torch.cat([seq(k, n)["tokens"] for k, n in [(2, 2), (3, 3), (4, 1)]]))
    with pytest.raises(IndexError, match="evicted"):
        rb.get([0])
    with pytest.raises(IndexError, match="never added"):
        rb.get([99])
    assert rb.get([0, 3], skip_missing=True).ids.tolist() == [3]
    rb.clear()
    assert len(rb) == 0 and rb.num_tokens == 0
    assert rb.add(**seq(5, 10)) == 5  # ids are never reused


def test_uniform_sampling_is_seeded_and_without_replacement_is_distinct() -> None:
    a, b = make_buffer(seed=3), make_buffer(seed=3)
    for rb in (a, b):
        for k in range(30):
            rb.add(**seq(k, 1 + k % 5, version=k // 10))
    assert torch.equal(a.sample(16).ids, b.sample(16).ids)
    ids = a.sample(30, replace=False).ids
    assert sorted(ids.tolist()) == list(range(30))
    with pytest.raises(ValueError, match="needs 31 eligible"):
        a.sample(31, replace=False)
    fresh = a.sample(50, min_version=2)
    assert (fresh["policy_version"] >= 2).all() and set(fresh.ids.tolist()) <= set(range(20, 30))
    for batch in (a.sample(8, layout="packed"), a.sample(8)):
        for r, i in enumerate(batch.ids.tolist()):
            n = batch.lengths[r].item()
            got = (
                batch["tokens"][r, :n]
                if batch.layout == "padded"
                else batch["tokens"][batch.cu_seqlens[r] :][:n]
            )
            assert torch.equal(got, seq(i, 1 + i % 5)["tokens"])


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_prioritized_frequencies_match_priorities_chi_square() -> None:
    alpha, beta = 0.7, 0.5
    rb = make_buffer(alpha=alpha, seed=11)
    ids = [rb.add(**seq(k, 2)) for k in range(10)]
    p = np.arange(1, 11, dtype=np.float64)
    rb.update_priorities(ids, p)
    counts = np.zeros(10)
    draws = 0
    for _ in range(20):
        batch = rb.sample(1000, prioritized=True, beta=beta)
        counts += np.bincount(batch.ids.numpy(), minlength=10)
        draws += 1000
        # w_i = (N P_i)^-beta / max_j (N P_j)^-beta = (P_min / P_i)^beta
        probs = p**alpha / (p**alpha).sum()
        expect_w = (probs.min() / probs[batch.ids.numpy()]) ** beta
        np.testing.assert_allclose(batch.weights.numpy(), expect_w, rtol=1e-6)
    expected = draws * p**alpha / (p**alpha).sum()
    # Critical value of chi-square with 9 degrees of freedom at p = 0.001 (scipy.stats.chi2.ppf).
    assert chi_square(counts, expected) < 27.877
    # A wrong exponent (alpha = 1) must be rejected by the same test: the test can fail.
    wrong = draws * p / p.sum()
    assert chi_square(counts, wrong) > 27.877
    # Priorities can be updated and read back; bad values are rejected.
    assert rb.priorities([0, 9]).tolist() == [1.0, 10.0]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="priorities must be finite and > 0"):
            rb.update_priorities([0], [bad])


def test_prioritized_with_staleness_filter_and_missing_ids() -> None:
    rb = make_buffer(capacity_tokens=20, alpha=1.0)
    for k in range(10):
        rb.add(**seq(k, 2, version=k), priority=float(k + 1))
    b = rb.sample(200, prioritized=True, min_version=8)
    assert set(b.ids.tolist()) == {8, 9}
    rb.add(**seq(10, 2, version=10))  # evicts id 0
    assert rb.priorities([10]).tolist() == [10.0]  # new sequences get the max priority seen
    with pytest.raises(IndexError, match="id 0 is not in the buffer"):
        rb.update_priorities([0, 5], [1.0, 1.0])
    assert rb.priorities([5]).tolist() == [6.0]  # all or nothing
    rb.update_priorities([0, 5], [1.0, 2.0], ignore_missing=True)
    assert rb.priorities([5]).tolist() == [2.0]
    with pytest.raises(ValueError, match="replace=False is not supported"):
        rb.sample(2, prioritized=True, replace=False)


def test_group_sampling_returns_whole_groups() -> None:
    rb = make_buffer(capacity_tokens=64, seed=5)
    for g in range(6):
        for m in range(4):
            rb.add(**seq(g * 4 + m, 1 + m, group=g, version=g))
    b = rb.sample_groups(3)
    groups = b["group_id"].tolist()
    assert len(groups) == 12 and len(set(groups)) == 3
    assert all(groups[i] == groups[i // 4 * 4] for i in range(12))
    rb.add(**seq(99, 9, group=7))  # 60 + 9 > 64 tokens: evicts 3 of group 0's 4 members
    complete = rb.sample_groups(5, min_group_size=4)
    assert sorted(set(complete["group_id"].tolist())) == [1, 2, 3, 4, 5] and len(complete) == 20
    with pytest.raises(ValueError, match="needs 6 eligible"):
        rb.sample_groups(6, min_group_size=4)
    fresh = rb.sample_groups(1, min_group_size=4, min_version=5)
    assert set(fresh["group_id"].tolist()) == {5}
    assert len(rb.sample_groups(7)) == 22  # every live sequence, incomplete groups included
    with pytest.raises(ValueError, match="needs 9 eligible"):
        rb.sample_groups(9)
    no_groups = ReplayBuffer({"tokens": torch.int32}, capacity_tokens=8)
    no_groups.add(tokens=[1])
    with pytest.raises(ValueError, match="group field"):
        no_groups.sample_groups(1)


def test_epoch_visits_every_sequence_once_with_token_budget() -> None:
    rb = make_buffer(capacity_tokens=5000, seed=2)
    lengths = [(k * 37) % 50 + 1 for k in range(40)]
    for k, n in enumerate(lengths):
        rb.add(**seq(k, n))
    for layout in ("packed", "padded"):
        seen = []
        for batch in rb.epoch(max_tokens=128, layout=layout):
            cost = batch.num_tokens if layout == "packed" else batch["tokens"].numel()
            assert cost <= 128
            seen += batch.ids.tolist()
        assert sorted(seen) == list(range(40))
    sizes = [len(b) for b in rb.epoch(batch_size=16, drop_last=True)]
    assert sizes == [16, 16]
    assert sum(len(b) for b in rb.epoch(batch_size=16)) == 40
    bins = token_budget_minibatches(torch.tensor(lengths), 100)
    assert sorted(torch.cat(bins).tolist()) == list(range(40))
    assert all(sum(lengths[i] for i in b.tolist()) <= 100 for b in bins)
    with pytest.raises(ValueError, match="does not fit in max_tokens=10"):
        token_budget_minibatches([11], 10)


def test_sample_blocks_until_data_or_times_out() -> None:
    rb = make_buffer()
    with pytest.raises(ValueError, match="empty"):
        rb.sample(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        rb.sample(1, timeout=0.05)
    assert time.monotonic() - start >= 0.05

    def producer() -> None:
        time.sleep(0.05)
        for k in range(4):
            rb.add(**seq(k, 3))

    t = threading.Thread(target=producer)
    t.start()
    batch = rb.sample(4, replace=False, timeout=10.0)
    t.join()
    assert sorted(batch.ids.tolist()) == [0, 1, 2, 3]


def test_save_load_round_trip_and_corruption(tmp_path) -> None:
    rb = make_buffer(capacity_tokens=50, seed=9, alpha=0.5)
    for k in range(30):
        rb.add(**seq(k, 1 + k % 6, group=k % 4, version=k))
    rb.update_priorities([29, 28], [3.0, 4.0])
    path = tmp_path / "buffer.akrb"
    rb.save(path)
    assert os.listdir(tmp_path) == ["buffer.akrb"]  # the temp file was renamed away
    loaded = ReplayBuffer.load(path)
    for clone in (loaded, pickle.loads(pickle.dumps(rb))):
        assert clone.live_ids == rb.live_ids and clone.num_tokens == rb.num_tokens
        assert clone.token_fields == rb.token_fields and clone.group_field == "group_id"
        ids = list(rb.live_ids)
        a, b = rb.get(ids, layout="packed"), clone.get(ids, layout="packed")
        assert all(torch.equal(a[f], b[f]) for f in a.fields)
        assert torch.equal(clone.priorities(ids), rb.priorities(ids))
    assert torch.equal(
        loaded.sample(8, prioritized=True).ids, rb.sample(8, prioritized=True).ids
    )  # RNG state saved
    data = path.read_bytes()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0x40
    (tmp_path / "corrupt").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ReplayBuffer.load(tmp_path / "corrupt")
    (tmp_path / "short").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        ReplayBuffer.load(tmp_path / "short")
    (tmp_path / "other").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not an alignkit replay buffer"):
        ReplayBuffer.load(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(tmp_path / "missing")
    with pytest.raises(OSError):
        rb.save(tmp_path / "no_such_dir" / "x")
    assert ReplayBuffer.load(path).live_ids == rb.live_ids  # the good file is untouched


BAD_INPUT = [
    (
        lambda rb: rb.add(**{**seq(1, 3), "tokens": torch.zeros(3, dtype=torch.int64)}),
        TypeError,
        "'tokens' must have dtype torch.int32",
    ),
    (
        lambda rb: rb.add(**{**seq(1, 3), "logprobs": np.zeros(3)}),
        TypeError,
        "'logprobs' must have dtype float32",
    ),
    (
        lambda rb: rb.add(**{**seq(1, 3), "logprobs": torch.zeros(4)}),
        ValueError,
        r"one shape: 'tokens' has \(3,\), 'logprobs' has \(4,\)",
    ),
    (
        lambda rb: rb.add(**{**seq(1, 3), "tokens": torch.zeros(1, 3, dtype=torch.int32)}),
        ValueError,
        "must be 1-D",
    ),
    (lambda rb: rb.add(**seq(1, 3), extra=1), ValueError, r"unknown field\(s\) \['extra'\]"),
    (lambda rb: rb.add(tokens=[1]), ValueError, "missing field"),
    (lambda rb: rb.add(**seq(1, 101)), ValueError, "more than capacity_tokens=100"),
    (lambda rb: rb.add(**seq(1, 2), priority=float("nan")), ValueError, "priority must be a positive finite"),
    (lambda rb: rb.add(**{**seq(1, 3), "score": [1.0, 2.0]}), ValueError, "'score' must be a scalar"),
    (lambda rb: rb.add(**{**seq(1, 3), "tokens": "abc"}), TypeError, "'tokens' must be"),
    (lambda rb: rb.add(**{**seq(1, 3), "tokens": [0.5, 1.5, 2.5]}), TypeError, "'tokens' must hold int32"),
    (lambda rb: rb.add(**{**seq(1, 0)}), ValueError, "lengths must be positive"),
    (
        lambda rb: rb.add_padded(**{k: v for k, v in seq(1, 3).items()}, lengths=[3]),
        ValueError,
        "must be 2-D",
    ),
    (
        lambda rb: rb.add_packed(
            tokens=torch.zeros(4, dtype=torch.int32),
            logprobs=torch.zeros(4),
            loss_mask=torch.zeros(4, dtype=torch.uint8),
            cu_seqlens=[0, 2, 5],
            score=torch.zeros(2),
            group_id=torch.zeros(2, dtype=torch.int64),
            policy_version=torch.zeros(2, dtype=torch.int64),
        ),
        ValueError,
        "must end at the packed length 4",
    ),
    (lambda rb: rb.sample(0), ValueError, "batch_size must be a positive int"),
    (lambda rb: rb.sample(2, layout="ragged"), ValueError, "layout must be"),
    (lambda rb: rb.sample(2, padding_side="middle"), ValueError, "padding_side"),
    (lambda rb: rb.sample(2, pad_values={"tokens": 2**40}), ValueError, r"pad_values\['tokens'\]"),
    (lambda rb: rb.sample(2, pad_values={"nope": 0}), ValueError, "unknown per-token field"),
    (lambda rb: rb.sample(2, timeout=-1), ValueError, "timeout must be"),
    (lambda rb: rb.sample(2, beta=float("nan")), ValueError, "beta must be a non-negative finite"),
    (lambda rb: rb.update_priorities([0, 1], [1.0]), ValueError, "priorities must have 2 values"),
    (lambda rb: rb.get([[0]]), ValueError, "ids must be 1-D"),
    (lambda rb: rb.epoch(), ValueError, "batch_size= and/or max_tokens="),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUT)
def test_bad_input_raises_clear_errors(call, exc, match) -> None:
    rb = make_buffer(capacity_tokens=100)
    rb.add(**seq(0, 3))
    rb.add(**seq(1, 2))
    with pytest.raises(exc, match=match):
        call(rb)
    assert rb.live_ids == range(0, 2) and rb.num_tokens == 5  # nothing half-added


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"token_fields": {"t": torch.bfloat16}}, TypeError, "dtype of field 't'"),
        ({"token_fields": {"t": "complex64"}}, TypeError, "dtype of field 't'"),
        ({"token_fields": {}}, ValueError, "at least one per-token field"),
        ({"token_fields": {"ids": torch.int32}}, ValueError, "reserved"),
        ({"capacity_tokens": 0}, ValueError, "capacity_tokens must be a positive int"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"group_field": "nope"}, ValueError, "group_field='nope'"),
        ({"sequence_fields": {"g": torch.float32}, "group_field": "g"}, TypeError, "integer dtype"),
    ],
)
def test_bad_schema(kwargs, exc, match) -> None:
    args = {"token_fields": {"t": torch.int32}, "capacity_tokens": 10, **kwargs}
    with pytest.raises(exc, match=match):
        ReplayBuffer(**args)


def test_bad_pad_value_in_schema() -> None:
    with pytest.raises(ValueError, match="pad of field 't' = 300 does not fit in uint8"):
        TokenField("t", torch.uint8, pad=300)
    with pytest.raises(ValueError, match="must be an integer"):
        TokenField("t", torch.int32, pad=0.5)


def test_tensor_inputs_are_not_modified_and_outputs_own_memory() -> None:
    rb = make_buffer()
    s = seq(3, 5)
    before = s["tokens"].clone()
    i = rb.add(**s)
    s["tokens"][0] = 77  # the buffer holds its own copy
    out = rb.get([i])
    assert torch.equal(out["tokens"][0], before)
    out["tokens"][0, 0] = 55  # and a batch is not a view of the arena
    assert rb.get([i])["tokens"][0, 0] == before[0]
    strided = torch.arange(10, dtype=torch.int32)[::2]  # non-contiguous input
    j = rb.add(**{**seq(4, 5), "tokens": strided})
    assert torch.equal(rb.get([j])["tokens"][0], strided)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_copy_into_caller_memory_matches_get(layout, side) -> None:
    """The pinned-memory path (caller-allocated tensors filled by the core), run unpinned on CPU."""
    rb = make_buffer(capacity_tokens=30)
    for k in range(12):
        rb.add(**seq(k, 1 + (k * 5) % 7, group=k % 3, version=k))
    ids = np.array([r for r in rb.live_ids][::-1], dtype=np.int64)
    gather = rb._gather_spec(layout, side, {"tokens": 5})
    expect = rb.get(ids, layout=layout, padding_side=side, pad_values={"tokens": 5})
    found = rb._core.gather(ids, *gather, False, ids_only=True)
    assert set(found) == {"ids", "lengths", "max_length", "total_tokens"}  # no copy made
    got = rb._copy_into(found["ids"], found["lengths"], layout, gather, pin=False)
    for name in expect.fields:
        assert torch.equal(got[name], expect[name]), name
    for name in ("ids", "lengths", "attention_mask", "cu_seqlens", "position_ids"):
        a, b = getattr(got, name), getattr(expect, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    rb.add(**seq(99, 30))  # evicts everything: the copy must refuse, not write stale data
    with pytest.raises(IndexError, match="evicted"):
        rb._copy_into(found["ids"], found["lengths"], layout, gather, pin=False)


def test_gather_into_rejects_bad_destinations() -> None:
    rb = make_buffer()
    rb.add(**seq(1, 4))
    outs = [np.empty((1, 4), np.int32), np.empty((1, 4), np.float32), np.empty((1, 4), np.uint8)]
    seqs = [np.empty(1, np.float32), np.empty(1, np.int64), np.empty(1, np.int64)]
    mask = np.empty((1, 4), bool)
    rb._core.gather_into(np.array([0]), 0, False, None, 4, outs, seqs, mask)
    assert outs[0].tolist() == [[100, 101, 102, 103]]
    with pytest.raises(ValueError, match="shorter than the longest sequence"):
        rb._core.gather_into(
            np.array([0]),
            0,
            False,
            None,
            3,
            [np.empty((1, 3), o.dtype) for o in outs],
            seqs,
            np.empty((1, 3), bool),
        )
    with pytest.raises(ValueError, match="output 'tokens' must be a writable C-contiguous int32 array of 4"):
        rb._core.gather_into(np.array([0]), 0, False, None, 4, [np.empty(3, np.int32), *outs[1:]], seqs, mask)
    readonly = np.empty((1, 4), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="'logprobs' must be a writable"):
        rb._core.gather_into(np.array([0]), 0, False, None, 4, [outs[0], readonly, outs[2]], seqs, mask)
    with pytest.raises(ValueError, match="attention_mask output is required"):
        rb._core.gather_into(np.array([0]), 0, False, None, 4, outs, seqs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_pin_memory_without_cuda_is_a_clear_error() -> None:
    rb = make_buffer()
    rb.add(**seq(1, 4))
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        rb.sample(1, pin_memory=True)


@pytest.mark.gpu
def test_pin_memory_outputs_are_pinned() -> None:
    rb = make_buffer()
    for k in range(8):
        rb.add(**seq(k, 1 + k))
    for layout in ("padded", "packed"):
        for batch in (
            rb.sample(4, layout=layout, pin_memory=True),
            rb.sample(4, layout=layout, prioritized=True, pin_memory=True),
            rb.get([1, 2], layout=layout, pin_memory=True),
            next(iter(rb.epoch(3, layout=layout, pin_memory=True))),
        ):
            assert all(t.is_pinned() for t in batch.fields.values())
            assert torch.equal(batch["tokens"].cuda().cpu(), batch["tokens"])


def narrow_buffer(**kw) -> ReplayBuffer:
    return ReplayBuffer(
        [TokenField("tok", torch.int8), TokenField("lp", torch.float16)],
        [SequenceField("score", torch.int16)],
        capacity_tokens=100,
        **kw,
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"tok": [300, -1, 5], "lp": [0.5, 0.5, 0.5], "score": 1}, "'tok' value 300 does not fit in int8"),
        ({"tok": [1, -129, 5], "lp": [0.5, 0.5, 0.5], "score": 1}, "'tok' value -129 does not fit in int8"),
        ({"tok": [1, 2, 3], "lp": [1e6, 0.5, 7e4], "score": 1}, "'lp' value 1000000.0 is out of range"),
        ({"tok": [1], "lp": [0.5], "score": 40000}, "'score' value 40000 does not fit in int16"),
        ({"tok": [1, 2, 2**64], "lp": [0.5, 0.5, 0.5], "score": 1}, "'tok' value 18446744073709551616"),
        ({"tok": [1, 2, 3], "lp": [0.5, 0.5, 10**400], "score": 1}, "'lp' has a value too large"),
        ({"tok": [1, 2, 3], "lp": 70000.0, "score": 1}, "'lp' value 70000.0 is out of range"),
    ],
)
def test_list_and_scalar_fields_out_of_range_are_rejected(fields, match) -> None:
    rb = narrow_buffer()
    with pytest.raises(ValueError, match=match):
        rb.add(**fields)
    assert len(rb) == 0


def test_list_fields_in_range_and_explicit_nonfinite_floats_are_stored() -> None:
    rb = narrow_buffer()
    rb.add(tok=[127, -128, 5], lp=[float("inf"), 0.5, float("nan")], score=-32768)
    b = rb.get([0])
    assert b["tok"][0].tolist() == [127, -128, 5]
    lp = b["lp"][0]
    assert lp[0] == float("inf") and lp[1] == 0.5 and torch.isnan(lp[2])
    assert b["score"].tolist() == [-32768]
    with pytest.raises(TypeError, match="'score' must hold int16"):
        rb.add(tok=[1], lp=[0.5], score=2.5)  # a non-integral float for an integer field
    with pytest.raises(TypeError, match="'tok' must hold int8"):
        rb.add(tok=[1.5], lp=[0.5], score=1)


def test_numpy_float_pad_for_integer_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="pad of field 't' must be an integer"):
        TokenField("t", torch.int32, pad=np.float32(2.5))
    with pytest.raises(ValueError, match="pad of field 't' = 1000000.0 is out of range for float16"):
        TokenField("t", torch.float16, pad=1e6)
    assert TokenField("t", torch.int32, pad=np.float64(3.0)).pad == 3.0
    rb = make_buffer()
    rb.add(**seq(1, 3))
    with pytest.raises(ValueError, match="pad_values\\['tokens'\\] must be an integer"):
        rb.get([0], pad_values={"tokens": np.float64(0.5)})


def test_priority_sum_overflow_is_rejected_and_state_unchanged() -> None:
    rb = make_buffer(alpha=1.0, seed=3)
    rb.add(**seq(1, 2), priority=1e308)
    with pytest.raises(ValueError, match="priority"):
        rb.add(**seq(2, 2), priority=1e308)
    assert len(rb) == 1
    rb.add(**seq(3, 2), priority=1.0)
    with pytest.raises(ValueError, match="priorities"):
        rb.update_priorities([1], [1e308])
    with pytest.raises(ValueError, match="priorities"):
        rb.update_priorities([0, 1, 1], [1e308, 1.0, 1e308])  # duplicates: the last one wins
    assert rb.priorities([0, 1]).tolist() == [1e308, 1.0]
    rb.update_priorities([0, 1, 1], [1e308, 1e308, 2.0])
    assert rb.priorities([0, 1]).tolist() == [1e308, 2.0]
    with pytest.raises(ValueError, match="priority"):
        rb.add_packed(
            cu_seqlens=[0, 1, 2],
            tokens=[1, 2],
            logprobs=[0.0, 0.0],
            loss_mask=[1, 1],
            score=[0.0, 0.0],
            group_id=[0, 0],
            policy_version=[0, 0],
            priorities=[1.0, 1e308],
        )
    assert len(rb) == 2
    b = rb.sample(4, prioritized=True)
    assert b.ids.tolist() == [0, 0, 0, 0]  # not the lowest-priority id 1
    # An update replacing the large value stays finite and is accepted.
    rb.update_priorities([0, 1], [1.0, 1e308])
    assert rb.priorities([0, 1]).tolist() == [1.0, 1e308]


def test_priority_sum_projection_accounts_for_evictions() -> None:
    rb = make_buffer(alpha=1.0, capacity_sequences=1)
    rb.add(**seq(1, 2), priority=1e308)
    rb.add(**seq(2, 2), priority=1e308)  # evicts the first one: the total stays finite
    assert list(rb.live_ids) == [1]
    assert rb.sample(2, prioritized=True).ids.tolist() == [1, 1]


def test_priority_whose_power_underflows_is_rejected() -> None:
    rb = make_buffer(alpha=2.0)
    with pytest.raises(ValueError, match="priority 1e-200 raised to alpha underflows to 0"):
        rb.add(**seq(1, 2), priority=1e-200)
    assert len(rb) == 0
    rb.add(**seq(1, 2), priority=1.0)
    with pytest.raises(ValueError, match="priorities 1e-200 raised to alpha underflows to 0"):
        rb.update_priorities([0], [1e-200])
    with pytest.raises(ValueError, match="priority .* overflows to inf"):
        rb.add(**seq(1, 2), priority=1e200)
    assert rb.priorities([0]).tolist() == [1.0]
    assert rb.sample(3, prioritized=True).ids.tolist() == [0, 0, 0]


def test_epoch_seed_counter_is_atomic() -> None:
    class SlowInt(int):
        """Forces a thread switch in the middle of ``self._epochs += 1``."""

        def __add__(self, other):
            time.sleep(0.05)
            return SlowInt(int(self) + other)

    rb = make_buffer(seed=5)
    for k in range(20):
        rb.add(**seq(k, 1 + k % 5))
    rb._epochs = SlowInt(0)
    orders: list[list[int]] = []

    def run() -> None:
        orders.append([b.ids.tolist() for b in rb.epoch(max_tokens=6)])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rb._epochs == 2


def test_gather_into_length_overflow_and_capacity_are_rejected() -> None:
    rb = ReplayBuffer([TokenField("tokens", torch.int64)], capacity_tokens=64)
    for _ in range(4):
        rb.add(tokens=np.arange(8))
    ids = np.array([0, 1, 2, 3], np.int64)
    empty, mask = np.empty(0, np.int64), np.empty(0, bool)
    # 4 * 2**62 wraps to 0 in int64: this used to match the empty outputs and memset ~2**62 bytes.
    with pytest.raises(ValueError, match="overflows int64"):
        rb._core.gather_into(ids, 0, False, None, 2**62, [empty], [], mask, None, None)
    with pytest.raises(ValueError, match="exceeds capacity_tokens=64"):
        rb._core.gather_into(
            ids[:1], 0, False, None, 65, [np.empty((1, 65), np.int64)], [], np.empty((1, 65), bool)
        )
    out, m = np.empty((1, 64), np.int64), np.empty((1, 64), bool)
    rb._core.gather_into(ids[:1], 0, False, None, 64, [out], [], m)  # length == capacity is fine
    assert out[0, :8].tolist() == list(range(8)) and m.sum() == 8


def test_token_budget_huge_lengths_do_not_overflow() -> None:
    # (count + 1) * 2**62 used to wrap, packing three 2**62-token rows into one 2**62 budget.
    assert [len(b) for b in token_budget_minibatches([2**62] * 3, 2**62, padded=True)] == [1, 1, 1]
    assert [len(b) for b in token_budget_minibatches([2**62] * 3, 2**62, padded=False)] == [1, 1, 1]
    assert [len(b) for b in token_budget_minibatches([2**62, 2**62 - 1], 2**63 - 1)] == [2]
    with pytest.raises(ValueError, match="does not fit in max_tokens"):
        token_budget_minibatches([2**62 + 1], 2**62, padded=True)


def _crafted_image(n_token_fields=1, capacity=16, first=0, nxt=0, max_priority=1.0, dtype=5, n_seq=None):
    """A CRC-correct file image with no sequences (or n_seq claimed) and chosen header values."""
    import struct
    import zlib

    rng = ReplayBuffer([TokenField("t", torch.int64)], capacity_tokens=16)._core.to_bytes()[32:]
    o = 4 + 4 + 1 + 4 + 8 + 4 + 8 + 8 * 2 + 8 + 8 + 8 * 2 + 8  # fields, ids/config, up to the RNG
    rlen = struct.unpack_from("<I", rng, o)[0]
    rng_state = rng[o + 4 : o + 4 + rlen]
    pay = struct.pack("<I", n_token_fields)
    for i in range(n_token_fields):
        name = b"f%d" % i
        pay += struct.pack("<I", len(name)) + name + struct.pack("<i", dtype) + bytes(8)
    pay += struct.pack("<I", 0) + struct.pack("<ii", -1, -1)
    pay += struct.pack("<qqdQ", capacity, 0, 1.0, 0) + struct.pack("<qqd", first, nxt, max_priority)
    count = nxt - first if n_seq is None else n_seq
    pay += struct.pack("<I", len(rng_state)) + rng_state + struct.pack("<qq", count, 0)
    header = b"AKREPLAY" + struct.pack("<IIQII", 1, 32, len(pay), zlib.crc32(pay), 0x01020304)
    return header + pay


def test_crafted_files_are_rejected_or_loaded_without_reserving(tmp_path) -> None:
    from alignkit import _ext

    core = _ext.load().ReplayBufferCore
    assert core.from_bytes(_crafted_image()).config()["capacity_tokens"] == 16  # the image itself is valid
    # 4096 fields x 2**33 tokens (32 TiB of ring) / 2**40 int64 tokens (8 TiB): loaded without
    # reserving anything, because the rings are allocated for the tokens stored (none here).
    assert core.from_bytes(_crafted_image(4096, 2**33, dtype=0)).size() == 0
    assert core.from_bytes(_crafted_image(1, 2**40)).config()["capacity_tokens"] == 2**40
    with pytest.raises(ValueError, match=r"capacity_tokens .* is not in \[1, 2\*\*40\]"):
        core.from_bytes(_crafted_image(1, 2**41))
    # ids at the top of int64 would make ++next_id overflow on the next add.
    with pytest.raises(ValueError, match="implausible ids"):
        core.from_bytes(_crafted_image(first=2**63 - 1, nxt=2**63 - 1))
    with pytest.raises(ValueError, match="implausible ids"):
        core.from_bytes(_crafted_image(first=5, nxt=4, n_seq=0))
    for p in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="max_priority must be finite and > 0"):
            core.from_bytes(_crafted_image(max_priority=p))
    # Counters that disagree with the payload length are caught before the ring is built.
    with pytest.raises(ValueError, match="inconsistent counters|payload"):
        core.from_bytes(_crafted_image(first=0, nxt=2))
    path = tmp_path / "ids.akrb"
    path.write_bytes(_crafted_image(first=2**63 - 1, nxt=2**63 - 1))
    with pytest.raises(ValueError, match="implausible ids"):
        ReplayBuffer.load(path)
