"""Model-based test: alignkit.ReplayBuffer against a plain-Python FIFO reference buffer.

Hypothesis drives random add (single / padded / packed) / sample / update / evict / clear /
epoch / pickle sequences on a small buffer (so eviction and ring wrap-around happen often) and
checks, after every step, that the two agree on what is stored.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from alignkit import ReplayBuffer, SequenceField, TokenField

settings.register_profile(
    "alignkit-replay-model",
    max_examples=75,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

CAPACITY_TOKENS = 24
CAPACITY_SEQUENCES = 6
ALPHA = 0.5


class ReferenceBuffer:
    """The specification, written plainly: an ordered dict of id -> sequence, FIFO eviction."""

    def __init__(self) -> None:
        self.items: OrderedDict[int, dict] = OrderedDict()
        self.next_id = 0
        self.max_priority = 1.0

    @property
    def num_tokens(self) -> int:
        return sum(len(s["tokens"]) for s in self.items.values())

    def add(self, s: dict, priority: float | None) -> int:
        while self.items and (
            self.num_tokens + len(s["tokens"]) > CAPACITY_TOKENS or len(self.items) >= CAPACITY_SEQUENCES
        ):
            self.items.popitem(last=False)
        if priority is not None:
            self.max_priority = max(self.max_priority, priority)
        self.items[self.next_id] = {**s, "priority": priority if priority is not None else self.max_priority}
        self.next_id += 1
        return self.next_id - 1

    def eligible(self, min_version: int | None) -> list[int]:
        return [i for i, s in self.items.items() if min_version is None or s["version"] >= min_version]


sequence = st.builds(
    lambda n, seed, group, version: {
        "tokens": np.random.default_rng(seed).integers(-1000, 1000, n).astype(np.int32),
        "logprobs": -np.random.default_rng(seed + 1).random(n).astype(np.float32),
        "group": group,
        "version": version,
    },
    st.integers(1, 9),
    st.integers(0, 2**16),
    st.integers(0, 3),
    st.integers(0, 4),
)
priorities = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)


class ReplayBufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rb = ReplayBuffer(
            [TokenField("tokens", torch.int32, pad=-7), TokenField("logprobs", torch.float32)],
            [SequenceField("group", torch.int64), SequenceField("version", torch.int16)],
            capacity_tokens=CAPACITY_TOKENS,
            capacity_sequences=CAPACITY_SEQUENCES,
            group_field="group",
            version_field="version",
            alpha=ALPHA,
            seed=1,
        )
        self.ref = ReferenceBuffer()

    def check_batch(self, batch, expect_ids=None) -> None:
        ids = batch.ids.tolist()
        if expect_ids is not None:
            assert ids == expect_ids
        for r, i in enumerate(ids):
            s = self.ref.items[i]
            n = len(s["tokens"])
            assert batch.lengths[r] == n
            if batch.layout == "padded":
                T = batch["tokens"].shape[1]
                assert max(batch.lengths.tolist()) == T
                np.testing.assert_array_equal(batch["tokens"][r, :n].numpy(), s["tokens"])
                np.testing.assert_array_equal(batch["logprobs"][r, :n].numpy(), s["logprobs"])
                assert (batch["tokens"][r, n:] == -7).all() and (batch["logprobs"][r, n:] == 0).all()
                assert batch.attention_mask[r].sum() == n
            else:
                lo = int(batch.cu_seqlens[r])
                np.testing.assert_array_equal(batch["tokens"][lo : lo + n].numpy(), s["tokens"])
                np.testing.assert_array_equal(batch.position_ids[lo : lo + n].numpy(), np.arange(n))
            assert batch["group"][r] == s["group"] and batch["version"][r] == s["version"]

    # ---- adds -----------------------------------------------------------------------------------

    @rule(s=sequence, priority=st.none() | priorities)
    def add_single(self, s, priority) -> None:
        got = self.rb.add(
            tokens=s["tokens"],
            logprobs=s["logprobs"],
            group=s["group"],
            version=s["version"],
            priority=priority,
        )
        assert got == self.ref.add(s, priority)

    @rule(seqs=st.lists(sequence, min_size=1, max_size=4), left=st.booleans())
    def add_padded(self, seqs, left) -> None:
        T = max(len(s["tokens"]) for s in seqs)
        tokens = np.full((len(seqs), T), 123, np.int32)
        logprobs = np.full((len(seqs), T), 4.5, np.float32)
        for b, s in enumerate(seqs):
            n = len(s["tokens"])
            sl = slice(T - n, T) if left else slice(0, n)
            tokens[b, sl], logprobs[b, sl] = s["tokens"], s["logprobs"]
        ids = self.rb.add_padded(
            tokens=torch.from_numpy(tokens),
            logprobs=torch.from_numpy(logprobs),
            lengths=[len(s["tokens"]) for s in seqs],
            padding_side="left" if left else "right",
            group=np.array([s["group"] for s in seqs]),
            version=np.array([s["version"] for s in seqs], np.int16),
        )
        assert ids.tolist() == [self.ref.add(s, None) for s in seqs]

    @rule(seqs=st.lists(sequence, min_size=1, max_size=4), prio=priorities)
    def add_packed(self, seqs, prio) -> None:
        cu = np.cumsum([0] + [len(s["tokens"]) for s in seqs])
        ids = self.rb.add_packed(
            tokens=np.concatenate([s["tokens"] for s in seqs]),
            logprobs=torch.from_numpy(np.concatenate([s["logprobs"] for s in seqs])),
            cu_seqlens=torch.from_numpy(cu),
            group=[s["group"] for s in seqs],
            version=np.array([s["version"] for s in seqs], np.int16),
            priorities=[prio] * len(seqs),
        )
        assert ids.tolist() == [self.ref.add(s, prio) for s in seqs]

    # ---- reads ----------------------------------------------------------------------------------

    @precondition(lambda self: self.ref.items)
    @rule(k=st.integers(1, 8), min_version=st.none() | st.integers(0, 4), packed=st.booleans())
    def sample_uniform(self, k, min_version, packed) -> None:
        eligible = self.ref.eligible(min_version)
        if not eligible:
            with pytest.raises(ValueError, match="needs 1 eligible"):
                self.rb.sample(k, min_version=min_version)
            return
        batch = self.rb.sample(k, min_version=min_version, layout="packed" if packed else "padded")
        assert len(batch) == k and set(batch.ids.tolist()) <= set(eligible)
        self.check_batch(batch)

    @precondition(lambda self: self.ref.items)
    @rule(k=st.integers(1, 8))
    def sample_without_replacement(self, k) -> None:
        n = len(self.ref.items)
        if k > n:
            with pytest.raises(ValueError, match=f"needs {k} eligible"):
                self.rb.sample(k, replace=False)
            return
        batch = self.rb.sample(k, replace=False)
        assert len(set(batch.ids.tolist())) == k
        self.check_batch(batch)

    @precondition(lambda self: self.ref.items)
    @rule(k=st.integers(1, 8), beta=st.floats(0.0, 1.0), min_version=st.none() | st.integers(0, 4))
    def sample_prioritized(self, k, beta, min_version) -> None:
        eligible = self.ref.eligible(min_version)
        if not eligible:
            with pytest.raises(ValueError):
                self.rb.sample(k, prioritized=True, min_version=min_version)
            return
        batch = self.rb.sample(k, prioritized=True, beta=beta, min_version=min_version)
        assert set(batch.ids.tolist()) <= set(eligible)
        p = {i: self.ref.items[i]["priority"] ** ALPHA for i in eligible}
        pmin = min(p.values())
        expect = [(pmin / p[i]) ** beta for i in batch.ids.tolist()]
        np.testing.assert_allclose(batch.weights.numpy(), expect, rtol=1e-5)
        self.check_batch(batch)

    @precondition(lambda self: self.ref.items)
    @rule(num_groups=st.integers(1, 3), min_size=st.integers(1, 3))
    def sample_groups(self, num_groups, min_size) -> None:
        members: dict[int, list[int]] = {}
        for i, s in self.ref.items.items():
            members.setdefault(s["group"], []).append(i)
        eligible = {g: m for g, m in members.items() if len(m) >= min_size}
        if len(eligible) < num_groups:
            with pytest.raises(ValueError, match=f"needs {num_groups} eligible"):
                self.rb.sample_groups(num_groups, min_group_size=min_size)
            return
        batch = self.rb.sample_groups(num_groups, min_group_size=min_size)
        ids = batch.ids.tolist()
        chosen = list(dict.fromkeys(self.ref.items[i]["group"] for i in ids))
        assert len(chosen) == num_groups
        assert ids == [i for g in chosen for i in eligible[g]]  # whole groups, in FIFO order
        self.check_batch(batch)

    @rule(data=st.data())
    def get_ids(self, data) -> None:
        ids = data.draw(st.lists(st.integers(0, self.ref.next_id + 2), max_size=5))
        missing = [i for i in ids if i not in self.ref.items]
        if missing:
            with pytest.raises(IndexError, match=f"id {missing[0]} is not in the buffer"):
                self.rb.get(ids)
            self.check_batch(self.rb.get(ids, skip_missing=True), [i for i in ids if i in self.ref.items])
        else:
            self.check_batch(self.rb.get(ids, padding_side="right"), ids)

    @rule(
        batch_size=st.none() | st.integers(1, 4),
        max_tokens=st.none() | st.integers(9, 30),
        packed=st.booleans(),
    )
    def epoch(self, batch_size, max_tokens, packed) -> None:
        if batch_size is None and max_tokens is None:
            batch_size = 3
        seen = []
        for batch in self.rb.epoch(
            batch_size, max_tokens=max_tokens, layout="packed" if packed else "padded"
        ):
            if batch_size is not None:
                assert len(batch) <= batch_size
            if max_tokens is not None:
                assert (batch.num_tokens if packed else batch["tokens"].numel()) <= max_tokens
            self.check_batch(batch)
            seen += batch.ids.tolist()
        assert sorted(seen) == list(self.ref.items)

    # ---- writes ---------------------------------------------------------------------------------

    @precondition(lambda self: self.ref.items)
    @rule(data=st.data())
    def update_priorities(self, data) -> None:
        ids = data.draw(st.lists(st.sampled_from(list(self.ref.items)), min_size=1, max_size=4, unique=True))
        p = data.draw(st.lists(priorities, min_size=len(ids), max_size=len(ids)))
        self.rb.update_priorities(torch.tensor(ids), torch.tensor(p, dtype=torch.float64))
        for i, v in zip(ids, p, strict=True):
            self.ref.items[i]["priority"] = v
            self.ref.max_priority = max(self.ref.max_priority, v)

    @precondition(lambda self: self.ref.next_id > len(self.ref.items))
    @rule()
    def update_evicted_raises(self) -> None:
        gone = min(self.ref.items, default=self.ref.next_id) - 1
        with pytest.raises(IndexError, match="evicted"):
            self.rb.update_priorities([gone], [1.0])

    @rule()
    def clear(self) -> None:
        self.rb.clear()
        self.ref.items.clear()

    @rule()
    def pickle_round_trip(self) -> None:
        self.rb = pickle.loads(pickle.dumps(self.rb))

    # ---- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_contents(self) -> None:
        assert len(self.rb) == len(self.ref.items)
        assert self.rb.num_tokens == self.ref.num_tokens <= CAPACITY_TOKENS
        assert list(self.rb.live_ids) == list(self.ref.items)
        if self.ref.items:
            ids = list(self.ref.items)
            np.testing.assert_array_equal(
                self.rb.priorities(ids).numpy(), [self.ref.items[i]["priority"] for i in ids]
            )


TestReplayBufferModel = ReplayBufferMachine.TestCase
TestReplayBufferModel.settings = settings.get_profile("alignkit-replay-model")
