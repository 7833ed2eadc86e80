"""A preallocated KV cache for the rollout engine: written in place, read over the filled length only.

Storage of one layer, allocated once per ``generate`` call (sized for every row and every step)::

    keys / values   (rows, heads, max_len, head_dim)
                     ^^^^                 rows [0, active) are the batch the model sees
                            ^^^^^^^ columns [0, length) are filled; the next step writes column length

The model's attention layers call ``update(k, v, layer_idx)``; the cache copies the new states into
column ``length`` (no ``torch.cat``, so no re-allocation per step, unlike ``DynamicCache``) and
returns views ``storage[:active, :, :length]``: attention runs over the filled length, not over
``max_len`` (``StaticCache`` attends over its full maximum length, which is slower uncompiled).

Two operations the engine needs that Hugging Face's caches do not have:

* Shared prefill: the prefill runs on the U distinct prompts and ``update`` writes each prompt's
  states into its ``repeats`` consecutive rows (a broadcast copy): the n samples of a prompt never
  prefill n times.
* Compaction: rows that finished leave the batch. ``compact`` moves the surviving rows that sit past
  the new active count into the holes the finished rows left before it, so the cost is one copy per
  *moved* row (at most the number of finished rows), never a copy of the whole cache.

Static mode (``begin_static``, for decode steps replayed from a CUDA graph, alignkit/rollout/
decode_graphs.py): a replay re-runs the kernels of the captured forward, not its Python, so nothing
a step needs may live in Python state. ``update`` then writes the new column at the device tensor
``position`` (set by the engine before each step) and returns the full ``max_len`` columns (the
step's mask hides the unfilled ones); the filled length advances by ``advance()``, called by the
engine, never inside the forward; and the lengths the model reads (``get_seq_length``,
``get_mask_sizes``) are constants, so whatever the forward derives from them is the same at capture
and at every replay.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One attention layer's keys and values (see the module docstring for the layout)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, rows: int, max_len: int, repeats: int = 1) -> None:
        super().__init__()
        self.rows = rows  # every row of the call (prompts * repeats)
        self.max_len = max_len  # prompt width + response budget
        self.repeats = repeats  # rows per prefilled prompt
        self.active = rows  # rows [0, active) take part in the next forward
        self.length = 0  # filled columns, the same for every row (left padding)
        self.position: torch.Tensor | None = None  # static mode: (1,) int64, the column to write

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, k_dim = key_states.shape
        shape = (self.rows, heads, self.max_len)
        self.keys = key_states.new_empty((*shape, k_dim))
        self.values = value_states.new_empty((*shape, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states (b, heads, q, head_dim): the new positions of the rows in the batch
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.position is not None:  # static mode: no Python state read or written
            rows = key_states.shape[0]
            self.keys[:rows].index_copy_(2, self.position, key_states)
            self.values[:rows].index_copy_(2, self.position, value_states)
            return self.keys[:rows], self.values[:rows]
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.max_len:
            raise RuntimeError(f"the KV cache holds {self.max_len} positions, a forward needs {end}")
        if self.length == 0 and self.repeats > 1:
            # Shared prefill: prompt u's states go to rows u * repeats ... (u + 1) * repeats - 1.
            prompts = key_states.shape[0]
            for storage, new in ((self.keys, key_states), (self.values, value_states)):
                grouped = storage[: prompts * self.repeats].view(prompts, self.repeats, *storage.shape[1:])
                grouped[:, :, :, :q].copy_(new.unsqueeze(1))
            self.length = end
            return key_states, value_states  # the prefill attends within its own U rows
        active = key_states.shape[0]
        self.keys[:active, :, self.length : end].copy_(key_states)
        self.values[:active, :, self.length : end].copy_(value_states)
        self.length = end
        return self.keys[:active, :, :end], self.values[:active, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.position is not None:
            return self.max_len, 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        # static mode: a constant (see the module docstring); the engine reads ``length`` itself
        return self.max_len - 1 if self.position is not None else self.length

    def get_max_length(self) -> int:
        return self.max_len

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, active: int) -> None:
        """Copy rows ``src`` onto rows ``dst`` (filled columns only); rows [0, active) stay in."""
        if self.is_initialized and src.numel():
            for storage in (self.keys, self.values):
                filled = storage[:, :, : self.length]
                filled.index_copy_(0, dst, filled.index_select(0, src))
        self.active = active


class PreallocatedCache(Cache):
    """A ``transformers`` Cache of :class:`PreallocatedLayer` s, one per decoder layer.

    It also holds ``key_mask`` (rows, max_len) bool, True at real positions (False on the prompts'
    left padding), moved with the rows, from which the engine builds each step's attention mask.

    Args:
        num_layers: decoder layers of the model.
        prompt_mask: (U, P) 0/1 mask of the distinct left-padded prompts.
        max_len: positions per row (P + response budget).
        repeats: rows per prompt: the cache holds ``U * repeats`` rows; the prefill runs on U.
    """

    def __init__(self, *, num_layers: int, prompt_mask: torch.Tensor, max_len: int, repeats: int = 1) -> None:
        prompts, width = prompt_mask.shape
        rows = prompts * repeats
        super().__init__(layers=[PreallocatedLayer(rows, max_len, repeats) for _ in range(num_layers)])
        self.rows = rows
        self.max_len = max_len
        self.repeats = repeats
        self.active = rows
        self.key_mask = torch.ones(rows, max_len, dtype=torch.bool, device=prompt_mask.device)
        self.key_mask[:, :width] = prompt_mask.bool().repeat_interleave(repeats, dim=0)
        self.has_padding = not bool(prompt_mask.bool().all())  # one host read per call
        self.position: torch.Tensor | None = None  # static mode only (begin_static)

    def compact(self, finished: torch.Tensor) -> torch.Tensor:
        """Drop the rows where ``finished`` (a (active,) bool tensor) is True from the batch.

        Surviving rows past the new active count move into the holes that finished rows leave
        before it. Returns ``order`` (new_active,): for each new row, the old row it holds, so the
        caller permutes its per-row state with ``state[order]``."""
        keep = ~finished
        order = torch.nonzero(keep).squeeze(1)  # old index of each survivor, ascending
        new_active = order.numel()
        # Survivors already inside [0, new_active) stay where they are; the others fill the holes.
        stays = order < new_active
        holes = torch.nonzero(~keep[:new_active]).squeeze(1)  # finished rows inside the new range
        movers = order[~stays]  # survivors outside it, as many as there are holes
        for layer in self.layers:
            layer.move_rows(movers, holes, new_active)
        if movers.numel():
            self.key_mask.index_copy_(0, holes, self.key_mask.index_select(0, movers))
        self.active = new_active
        new_order = torch.arange(new_active, device=finished.device)
        new_order[holes] = movers
        return new_order

    @property
    def length(self) -> int:
        """Filled columns (the same in every layer and row)."""
        return self.layers[0].length

    def begin_static(self) -> None:
        """Switch to static mode (after the prefill; see the module docstring)."""
        if not all(layer.is_initialized for layer in self.layers):
            raise RuntimeError("begin_static needs a prefilled cache")
        self.position = torch.zeros(1, dtype=torch.int64, device=self.key_mask.device)
        for layer in self.layers:
            layer.position = self.position
            # The static step reads every column (masked): the unfilled ones must hold finite
            # values, not what new_empty left there (a NaN times a zero weight is NaN).
            layer.keys[:, :, layer.length :].zero_()
            layer.values[:, :, layer.length :].zero_()

    def advance(self) -> None:
        """Static mode: count the column the last step wrote as filled."""
        for layer in self.layers:
            if layer.length >= layer.max_len:
                raise RuntimeError(f"the KV cache holds {layer.max_len} positions, a step needs one more")
            layer.length += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)
