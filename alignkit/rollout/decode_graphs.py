"""Static-shape decode steps, replayed from CUDA graphs (the ``decode="graphs"`` mode of the engine).

On a GPU a decode step of a small or medium model is bound by kernel launches, not by the kernels:
a 24-layer model issues some 400 of them per token. Capturing the step once in a CUDA graph and
replaying it issues one. A graph replays fixed kernels on fixed buffers, so the step must have
static shapes and read nothing from Python that changes between steps:

* the KV cache in static mode (alignkit/rollout/cache.py): each step writes column ``position`` (a
  device tensor) and attends over all ``max_len`` columns, the unfilled ones masked;
* the step's inputs (tokens, position ids) and its mask are built from fixed buffers inside the step;
* finished rows still leave the batch (the cache compacts them away, outside the graph), but the
  batch runs at a *bucket* size, a power of two at or above the live rows (or all rows): one graph
  per bucket, captured when first needed, in decreasing size so they share one memory pool. Rows
  past the live count compute on stale inputs; their outputs are never read and their cache rows
  are free.

``decode="static"`` runs the same static step without capturing it (any device): the CPU tests check
it against the dynamic step and check that it makes no host read, which is what a capture needs.
"""

from __future__ import annotations

import warnings

import torch

from .cache import PreallocatedCache
from .forward import ModelSpec, additive_mask, last_logits

DECODE_MODES = ("auto", "eager", "static", "graphs")
STATIC_ATTENTION = ("sdpa", "eager")  # implementations that take the static step's 4-D mask


def static_length(length: int) -> int:
    """The cache length of a static call: ``length`` rounded up to a multiple of 16, so the (b, 1, 1,
    max_len) mask meets the alignment CUDA's memory-efficient attention wants without a padded
    copy each step (the extra columns are masked like every unfilled one)."""
    return -(-length // 16) * 16


def buckets(rows: int) -> list[int]:
    """Batch sizes a static step runs at, largest first: ``rows`` and the powers of two below it."""
    sizes = {rows} | {1 << i for i in range(rows.bit_length()) if (1 << i) < rows}
    return sorted(sizes, reverse=True)


def resolve_decode(decode: str, spec: ModelSpec, device: torch.device) -> str:
    """The decode mode a call uses: ``"eager"``, ``"static"`` or ``"graphs"`` (``auto``: graphs on CUDA
    when the model's attention implementation takes the static mask, else eager)."""
    if decode == "auto":
        return "graphs" if device.type == "cuda" and spec.attention in STATIC_ATTENTION else "eager"
    if decode in ("static", "graphs") and spec.attention not in STATIC_ATTENTION:
        raise ValueError(
            f"decode={decode!r} needs an attention implementation in {STATIC_ATTENTION}, the model "
            f"uses {spec.attention!r}"
        )
    if decode == "graphs" and device.type != "cuda":
        raise ValueError(f"decode='graphs' needs a model on CUDA, the model is on {device.type}")
    return decode


class StaticDecoder:
    """Runs the decode steps of one ``generate`` call at static shapes over ``cache`` (switched to
    static mode here), replaying a CUDA graph per bucket when ``capture`` (see the module docstring).

    ``decoder(tokens (a,), positions (a,)) -> logits (a, V)`` feeds the last tokens of the ``a`` live
    rows (rows [0, a) of the cache) and advances the cache by one column."""

    def __init__(self, model, spec: ModelSpec, cache: PreallocatedCache, *, capture: bool) -> None:
        self.model = model
        self.spec = spec
        self.cache = cache
        self.capture = capture
        self.buckets = buckets(cache.rows)
        device = cache.key_mask.device
        self.tokens = torch.zeros(cache.rows, 1, dtype=torch.int64, device=device)  # (rows, 1)
        self.positions = torch.zeros(cache.rows, 1, dtype=torch.int64, device=device)  # (rows, 1)
        self.columns = torch.arange(cache.max_len, device=device)  # (max_len,)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.rows_run: list[int] = []  # the batch size of each step (a bucket)
        self.failed = False  # a capture failed: the rest of the call runs the step eagerly
        cache.begin_static()

    def bucket(self, live: int) -> int:
        return min(b for b in self.buckets if b >= live)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        live = tokens.shape[0]
        size = self.bucket(live)
        self.tokens[:live, 0].copy_(tokens)
        self.positions[:live, 0].copy_(positions)
        self.cache.position.fill_(self.cache.length)  # a host int written to the device: no sync
        if self.capture and size not in self.graphs:
            try:
                self._capture(size)
            except RuntimeError as exc:  # e.g. a host sync inside a model's forward
                capture_failed(exc)
                self.capture, self.failed = False, True
        if self.capture:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self.step(size)
        self.cache.advance()
        self.rows_run.append(size)
        return logits[:live]

    def step(self, size: int) -> torch.Tensor:
        """One static decode step over rows [0, size): (size, V) fp32 logits."""
        cache = self.cache
        keys = cache.key_mask[:size] & (self.columns <= cache.position)  # (size, max_len)
        mask = keys[:, None, None, :]  # (size, 1, 1, max_len), True: attend
        if self.spec.attention != "sdpa":
            mask = additive_mask(mask, self.model.dtype)
        return last_logits(self.model, self.spec, self.tokens[:size], self.positions[:size], cache, mask)

    def _capture(self, size: int) -> None:
        # The PyTorch recipe: warm up on a side stream (kernel selection, allocator), then capture.
        # The warm-up is a real step: it writes the same cache column the replay writes again.
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # autocast's weight cache must be off inside a capture (its casts would be captured once)
        with (
            torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False),
            torch.cuda.graph(graph, pool=self.pool),
        ):
            logits = self.step(size)
        self.pool = graph.pool()
        self.graphs[size] = (graph, logits)


def capture_failed(exc: Exception) -> None:
    warnings.warn(
        f"CUDA-graph capture of the decode step failed ({type(exc).__name__}: {exc}); this engine "
        "decodes without graphs from here on (RolloutEngine(decode='eager') skips the attempt)",
        RuntimeWarning,
        stacklevel=4,
    )
