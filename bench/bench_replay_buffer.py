"""Replay buffer side by side: alignkit vs a Python-list buffer (OpenRLHF style) vs torchrl.

Workload (the issue's): sequences of 64-4096 tokens with 6 per-token fields (tokens int32;
logprobs, ref_logprobs, values, advantages, returns float32 = 24 bytes per token).
Cases: add a padded rollout batch; sample a batch of 32 into a right-padded batch; prioritized
sample + priority update; and single-thread memcpy bandwidth (a NumPy copy) measured in the same
run, the ceiling for sample-to-batch GB/s. bytes_moved counts bytes read plus bytes written.
Targets from the issue: >= 10x torchrl on add + sample; sample-to-batch >= 50% of memcpy GB/s.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from harness import peak_memory_bytes, record, require_peer

import alignkit

FIELDS = {
    "tokens": torch.int32,
    "logprobs": torch.float32,
    "ref_logprobs": torch.float32,
    "values": torch.float32,
    "advantages": torch.float32,
    "returns": torch.float32,
}
BYTES_PER_TOKEN = sum(torch.empty(0, dtype=d).element_size() for d in FIELDS.values())
ROLLOUT, MAX_LEN, SAMPLE = 64, 4096, 32
STORED = 512  # sequences held when sampling


def rollout(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A right-padded rollout batch (ROLLOUT, MAX_LEN) and its lengths in [64, 4096]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, MAX_LEN + 1, (ROLLOUT,), generator=g)
    batch = {
        name: (
            torch.randint(0, 50000, (ROLLOUT, MAX_LEN), generator=g, dtype=dtype)
            if dtype == torch.int32
            else torch.randn(ROLLOUT, MAX_LEN, generator=g)
        )
        for name, dtype in FIELDS.items()
    }
    return batch, lengths


# ---- providers ------------------------------------------------------------------------------


class AlignkitProvider:
    def __init__(self) -> None:
        self.rb = alignkit.ReplayBuffer(
            dict(FIELDS), capacity_tokens=STORED * MAX_LEN // 2, capacity_sequences=STORED, alpha=0.6, seed=0
        )

    def add(self, batch, lengths):
        return self.rb.add_padded(lengths=lengths, **batch)

    def sample(self, n):
        return self.rb.sample(n)

    def sample_prioritized_and_update(self, n):
        out = self.rb.sample(n, prioritized=True, beta=0.4)
        self.rb.update_priorities(out.ids, torch.rand(n, dtype=torch.float64) + 0.1)
        return out


def zero_pad_sequences(sequences: list[torch.Tensor], side: str = "right") -> torch.Tensor:
    """OpenRLHF's zero_pad_sequences (openrlhf/utils/utils.py): F.pad each row, then stack."""
    max_len = max(seq.size(-1) for seq in sequences)
    padded = []
    for seq in sequences:
        pad_len = max_len - seq.size(-1)
        padding = (pad_len, 0) if side == "left" else (0, pad_len)
        padded.append(torch.nn.functional.pad(seq, padding))
    return torch.stack(padded, dim=0)


class PythonListProvider:
    """OpenRLHF's NaiveReplayBuffer shape: split_experience_batch unpads each row into a dict of
    per-sequence tensors held in a Python list; sampling random.sample()s items and re-pads them
    with zero_pad_sequences. Prioritized: a NumPy priority array + np.random.choice (what a plain
    Python PER does)."""

    def __init__(self) -> None:
        self.items: list[dict[str, torch.Tensor]] = []
        self.priorities = np.zeros(0)
        self.limit = STORED

    def add(self, batch, lengths):
        for b, n in enumerate(lengths.tolist()):
            self.items.append({k: v[b, :n].clone() for k, v in batch.items()})
        self.priorities = np.concatenate(
            [self.priorities, np.full(len(lengths), self.priorities.max(initial=1.0))]
        )
        if len(self.items) > self.limit:
            drop = len(self.items) - self.limit
            del self.items[:drop]
            self.priorities = self.priorities[drop:]

    def _batch(self, items):
        out = {k: zero_pad_sequences([it[k] for it in items]) for k in FIELDS}
        out["attention_mask"] = zero_pad_sequences(
            [torch.ones_like(it["tokens"], dtype=torch.bool) for it in items]
        )
        return out

    def sample(self, n):
        return self._batch(random.sample(self.items, n))

    def sample_prioritized_and_update(self, n):
        p = self.priorities**0.6
        p = p / p.sum()
        idx = np.random.choice(len(self.items), n, p=p)
        weights = (len(self.items) * p[idx]) ** -0.4
        out = self._batch([self.items[i] for i in idx])
        out["weights"] = torch.from_numpy(weights / weights.max())
        self.priorities[idx] = np.random.rand(n) + 0.1
        return out


