"""Replay buffer for variable-length token sequences (RL experience between rollout and training).

The storage, sampling and copies live in C++ (csrc/core/replay_buffer.h, bound as
``alignkit._C.ReplayBufferCore``). The schema and batch types are declared in
:mod:`alignkit.replay_schema`; NumPy arrays and CPU torch tensors are converted (zero-copy through
``Tensor.numpy()``) in :mod:`alignkit.replay_inputs`; this module wraps results with
``torch.from_numpy`` (zero-copy: every output tensor owns memory that the core filled with one
copy from its arena).

Storage is a ring of ``capacity_tokens`` tokens per per-token field: adding past capacity evicts
whole oldest sequences (FIFO). Sequence ids are 0, 1, 2, ... in insertion order and never reused.

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

import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import _ext
from .replay_inputs import (
    _as_array,
    _check_pin_memory,
    _ids_array,
    _packed_starts,
    _padded_starts,
    _positive_int,
    _priorities_array,
    _timeout,
)
from .replay_schema import (
    _CODES,
    _NUMPY_TO_TORCH,
    Batch,
    SequenceField,
    TokenField,
    _as_fields,
    _numpy_dtype,
    _pad_bytes,
    _pinned,
)

__all__ = ["Batch", "ReplayBuffer", "SequenceField", "TokenField", "token_budget_minibatches"]

_LAYOUTS = {"padded": 0, "packed": 1}


def token_budget_minibatches(lengths: Any, max_tokens: int, *, padded: bool = False) -> list[torch.Tensor]:
    """Indices into ``lengths`` grouped so each group costs <= max_tokens (first-fit decreasing).

    Cost is the sum of lengths (packed) or count * longest (``padded=True``). O(n log n).
    """
    arr = np.asarray(lengths.numpy() if isinstance(lengths, torch.Tensor) else lengths)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"lengths must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    max_tokens = _positive_int(max_tokens, "max_tokens")
    bins = _ext.load().first_fit_decreasing(arr.astype(np.int64), max_tokens, bool(padded))
    return [torch.from_numpy(b) for b in bins]


class ReplayBuffer:
    """FIFO ragged replay buffer with a capacity in tokens. See the module docstring.

    Args:
        token_fields: per-token fields (``TokenField`` list, or a ``{name: dtype}`` mapping).
        sequence_fields: per-sequence fields (``SequenceField`` list, or a ``{name: dtype}`` mapping).
        capacity_tokens: tokens kept (per field); older sequences are evicted whole.
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
        tfields = _as_fields(token_fields, TokenField, "token_fields")
        sfields = _as_fields(sequence_fields, SequenceField, "sequence_fields")
        if not tfields:
            raise ValueError("token_fields must declare at least one per-token field")
        names = [f.name for f in (*tfields, *sfields)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate field names: {dup}")
        capacity_tokens = _positive_int(capacity_tokens, "capacity_tokens")
        capacity_sequences = (
            0 if capacity_sequences is None else _positive_int(capacity_sequences, "capacity_sequences")
        )
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        seq_names = [f.name for f in sfields]
        roles = []
        for role, fname in (("group_field", group_field), ("version_field", version_field)):
            if fname is None:
                roles.append(-1)
                continue
            if fname not in seq_names:
                raise ValueError(f"{role}={fname!r} is not a per-sequence field (have {seq_names})")
            f = sfields[seq_names.index(fname)]
            if f.dtype.is_floating_point:
                raise TypeError(f"{role}={fname!r} must have an integer dtype, got {f.dtype}")
            roles.append(seq_names.index(fname))
        core = _ext.load().ReplayBufferCore(
            [
                (
                    f.name,
                    _CODES()[_numpy_dtype(f.dtype, "dtype").name],
                    _pad_bytes(f.pad, _numpy_dtype(f.dtype, "dtype"), "pad"),
                )
                for f in tfields
            ],
            [
                (
                    f.name,
                    _CODES()[_numpy_dtype(f.dtype, "dtype").name],
                    bytes(np.dtype(_numpy_dtype(f.dtype, "dtype")).itemsize),
                )
                for f in sfields
            ],
            roles[0],
            roles[1],
            capacity_tokens,
            capacity_sequences,
            float(alpha),
            int(seed),
        )
        self._init_from_core(core)

    # ---- construction helpers ------------------------------------------------------------------

    def _init_from_core(self, core: Any) -> None:
        self._core = core
        self._epochs = 0
        self._epochs_lock = threading.Lock()  # each shuffled epoch draws a distinct seed
        tspecs, sspecs, group_index, version_index = core.schema()
        names = {code: name for name, code in _CODES().items()}
        self.token_fields = tuple(
            TokenField(n, _NUMPY_TO_TORCH[names[c]], np.frombuffer(pad, dtype=names[c])[0].item())
            for n, c, pad in tspecs
        )
        self.sequence_fields = tuple(SequenceField(n, _NUMPY_TO_TORCH[names[c]]) for n, c, _ in sspecs)
        self._token_np = [np.dtype(names[c]) for _, c, _ in tspecs]
        self._seq_np = [np.dtype(names[c]) for _, c, _ in sspecs]
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
        fields as scalars. Returns its id. ``priority`` defaults to the largest priority seen."""
        tok, seq = self._split_fields(fields)
        arrays = [_as_array(v, n, dt) for v, n, dt in tok]
        for a, (_, n, _) in zip(arrays, tok, strict=True):
            if a.ndim != 1:
                raise ValueError(f"field {n!r} of a single sequence must be 1-D, got shape {a.shape}")
        length = arrays[0].shape[0]
        for a, (_, n, _) in zip(arrays, tok, strict=True):
            if a.shape[0] != length:
                raise ValueError(
                    f"per-token fields must have one length: "
                    f"{tok[0][1]!r} has {length}, {n!r} has {a.shape[0]}"
                )
        seqs = []
        for v, n, dt in seq:
            a = _as_array(v, n, dt)
            if a.size != 1 or a.ndim > 1:
                raise ValueError(f"per-sequence field {n!r} must be a scalar, got shape {a.shape}")
            seqs.append(a.reshape(1))
        prios = None if priority is None else _priorities_array([priority], "priority")
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
        at [T - len, T)), or ``mask`` (B, T) whose nonzero entries form one run per row.
        Returns the new ids, (B,) int64.
        """
        if (lengths is None) == (mask is None):
            raise ValueError("add_padded needs exactly one of lengths= or mask=")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        tok, seq = self._split_fields(fields)
        arrays = [_as_array(v, n, dt) for v, n, dt in tok]
        shape = arrays[0].shape
        for a, (_, n, _) in zip(arrays, tok, strict=True):
            if a.ndim != 2:
                raise ValueError(f"padded field {n!r} must be 2-D (B, T), got shape {a.shape}")
            if a.shape != shape:
                raise ValueError(
                    f"padded fields disagree in shape: {tok[0][1]!r} is {shape}, {n!r} is {a.shape}"
                )
        B, T = shape
        starts, lens = _padded_starts(lengths, mask, padding_side, B, T)
        seqs = self._sequence_arrays(seq, B)
        prios = None if priorities is None else _priorities_array(priorities, "priorities", B)
        ids = self._core.add(arrays, seqs, np.ascontiguousarray(starts, np.int64), lens, T, prios)
        return torch.from_numpy(ids)

    def add_packed(self, *, cu_seqlens: Any, priorities: Any = None, **fields: Any) -> torch.Tensor:
        """Add B sequences packed end to end: per-token fields (N,), ``cu_seqlens`` (B + 1,) with
        cu_seqlens[0] = 0, cu_seqlens[-1] = N, strictly increasing. Returns the new ids, (B,) int64."""
        tok, seq = self._split_fields(fields)
        arrays = [_as_array(v, n, dt) for v, n, dt in tok]
        N = arrays[0].shape[0] if arrays[0].ndim == 1 else -1
        for a, (_, n, _) in zip(arrays, tok, strict=True):
            if a.ndim != 1 or a.shape[0] != N:
                raise ValueError(
                    f"packed field {n!r} must be 1-D with {tok[0][1]!r}'s length {N}, got shape {a.shape}"
                )
        starts, lens = _packed_starts(cu_seqlens, N)
        B = lens.size
        seqs = self._sequence_arrays(seq, B)
        prios = None if priorities is None else _priorities_array(priorities, "priorities", B)
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
        batch_size = _positive_int(batch_size, "batch_size")
        if min_available is None:
            min_available = batch_size if timeout != 0.0 else 0
        args = (
            batch_size,
            bool(prioritized),
            bool(replace),
            float(beta),
            self._min_version(min_version),
            int(min_available),
            self._layout(layout),
            self._pad_left(padding_side),
            self._pad_values(pad_values),
            _timeout(timeout),
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
        num_groups = _positive_int(num_groups, "num_groups")
        min_group_size = _positive_int(min_group_size, "min_group_size")
        args = (
            num_groups,
            min_group_size,
            self._min_version(min_version),
            self._layout(layout),
            self._pad_left(padding_side),
            self._pad_values(pad_values),
            _timeout(timeout),
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
        gather = (self._layout(layout), self._pad_left(padding_side), self._pad_values(pad_values))
        return self._gather(_ids_array(ids), layout, gather, bool(skip_missing), pin_memory)

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
        epoch runs are skipped. Each stored sequence is yielded exactly once."""
        if batch_size is None and max_tokens is None:
            raise ValueError("epoch needs batch_size= and/or max_tokens=")
        if batch_size is not None:
            batch_size = _positive_int(batch_size, "batch_size")
        if max_tokens is not None:
            max_tokens = _positive_int(max_tokens, "max_tokens")
        gather = (self._layout(layout), self._pad_left(padding_side), self._pad_values(pad_values))
        _check_pin_memory(pin_memory)
        ids, lengths = self._core.snapshot(self._min_version(min_version), bool(shuffle))
        return self._epoch_iter(
            ids, lengths, batch_size, max_tokens, shuffle, drop_last, layout, gather, pin_memory
        )

    def _epoch_iter(
        self, ids, lengths, batch_size, max_tokens, shuffle, drop_last, layout, gather, pin_memory
    ):
        if max_tokens is not None:
            bins = _ext.load().first_fit_decreasing(lengths, max_tokens, layout == "padded")
            if shuffle:
                # FFD emits bins longest first; visit them in a seeded random order instead.
                with self._epochs_lock:
                    self._epochs += 1
                    epoch = self._epochs
                order = np.random.default_rng([self.seed, epoch]).permutation(len(bins))
                bins = [bins[i] for i in order]
            groups = [ids[b] for b in bins]
        else:
            groups = [ids]
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
        _check_pin_memory(pin_memory)
        if not pin_memory:
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
        return _pinned(self._batch(core_call(False), layout))  # under heavy eviction: copy, then pin

    def _gather(
        self, ids: np.ndarray, layout: str, gather: tuple, skip_missing: bool, pin_memory: bool
    ) -> Batch:
        _check_pin_memory(pin_memory)
        if pin_memory:
            found = self._core.gather(ids, *gather, skip_missing, ids_only=True)
            try:
                return self._copy_into(found["ids"], found["lengths"], layout, gather, pin=True)
            except IndexError:
                if not skip_missing:
                    raise
            return _pinned(self._batch(self._core.gather(ids, *gather, True), layout))
        return self._batch(self._core.gather(ids, *gather, skip_missing), layout)

    def _copy_into(
        self, ids: np.ndarray, lengths: np.ndarray, layout: str, gather: tuple, pin: bool
    ) -> Batch:
        """Allocate the batch's tensors here (pinned when ``pin``) and let the core fill their
        NumPy views with one copy. IndexError when an id was evicted meanwhile (nothing written)."""
        B = int(ids.size)
        padded = layout == "padded"
        max_len = int(lengths.max()) if B else 0
        length = max_len if padded else int(lengths.sum())
        shape = (B, length) if padded else (length,)
        fields = {f.name: torch.empty(shape, dtype=f.dtype, pin_memory=pin) for f in self.token_fields}
        fields.update({f.name: torch.empty(B, dtype=f.dtype, pin_memory=pin) for f in self.sequence_fields})
        mask = torch.empty(shape, dtype=torch.bool, pin_memory=pin) if padded else None
        cu = None if padded else torch.empty(B + 1, dtype=torch.int32, pin_memory=pin)
        pos = None if padded else torch.empty(length, dtype=torch.int64, pin_memory=pin)
        self._core.gather_into(
            ids,
            *gather,
            length,
            [fields[f.name].numpy() for f in self.token_fields],
            [fields[f.name].numpy() for f in self.sequence_fields],
            None if mask is None else mask.numpy(),
            None if cu is None else cu.numpy(),
            None if pos is None else pos.numpy(),
        )
        ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
        if pin:
            ids_t, lengths_t = ids_t.pin_memory(), lengths_t.pin_memory()
        return Batch(ids_t, lengths_t, fields, layout, max_len, mask, cu, pos)

    # ---- priorities ----------------------------------------------------------------------------

    def update_priorities(self, ids: Any, priorities: Any, *, ignore_missing: bool = False) -> None:
        """Set priorities p (finite, > 0) of live ids; P(i) ~ p_i^alpha. An evicted id raises
        IndexError (nothing is updated) unless ``ignore_missing``. O(n log N)."""
        ids_arr = _ids_array(ids)
        p = _priorities_array(priorities, "priorities", ids_arr.size)
        self._core.update_priorities(ids_arr, p, bool(ignore_missing))

    def priorities(self, ids: Any) -> torch.Tensor:
        """Raw priorities of live ids, float64."""
        return torch.from_numpy(self._core.priorities(_ids_array(ids)))

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a versioned, CRC-32-checked image: to ``path.tmp.*`` then renamed over ``path``."""
        self._core.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Read a file written by :meth:`save`; a corrupt or truncated file raises ValueError."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no replay buffer file at {path!r}")
        buf = cls.__new__(cls)
        buf._init_from_core(_ext.load().ReplayBufferCore.load(path))
        return buf

    def __getstate__(self) -> dict[str, Any]:
        return {"image": self._core.to_bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init_from_core(_ext.load().ReplayBufferCore.from_bytes(state["image"]))

    # ---- conversions ---------------------------------------------------------------------------

    def _split_fields(self, fields: Mapping[str, Any]):
        known = {f.name for f in (*self.token_fields, *self.sequence_fields)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; the schema has {sorted(known)}")
        missing = [
            n for n in (f.name for f in (*self.token_fields, *self.sequence_fields)) if n not in fields
        ]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        tok = [(fields[f.name], f.name, dt) for f, dt in zip(self.token_fields, self._token_np, strict=True)]
        seq = [(fields[f.name], f.name, dt) for f, dt in zip(self.sequence_fields, self._seq_np, strict=True)]
        return tok, seq

    def _sequence_arrays(self, seq, B: int) -> list[np.ndarray]:
        out = []
        for v, n, dt in seq:
            a = _as_array(v, n, dt)
            if a.shape != (B,):
                raise ValueError(f"per-sequence field {n!r} must have shape ({B},), got {a.shape}")
            out.append(a)
        return out

    def _min_version(self, min_version: Any) -> int | None:
        if min_version is None:
            return None
        if self.version_field is None:
            raise ValueError("min_version needs version_field= set when the buffer is built")
        if isinstance(min_version, bool) or not isinstance(min_version, (int, np.integer)):
            raise TypeError(f"min_version must be an int or None, got {type(min_version).__name__}")
        return int(min_version)

    @staticmethod
    def _layout(layout: str) -> int:
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")
        return _LAYOUTS[layout]

    @staticmethod
    def _pad_left(padding_side: str) -> bool:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        return padding_side == "left"

    def _pad_values(self, pad_values: Mapping[str, Any] | None) -> list[bytes] | None:
        if pad_values is None:
            return None
        if not isinstance(pad_values, Mapping):
            raise TypeError(
                f"pad_values must be a mapping of field name -> value, got {type(pad_values).__name__}"
            )
        names = [f.name for f in self.token_fields]
        unknown = sorted(set(pad_values) - set(names))
        if unknown:
            raise ValueError(
                f"pad_values names unknown per-token field(s) {unknown}; per-token fields: {names}"
            )
        return [
            _pad_bytes(pad_values.get(f.name, f.pad), dt, f"pad_values[{f.name!r}]")
            for f, dt in zip(self.token_fields, self._token_np, strict=True)
        ]

    def _batch(self, out: dict[str, Any], layout: str) -> Batch:
        fields = {
            f.name: torch.from_numpy(a) for f, a in zip(self.token_fields, out["token_fields"], strict=True)
        }
        fields.update(
            {
                f.name: torch.from_numpy(a)
                for f, a in zip(self.sequence_fields, out["sequence_fields"], strict=True)
            }
        )
        lengths = torch.from_numpy(out["lengths"])
        packed = layout == "packed"
        return Batch(
            ids=torch.from_numpy(out["ids"]),
            lengths=lengths,
            fields=fields,
            layout=layout,
            max_seqlen=int(out["max_length"]),
            attention_mask=None if packed else torch.from_numpy(out["attention_mask"]),
            cu_seqlens=torch.from_numpy(out["cu_seqlens"]) if packed else None,
            position_ids=torch.from_numpy(out["position_ids"]) if packed else None,
            weights=torch.from_numpy(out["weights"]) if "weights" in out else None,
        )


_PIN_ATTEMPTS = 3
