"""Replay buffer for variable-length token sequences (RL experience between rollout and training).

The storage, sampling and copies live in C++ (csrc/core/replay_buffer.h, bound as
``alignkit._C.ReplayBufferCore``). The schema and batch types are declared in
:mod:`alignkit.replay_schema`; NumPy arrays and CPU torch tensors are converted (zero-copy through
``Tensor.numpy()``) in :mod:`alignkit.replay_inputs`; this module wraps results with
``torch.from_numpy`` (zero-copy: every output tensor owns memory that the core filled with one
copy from its arena).

Storage is a ring of up to ``capacity_tokens`` (at most 2**40) tokens per per-token field, allocated
as tokens arrive (memory follows what is stored, not the capacity): adding past capacity evicts
whole oldest sequences (FIFO). Sequence ids are 0, 1, 2, ... in insertion order and never reused.

Bad input raises TypeError / ValueError naming the argument before anything reaches the core; a
batch too large to allocate raises MemoryError saying what it was allocating.

Sampling: uniform (with or without replacement), prioritized (Schaul et al. 2016, "Prioritized
Experience Replay": P(i) = p_i^alpha / sum_j p_j^alpha, importance weights
w_i = (N P(i))^-beta / max_j w_j), by group (all members of prompt groups, for GRPO), and
epochs without replacement (:meth:`ReplayBuffer.epoch`), all optionally restricted to sequences
with ``version >= min_version`` (staleness filter). Seeded: the same calls on a buffer built with
the same seed draw the same ids.

Thread safety: any number of threads may add, sample and update concurrently; the GIL is released
while the core copies or waits (``timeout=``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import _checks, _ext
from .replay_inputs import (
    as_array,
    capacity_tokens_value,
    file_path,
    ids_array,
    int64_value,
    layout_code,
    lengths_array,
    packed_starts,
    pad_left,
    pad_values_bytes,
    padded_starts,
    pin_memory_flag,
    positive_int64,
    priorities_array,
    priority_value,
    seed_value,
    sequence_arrays,
    split_fields,
    timeout_seconds,
    token_arrays,
)
from .replay_schema import (
    Batch,
    SequenceField,
    TokenField,
    batch_from_core,
    core_field_specs,
    declared_fields,
    empty_batch,
    fields_from_core,
    numpy_dtype,
    role_indices,
)

__all__ = ["Batch", "ReplayBuffer", "SequenceField", "TokenField", "token_budget_minibatches"]


def token_budget_minibatches(lengths: Any, max_tokens: int, *, padded: bool = False) -> list[torch.Tensor]:
    """Indices into ``lengths`` (1-D, each > 0) grouped so each group costs <= max_tokens (first-fit
    decreasing); returns one int64 index tensor per group.

    Cost is the sum of lengths (packed) or count * longest (``padded=True``). O(n log n).
    """
    lengths = lengths_array(lengths)
    max_tokens = positive_int64(max_tokens, "max_tokens")
    padded = _checks.flag(padded, "padded")
    return [torch.from_numpy(b) for b in _ext.load().first_fit_decreasing(lengths, max_tokens, padded)]


class ReplayBuffer:
    """FIFO ragged replay buffer with a capacity in tokens. See the module docstring.

    Args:
        token_fields: per-token fields (``TokenField`` list, or a ``{name: dtype}`` mapping).
        sequence_fields: per-sequence fields (``SequenceField`` list, or a ``{name: dtype}`` mapping).
        capacity_tokens: tokens kept (per field), at most 2**40; older sequences are evicted whole.
            Memory follows the tokens stored (the rings grow up to it), not this capacity.
        capacity_sequences: optional cap on the number of sequences.
        group_field: integer per-sequence field that groups sequences (for :meth:`sample_groups`).
        version_field: integer per-sequence field compared with ``min_version`` (staleness filter).
        alpha: prioritization exponent (0 = uniform).
        seed: seeds every random draw of the buffer.
    """

    def __init__(
        self,
        token_fields: Sequence[TokenField] | Mapping[str, Any],
        sequence_fields: Sequence[SequenceField] | Mapping[str, Any] = (),
        *,
        capacity_tokens: int,
        capacity_sequences: int | None = None,
        group_field: str | None = None,
        version_field: str | None = None,
        alpha: float = 0.6,
        seed: int = 0,
    ) -> None:
        tfields = declared_fields(token_fields, TokenField, "token_fields")
        sfields = declared_fields(sequence_fields, SequenceField, "sequence_fields")
        if not tfields:
            raise ValueError("token_fields must declare at least one per-token field")
        roles = role_indices(tfields, sfields, group_field=group_field, version_field=version_field)
        capacity_tokens = capacity_tokens_value(capacity_tokens)
        capacity_sequences = (
            0 if capacity_sequences is None else positive_int64(capacity_sequences, "capacity_sequences")
        )
        alpha = _checks.non_negative(alpha, "alpha")
        seed = seed_value(seed)
        core = _ext.load().ReplayBufferCore(
            core_field_specs(tfields),
            core_field_specs(sfields),
            roles[0],
            roles[1],
            capacity_tokens,
            capacity_sequences,
            alpha,
            seed,
        )
        self._init_from_core(core)

    # ---- construction helpers ------------------------------------------------------------------

    def _init_from_core(self, core: Any) -> None:
        self._core = core
        self._epochs = 0
        self._epochs_lock = threading.Lock()  # each shuffled epoch draws a distinct seed
        tspecs, sspecs, group_index, version_index = core.schema()
        self.token_fields, self.sequence_fields = fields_from_core(tspecs, sspecs)
        self._token_np = [numpy_dtype(f.dtype, "dtype") for f in self.token_fields]
        self._seq_np = [numpy_dtype(f.dtype, "dtype") for f in self.sequence_fields]
        self.group_field = self.sequence_fields[group_index].name if group_index >= 0 else None
        self.version_field = self.sequence_fields[version_index].name if version_index >= 0 else None
        config = core.config()
        self.capacity_tokens: int = config["capacity_tokens"]
        self.capacity_sequences: int | None = config["capacity_sequences"] or None
        self.alpha: float = config["alpha"]
        self.seed: int = config["seed"]

    # ---- size ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._core.size()

    @property
    def num_tokens(self) -> int:
        """Tokens currently stored (per field)."""
        return self._core.num_tokens()

    @property
    def live_ids(self) -> range:
        """Ids currently stored: a contiguous range, oldest first."""
        first = self._core.first_id()
        return range(first, first + self._core.size())

    def clear(self) -> None:
        """Drop every sequence (ids keep counting up; they are never reused)."""
        self._core.clear()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}:{str(f.dtype).removeprefix('torch.')}" for f in self.token_fields)
        seq = ", ".join(f"{f.name}:{str(f.dtype).removeprefix('torch.')}" for f in self.sequence_fields)
        return (
            f"ReplayBuffer({len(self)} sequences, {self.num_tokens}/{self.capacity_tokens} tokens; "
            f"per token [{fields}]; per sequence [{seq}])"
        )

    # ---- add -----------------------------------------------------------------------------------

    def add(self, *, priority: float | None = None, **fields: Any) -> int:
        """Add one sequence: per-token fields as 1-D arrays/tensors of one length, per-sequence
        fields as scalars. Returns its id. ``priority`` (finite, > 0) defaults to the largest seen."""
        tok, seq = self._split_fields(fields)
        arrays = token_arrays(tok, ndim=1, layout="(T,) for a single sequence")
        length = arrays[0].shape[0]
        seqs = []
        for v, n, dt in seq:
            a = as_array(v, n, dt)
            if a.size != 1 or a.ndim > 1:
                raise ValueError(f"per-sequence field {n!r} must be a scalar, got shape {a.shape}")
            seqs.append(a.reshape(1))
        prios = None if priority is None else np.array([priority_value(priority)])
        ids = self._core.add(arrays, seqs, np.zeros(1, np.int64), np.array([length], np.int64), 0, prios)
        return int(ids[0])

    def add_padded(
        self,
        *,
        lengths: Any = None,
        mask: Any = None,
        padding_side: str = "right",
        priorities: Any = None,
        **fields: Any,
    ) -> torch.Tensor:
        """Add B sequences given as padded (B, T) per-token fields and (B,) per-sequence fields.

        Give either ``lengths`` (B,) with ``padding_side`` ("right": tokens at [0, len), "left":
        at [T - len, T)), or a 0/1 ``mask`` (B, T) whose ones form one run per row.
        Returns the new ids, (B,) int64.
        """
        if (lengths is None) == (mask is None):
            raise ValueError("add_padded needs exactly one of lengths= or mask=")
        pad_left(padding_side)  # validates it
        tok, seq = self._split_fields(fields)
        arrays = token_arrays(tok, ndim=2, layout="(B, T) padded")
        B, T = arrays[0].shape
        starts, lens = padded_starts(lengths, mask, padding_side, B, T)
        seqs = sequence_arrays(seq, B)
        prios = None if priorities is None else priorities_array(priorities, "priorities", B)
        ids = self._core.add(arrays, seqs, np.ascontiguousarray(starts, np.int64), lens, T, prios)
        return torch.from_numpy(ids)

    def add_packed(self, *, cu_seqlens: Any, priorities: Any = None, **fields: Any) -> torch.Tensor:
        """Add B sequences packed end to end: per-token fields (N,), ``cu_seqlens`` (B + 1,) with
        cu_seqlens[0] = 0, cu_seqlens[-1] = N, strictly increasing. Returns the new ids, (B,) int64."""
        tok, seq = self._split_fields(fields)
        arrays = token_arrays(tok, ndim=1, layout="(N,) packed")
        starts, lens = packed_starts(cu_seqlens, arrays[0].shape[0])
        B = lens.size
        seqs = sequence_arrays(seq, B)
        prios = None if priorities is None else priorities_array(priorities, "priorities", B)
        ids = self._core.add(arrays, seqs, starts, lens, 0, prios)
        return torch.from_numpy(ids)

    # ---- sample --------------------------------------------------------------------------------

    def sample(
        self,
        batch_size: int,
        *,
        prioritized: bool = False,
        replace: bool = True,
        beta: float = 0.4,
        min_version: int | None = None,
        layout: str = "padded",
        padding_side: str = "right",
        pad_values: Mapping[str, Any] | None = None,
        timeout: float | None = 0.0,
        min_available: int | None = None,
        pin_memory: bool = False,
    ) -> Batch:
        """Draw ``batch_size`` sequences and copy them into a batch (one locked step).

        uniform (default) with or without replacement, or ``prioritized`` (with replacement,
        ``weights`` set). ``timeout``: 0 fails at once with ValueError when too few sequences are
        eligible; > 0 waits up to that many seconds (then TimeoutError); None waits forever.
        Waiting is for ``min_available`` eligible sequences (default: ``batch_size``).
        ``pin_memory`` (CUDA only): the outputs are pinned host tensors, still filled by one copy.
        """
        batch_size = positive_int64(batch_size, "batch_size")
        timeout = timeout_seconds(timeout)
        if min_available is None:
            min_available = batch_size if timeout != 0.0 else 0
        args = (
            batch_size,
            _checks.flag(prioritized, "prioritized"),
            _checks.flag(replace, "replace"),
            _checks.non_negative(beta, "beta"),
            self._min_version(min_version),
            int64_value(min_available, "min_available", low=0),
            *self._gather_spec(layout, padding_side, pad_values),
            timeout,
        )
        return self._draw(
            lambda ids_only: self._core.sample(*args, ids_only=ids_only), layout, args[6:9], pin_memory
        )

    def sample_groups(
        self,
        num_groups: int,
        *,
        min_group_size: int = 1,
        min_version: int | None = None,
        layout: str = "padded",
        padding_side: str = "right",
        pad_values: Mapping[str, Any] | None = None,
        timeout: float | None = 0.0,
        pin_memory: bool = False,
    ) -> Batch:
        """Draw ``num_groups`` distinct groups (uniformly among groups with >= ``min_group_size``
        live members, all at ``version >= min_version``) and return all their members, group by group."""
        args = (
            positive_int64(num_groups, "num_groups"),
            positive_int64(min_group_size, "min_group_size"),
            self._min_version(min_version),
            *self._gather_spec(layout, padding_side, pad_values),
            timeout_seconds(timeout),
        )
        return self._draw(
            lambda ids_only: self._core.sample_groups(*args, ids_only=ids_only), layout, args[3:6], pin_memory
        )

    def get(
        self,
        ids: Any,
        *,
        layout: str = "padded",
        padding_side: str = "right",
        pad_values: Mapping[str, Any] | None = None,
        skip_missing: bool = False,
        pin_memory: bool = False,
    ) -> Batch:
        """Copy the given ids into a batch. An evicted id raises IndexError unless ``skip_missing``."""
        gather = self._gather_spec(layout, padding_side, pad_values)
        skip_missing = _checks.flag(skip_missing, "skip_missing")
        return self._gather(ids_array(ids), layout, gather, skip_missing, pin_memory)

    def epoch(
        self,
        batch_size: int | None = None,
        *,
        max_tokens: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        min_version: int | None = None,
        layout: str = "padded",
        padding_side: str = "right",
        pad_values: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
    ) -> Iterator[Batch]:
        """One pass without replacement over the sequences stored now (eligible ones), in
        minibatches of ``batch_size`` sequences and/or at most ``max_tokens`` tokens (first-fit
        decreasing; in the padded layout the budget bounds B * T). Sequences evicted while the
        epoch runs are skipped. Each stored sequence is yielded exactly once. ``drop_last`` drops a
        last minibatch of fewer than ``batch_size`` sequences (so it needs ``batch_size``)."""
        if batch_size is None and max_tokens is None:
            raise ValueError("epoch needs batch_size= and/or max_tokens=")
        if batch_size is not None:
            batch_size = positive_int64(batch_size, "batch_size")
        if max_tokens is not None:
            max_tokens = positive_int64(max_tokens, "max_tokens")
        shuffle = _checks.flag(shuffle, "shuffle")
        drop_last = _checks.flag(drop_last, "drop_last")
        if drop_last and batch_size is None:
            raise ValueError("drop_last=True needs batch_size= (it drops a short last minibatch)")
        gather = self._gather_spec(layout, padding_side, pad_values)
        pin_memory = pin_memory_flag(pin_memory)
        ids, lengths = self._core.snapshot(self._min_version(min_version), shuffle)
        # Planned now, so a sequence longer than max_tokens fails here rather than mid-iteration.
        groups = self._epoch_groups(ids, lengths, max_tokens, shuffle, layout)
        return self._epoch_iter(groups, batch_size, drop_last, layout, gather, pin_memory)

    def _epoch_groups(self, ids, lengths, max_tokens, shuffle, layout) -> list[np.ndarray]:
        """The epoch's ids: one group, or one per token-budget bin (in a seeded random order)."""
        if max_tokens is not None:
            bins = _ext.load().first_fit_decreasing(lengths, max_tokens, layout == "padded")
            if shuffle:
                # FFD emits bins longest first; visit them in a seeded random order instead.
                with self._epochs_lock:
                    self._epochs += 1
                    epoch = self._epochs
                order = np.random.default_rng([self.seed, epoch]).permutation(len(bins))
                bins = [bins[i] for i in order]
            return [ids[b] for b in bins]
        return [ids]

    def _epoch_iter(self, groups, batch_size, drop_last, layout, gather, pin_memory) -> Iterator[Batch]:
        for group in groups:
            step = batch_size or len(group)
            for start in range(0, len(group), step):
                chunk = group[start : start + step]
                if drop_last and batch_size is not None and len(chunk) < batch_size:
                    continue
                batch = self._gather(np.ascontiguousarray(chunk), layout, gather, True, pin_memory)
                if len(batch):
                    yield batch

    # ---- copies out ----------------------------------------------------------------------------

    def _draw(self, core_call, layout: str, gather: tuple, pin_memory: bool) -> Batch:
        """Sample through ``core_call(ids_only)``; pinned: draw ids, then fill pinned tensors."""
        if not pin_memory_flag(pin_memory):
            return self._batch(core_call(False), layout)
        for _ in range(_PIN_ATTEMPTS):
            drawn = core_call(True)
            try:
                batch = self._copy_into(drawn["ids"], drawn["lengths"], layout, gather, pin=True)
            except IndexError:
                continue  # a drawn sequence was evicted before the copy: draw again
            if "weights" in drawn:
                batch.weights = torch.from_numpy(drawn["weights"]).pin_memory()
            return batch
        return self._batch(core_call(False), layout).pin_memory()  # under heavy eviction: copy, then pin

    def _gather(
        self, ids: np.ndarray, layout: str, gather: tuple, skip_missing: bool, pin_memory: bool
    ) -> Batch:
        if pin_memory_flag(pin_memory):
            found = self._core.gather(ids, *gather, skip_missing, ids_only=True)
            try:
                return self._copy_into(found["ids"], found["lengths"], layout, gather, pin=True)
            except IndexError:
                if not skip_missing:
                    raise
            return self._batch(self._core.gather(ids, *gather, True), layout).pin_memory()
        return self._batch(self._core.gather(ids, *gather, skip_missing), layout)

    def _copy_into(
        self, ids: np.ndarray, lengths: np.ndarray, layout: str, gather: tuple, pin: bool
    ) -> Batch:
        """Allocate the batch's tensors here (pinned when ``pin``) and let the core fill their
        NumPy views with one copy. IndexError when an id was evicted meanwhile (nothing written)."""
        batch = empty_batch(ids, lengths, self.token_fields, self.sequence_fields, layout, pin)
        views = [
            None if t is None else t.numpy()
            for t in (batch.attention_mask, batch.cu_seqlens, batch.position_ids)
        ]
        self._core.gather_into(
            ids,
            *gather,
            batch.max_seqlen if layout == "padded" else int(lengths.sum()),
            [batch[f.name].numpy() for f in self.token_fields],
            [batch[f.name].numpy() for f in self.sequence_fields],
            *views,
        )
        return batch

    # ---- priorities ----------------------------------------------------------------------------

    def update_priorities(self, ids: Any, priorities: Any, *, ignore_missing: bool = False) -> None:
        """Set priorities p (finite, > 0) of live ids; P(i) ~ p_i^alpha. An evicted id raises
        IndexError (nothing is updated) unless ``ignore_missing``. O(n log N)."""
        ids_arr = ids_array(ids)
        p = priorities_array(priorities, "priorities", ids_arr.size)
        self._core.update_priorities(ids_arr, p, _checks.flag(ignore_missing, "ignore_missing"))

    def priorities(self, ids: Any) -> torch.Tensor:
        """Raw priorities of live ids, (n,) float64 (IndexError for an id not in the buffer)."""
        return torch.from_numpy(self._core.priorities(ids_array(ids)))

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a versioned, CRC-32-checked image: to ``path.tmp.*`` then renamed over ``path``."""
        self._core.save(file_path(path, for_load=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Read a file written by :meth:`save` and return the buffer; a corrupt or truncated file
        raises ValueError, a missing one FileNotFoundError, a directory IsADirectoryError."""
        buf = cls.__new__(cls)
        buf._init_from_core(_ext.load().ReplayBufferCore.load(file_path(path, for_load=True)))
        return buf

    def __getstate__(self) -> dict[str, Any]:
        return {"image": self._core.to_bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        image = state.get("image") if isinstance(state, dict) else None
        if not isinstance(image, bytes):
            raise TypeError(f"a pickled ReplayBuffer state is {{'image': bytes}}, got {type(state).__name__}")
        self._init_from_core(_ext.load().ReplayBufferCore.from_bytes(image))

    # ---- conversions ---------------------------------------------------------------------------

    def _split_fields(self, fields: Mapping[str, Any]) -> tuple[list, list]:
        return split_fields(fields, self.token_fields, self.sequence_fields, self._token_np, self._seq_np)

    def _min_version(self, min_version: Any) -> int | None:
        if min_version is None:
            return None
        min_version = int64_value(min_version, "min_version")
        if self.version_field is None:
            raise ValueError("min_version needs version_field= set when the buffer is built")
        return min_version

    def _gather_spec(self, layout: Any, padding_side: Any, pad_values: Any) -> tuple[int, bool, list | None]:
        """(layout code, pad left, pad bytes per token field or None): how the core lays a batch out."""
        pads = pad_values_bytes(pad_values, self.token_fields, self._token_np)
        return layout_code(layout), pad_left(padding_side), pads

    def _batch(self, out: dict[str, Any], layout: str) -> Batch:
        return batch_from_core(out, self.token_fields, self.sequence_fields, layout)


_PIN_ATTEMPTS = 3