class TorchRLProvider:
    """torchrl.data.ReplayBuffer over a ListStorage of per-sequence TensorDicts (ragged data does
    not fit its LazyTensorStorage) with a PrioritizedSampler; batches padded by the collate_fn."""

    def __init__(self) -> None:
        data = require_peer("torchrl.data")
        tensordict = require_peer("tensordict")
        self.TensorDict = tensordict.TensorDict
        collate = lambda items: {k: zero_pad_sequences([it[k] for it in items]) for k in FIELDS}  # noqa: E731
        self.rb = data.ReplayBuffer(storage=data.ListStorage(STORED), collate_fn=collate, batch_size=SAMPLE)
        try:
            sampler = data.PrioritizedSampler(STORED, alpha=0.6, beta=0.4)
        except RuntimeError as exc:  # torchrl's C++ segment tree did not load (e.g. torch ABI mismatch)
            self.prb = None
            self.prb_error = f"peer torchrl unavailable for prioritized sampling: {exc}"
        else:
            self.prb = data.ReplayBuffer(
                storage=data.ListStorage(STORED), sampler=sampler, collate_fn=collate, batch_size=SAMPLE
            )

    def add(self, batch, lengths):
        items = [
            self.TensorDict({k: v[b, :n].clone() for k, v in batch.items()}, [])
            for b, n in enumerate(lengths.tolist())
        ]
        self.rb.extend(items)
        if self.prb is not None:
            self.prb.extend(items)

    def sample(self, n):
        return self.rb.sample(n)

    def sample_prioritized_and_update(self, n):
        if self.prb is None:
            pytest.skip(self.prb_error)
        out, info = self.prb.sample(n, return_info=True)
        self.prb.update_priority(info["index"], torch.rand(n) + 0.1)
        return out


PROVIDERS = {
    "alignkit": AlignkitProvider,
    "python-list (OpenRLHF)": PythonListProvider,
    "torchrl": TorchRLProvider,
}


def filled(provider_name: str):
    provider = PROVIDERS[provider_name]()
    for seed in range(2 * STORED // ROLLOUT):  # twice over: the ring has wrapped, eviction is on
        provider.add(*rollout(seed))
    return provider


# ---- cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_add_padded_rollout(benchmark, provider):
    batch, lengths = rollout(123)
    prov = filled(provider)  # steady state: every add evicts (and reuses warm ring memory)
    tokens = int(lengths.sum())
    benchmark.group = f"replay add: {ROLLOUT} seqs of 64-4096 tokens, 6 fields"
    record(benchmark, provider, bytes_moved=2 * tokens * BYTES_PER_TOKEN, sequences=ROLLOUT)
    benchmark.pedantic(prov.add, args=(batch, lengths), rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_sample_padded_batch(benchmark, provider):
    prov = filled(provider)
    # Bytes moved per call: the sampled tokens read plus the (B, T) padded output written.
    # The expected padded T of 32 draws is close to 4096, so count read = 0.5 * out (approx.)
    # exactly by measuring a few draws.
    sizes = []
    for _ in range(8):
        out = prov.sample(SAMPLE)
        mask = out.attention_mask if hasattr(out, "attention_mask") else out.get("attention_mask", None)
        t = out["tokens"].shape[1]
        read = int(mask.sum()) if mask is not None else int((out["tokens"] != 0).sum())
        sizes.append((read + SAMPLE * t) * BYTES_PER_TOKEN)
    peak = peak_memory_bytes(lambda: prov.sample(SAMPLE))
    benchmark.group = f"replay sample {SAMPLE} -> padded batch (of {STORED} stored)"
    record(benchmark, provider, bytes_moved=int(np.mean(sizes)), peak_bytes=peak, sequences=SAMPLE)
    benchmark.pedantic(prov.sample, args=(SAMPLE,), rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_prioritized_sample_and_update(benchmark, provider):
    prov = filled(provider)
    if getattr(prov, "prb", True) is None:
        pytest.skip(prov.prb_error)
    benchmark.group = f"replay prioritized sample {SAMPLE} + update (of {STORED} stored)"
    record(benchmark, provider, sequences=SAMPLE)
    benchmark.pedantic(
        prov.sample_prioritized_and_update, args=(SAMPLE,), rounds=20, iterations=1, warmup_rounds=2
    )


def test_memcpy_bandwidth(benchmark):
    """Single-thread memcpy bandwidth in the same run: the ceiling for sample-to-batch GB/s."""
    src = np.random.default_rng(0).integers(0, 255, 256 * 1024 * 1024, dtype=np.uint8)
    dst = np.empty_like(src)
    benchmark.group = "memcpy reference (single thread, 256 MiB)"
    record(benchmark, "numpy copyto", bytes_moved=2 * src.nbytes)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=10, iterations=1, warmup_rounds=1)
