"""``RolloutEngine``: batched sampling from a Hugging Face causal LM, returning a :class:`Rollout`.

The engine validates and encodes the prompts, then hands token ids and :class:`SamplingParams` to a
*runner* (the seam for other backends: anything with :class:`RolloutRunner`'s ``generate``; a vLLM
runner would sit here). The built-in :class:`TransformersRunner` is a gpt-fast style loop::

    logits = prefill(model, ids, positions, cache)            # U distinct prompts, KV shared by n rows
    for step in range(T):
        token, logp, floor = sample(logits, ...)              # one step, kernels/sampling.py on CUDA
        record, mark finished rows                            # device-side bookkeeping (_no_sync)
        drop finished rows from the batch (cache.compact)     # they stop costing compute
        logits = decode_one_token(model, token, positions, cache)

On CUDA the decode step runs at static shapes and replays a CUDA graph (``decode="graphs"``, the
default there; alignkit/rollout/decode_graphs.py); finished rows still leave, the batch runs at
power-of-two buckets. Everything is sized once per call: the KV cache (prompt width + response
budget), the output buffers, the key mask. Each row carries its own random-stream key (from its
prompt's seed and its sample index, alignkit/rollout/random_streams.py) through the compaction, so
a row samples the same tokens whichever other rows share the call. Logits that are not finite (a
diverged model) raise at the next host read, with the rows named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .. import _checks
from .. import backend as _backend
from .cache import PreallocatedCache
from .decode_graphs import DECODE_MODES, StaticDecoder, resolve_decode, static_length
from .forward import ModelSpec, decode_one_token, prefill
from .prompts import StopStrings, encode_prompts, left_pad, special_tokens
from .random_streams import prompt_seeds, row_keys
from .sampling import sample
from .types import FINISH_REASONS, Rollout, SamplingParams, split_stop

_LENGTH, _EOS, _STOP = (
    FINISH_REASONS.index("length"),
    FINISH_REASONS.index("eos"),
    FINISH_REASONS.index("stop"),
)


@runtime_checkable
class RolloutRunner(Protocol):
    """A generation backend: token-id prompts and validated settings in, a :class:`Rollout` out
    (``texts`` may be left None: the engine decodes them)."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, progress: bool) -> Rollout: ...


class _Rows:
    """Per-row state of the active batch, on the device (row b of every tensor is one sequence)."""

    def __init__(
        self, rows: torch.Tensor, positions: torch.Tensor, budget: torch.Tensor, keys: torch.Tensor
    ) -> None:
        self.rows = rows  # (b,) index of the sequence in the output
        self.positions = positions  # (b,) position id of the next fed token
        self.budget = budget  # (b,) tokens this row may sample (context-capped max_new_tokens)
        self.keys = keys  # (b,) int64 random-stream key of the row
        self.alive = torch.ones_like(rows, dtype=torch.bool)  # (b,) still sampling

    def select(self, order: torch.Tensor) -> None:
        self.rows, self.positions, self.budget, self.keys, self.alive = (
            t.index_select(0, order) for t in (self.rows, self.positions, self.budget, self.keys, self.alive)
        )


class TransformersRunner:
    """The built-in decode loop over a ``transformers`` causal LM (see the module docstring).

    Args:
        model: the causal LM, used live.
        tokenizer: needed for stop strings only.
        backend: the sampling step's implementation, ``"auto" | "triton" | "cpu"`` (auto: the Triton
            kernel on CUDA, torch on CPU).
        sync_every: steps between host reads of the finished flags (each is a device sync on CUDA);
            default 1 on CPU, 4 on CUDA. Finished rows leave the batch at those reads.
        decode: how decode steps run (alignkit/rollout/decode_graphs.py): ``"eager"`` (dynamic
            shapes: attention over the filled length), ``"graphs"`` (static shapes, each step a CUDA
            graph replay; CUDA only), ``"static"`` (the graphs mode's step without the capture), or
            ``"auto"``: graphs on CUDA (sdpa / eager attention), else eager. A capture that fails
            warns and the runner decodes eagerly from then on.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        backend: str | None = None,
        sync_every: int | None = None,
        decode: str = "auto",
    ) -> None:
        if not isinstance(decode, str) or decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = ModelSpec.of(model)
        self.backend = _backend.requested(backend)
        self.sync_every = None if sync_every is None else _checks.positive_int(sync_every, "sync_every")
        self.decode = decode
        self.forward_rows: list[int] = []  # rows of each forward of the last call (prefill first)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, progress: bool = False
    ) -> Rollout:
        device, n = self.device, params.n
        kind = _backend.resolve(self.backend, device)
        mode = resolve_decode(self.decode, self.spec, device)
        stop_strings = StopStrings(params.stop_strings, self.tokenizer)
        keys = row_keys(prompt_seeds(params.seed, len(prompt_ids)), n, device)  # (N,), prompt-major
        eos_ids, pad_id = special_tokens(self.model, self.tokenizer)  # read per call: the model is live
        ids, prompt_mask = left_pad(prompt_ids, pad_id, device)  # (U, P)
        context = self.spec.context
        budgets = [params.max_new_tokens if context is None else min(params.max_new_tokens, context - len(p))
                   for p in prompt_ids for _ in range(n)]  # fmt: skip
        steps = max(budgets)
        rows_total = len(budgets)
        cache = PreallocatedCache(
            num_layers=self.spec.num_layers,
            prompt_mask=prompt_mask,
            repeats=n,
            max_len=ids.shape[1] + steps if mode == "eager" else static_length(ids.shape[1] + steps),
        )
        out = _Outputs(rows_total, steps, pad_id, params.truncated, device)
        eos = torch.tensor(eos_ids, dtype=torch.int64, device=device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.int64, device=device)
        suppress = torch.cat([eos, stop_ids]).unique()
        sync_every = 1 if stop_strings else self.sync_every or (1 if device.type == "cpu" else 4)
        history: list[list[int]] = [[] for _ in range(rows_total)]

        self.forward_rows = [ids.shape[0]]
        positions = (prompt_mask.cumsum(-1) - 1).clamp_min_(0)  # (U, P); padding: 0, never attended
        logits = prefill(self.model, ids, positions, cache, spec=self.spec, prompt_mask=prompt_mask)
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)  # (N, V): the n samples share the prefill
        static = (
            None if mode == "eager" else StaticDecoder(self.model, self.spec, cache, capture=mode == "graphs")
        )
        state = _Rows(
            rows=torch.arange(rows_total, device=device),
            positions=prompt_mask.sum(-1).repeat_interleave(n),
            budget=torch.tensor(budgets, device=device),
            keys=keys,
        )
        bar = _progress_bar(progress, steps)
        try:
            for step in range(steps):
                if step < params.min_new_tokens and suppress.numel():
                    logits.index_fill_(1, suppress, float("-inf"))
                result = sample(
                    logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                    keys=state.keys, step=step, backend=kind,
                )  # fmt: skip
                finished, reason = _finished_no_sync(result.token, step, state, eos, stop_ids)
                if stop_strings and step + 1 >= params.min_new_tokens:
                    finished, reason = _stop_strings(
                        result.token, state, history, stop_strings, finished, reason
                    )
                out.record_no_sync(step, state, result, finished, reason)
                bar.update(1)
                if step + 1 == steps:
                    break
                tokens = result.token
                if (step + 1) % sync_every == 0:
                    tokens = _drop_finished(cache, state, tokens, out, step)
                    if tokens is None:
                        break
                    bar.set_postfix(rows=cache.active, refresh=False)
                if static is None:
                    self.forward_rows.append(cache.active)
                    logits = decode_one_token(self.model, tokens, state.positions, cache, spec=self.spec)
                else:
                    logits = static(tokens, state.positions)
                    self.forward_rows.append(static.rows_run[-1])
                state.positions += 1
        finally:
            bar.close()
            if static is not None and static.failed:
                self.decode = "eager"
        out.check_finite(step)
        return out.rollout(ids, prompt_mask, n)


def _drop_finished(
    cache: PreallocatedCache, state: _Rows, tokens: torch.Tensor, out: _Outputs, step: int
) -> torch.Tensor | None:
    """Compact the finished rows out of the batch (one host read: a device sync on CUDA; it also
    reads the non-finite flag). Returns the surviving rows' last tokens, or None when every row has
    finished."""
    done = ~state.alive
    count, nonfinite = torch.stack([done.sum(), out.nonfinite.long()]).tolist()
    if nonfinite:
        out.check_finite(step)
    if count == done.numel():
        return None
    if count:
        order = cache.compact(done)
        state.select(order)
        tokens = tokens.index_select(0, order)
    return tokens


def _stop_strings(token, state: _Rows, history, stop_strings: StopStrings, finished, reason):
    """Host side (only with stop strings): append each live row's token to its history and finish
    the rows whose decoded response now ends a stop string."""
    hits = []
    for b, (row, tok, alive, done) in enumerate(
        zip(state.rows.tolist(), token.tolist(), state.alive.tolist(), finished.tolist(), strict=True)
    ):
        if alive:
            history[row].append(tok)
            if not done and stop_strings.hit(history[row]):
                hits.append(b)
    if hits:
        at = torch.tensor(hits, device=token.device)
        finished = finished.index_fill(0, at, True)
        reason = reason.index_fill(0, at, _STOP)
    return finished, reason


def _finished_no_sync(token, step, state: _Rows, eos, stop_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(finished (b,) bool, reason (b,) int64) of the rows after sampling ``token`` at ``step``."""
    is_eos = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
    is_stop = torch.isin(token, stop_ids) if stop_ids.numel() else torch.zeros_like(is_eos)
    at_budget = state.budget <= step + 1
    reason = torch.where(is_eos, _EOS, torch.where(is_stop, _STOP, _LENGTH))
    return is_eos | is_stop | at_budget, reason


class _Outputs:
    """The (N, T) output buffers, written one column per step for the live rows."""

    def __init__(self, rows: int, steps: int, pad_id: int, truncated: bool, device: torch.device) -> None:
        self.ids = torch.full((rows, steps), pad_id, dtype=torch.int64, device=device)
        self.mask = torch.zeros((rows, steps), dtype=torch.int64, device=device)
        self.logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)
        self.floor = torch.full((rows, steps), float("-inf"), device=device) if truncated else None
        self.reason = torch.full((rows,), _LENGTH, dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a live row's log-prob was NaN/inf
        self.pad_id = pad_id

    def record_no_sync(self, step: int, state: _Rows, result, finished, reason) -> None:
        live, rows = state.alive, state.rows
        self.ids[:, step].index_copy_(0, rows, torch.where(live, result.token, self.pad_id))
        self.mask[:, step].index_copy_(0, rows, live.long())
        self.logprobs[:, step].index_copy_(0, rows, torch.where(live, result.logprob, 0.0))
        if self.floor is not None:
            self.floor[:, step].index_copy_(0, rows, torch.where(live, result.floor, float("-inf")))
        # A sampled token has positive mass, so its log-prob is finite unless the logits were not.
        self.nonfinite |= (live & ~torch.isfinite(result.logprob)).any()
        newly = live & finished
        self.reason.index_copy_(0, rows, torch.where(newly, reason, self.reason.index_select(0, rows)))
        state.alive = live & ~finished

    def check_finite(self, step: int) -> None:
        """Raise when a live row sampled from non-finite logits by ``step`` (a host read)."""
        if bool(self.nonfinite):
            rows = torch.nonzero(~torch.isfinite(self.logprobs[:, : step + 1]).all(-1)).squeeze(1)
            raise RuntimeError(
                f"the model produced non-finite logits (NaN or inf) for row(s) {rows.tolist()[:8]} by "
                f"decode step {step}: their samples would be garbage (check the weights, the precision, "
                "the learning rate)"
            )

    def rollout(self, ids: torch.Tensor, prompt_mask: torch.Tensor, n: int) -> Rollout:
        width = max(int(self.mask.sum(-1).max()), 1)  # trim to the longest response
        floor = None if self.floor is None else self.floor[:, :width].contiguous()
        reasons = [FINISH_REASONS[r] for r in self.reason.tolist()]
        return Rollout(
            prompt_ids=ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            response_ids=self.ids[:, :width].contiguous(),
            response_mask=self.mask[:, :width].contiguous(),
            logprobs=self.logprobs[:, :width].contiguous(),
            logit_floor=floor,
            finish_reason=reasons,
            group_ids=torch.arange(ids.shape[0], device=ids.device).repeat_interleave(n),
        )


class _NoBar:
    def update(self, *args, **kwargs) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...


def _progress_bar(progress: bool, total: int):
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:  # tqdm ships with transformers; say so if it is missing anyway
        raise ImportError("progress=True needs tqdm: pip install tqdm (a dependency of alignkit)") from exc
    return tqdm(total=total, desc="rollout", unit="step", leave=False)


class RolloutEngine:
    """Batched sampling from a Hugging Face causal LM, returning :class:`Rollout` s.

    Args:
        model: any ``AutoModelForCausalLM`` (Llama, Qwen2, GPT-2 style), used live: no weight copy.
        tokenizer: a ``transformers`` tokenizer; needed for string / chat prompts, stop strings and
            ``texts``.
        runner: the generation backend (a :class:`RolloutRunner`); default the built-in
            :class:`TransformersRunner`.
        backend: the sampling step's implementation for the default runner (``"auto" | "triton" |
            "cpu"``).
        decode: how the default runner runs decode steps (``"auto" | "eager" | "graphs" |
            "static"``; auto: CUDA graphs on CUDA, see :class:`TransformersRunner`).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        runner: RolloutRunner | None = None,
        backend: str | None = None,
        decode: str = "auto",
    ) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(
                "model must be a Hugging Face causal LM (torch.nn.Module with a config), "
                f"got {type(model).__name__}"
            )
        if runner is not None and not isinstance(runner, RolloutRunner):
            raise TypeError(
                "runner must have a generate(prompt_ids, params, *, progress) method, "
                f"got {type(runner).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.spec = ModelSpec.of(model)
        if runner is not None and decode != "auto":
            raise ValueError("decode applies to the built-in runner; pass it to your runner instead")
        self.runner = (
            runner
            if runner is not None
            else TransformersRunner(model, tokenizer, backend=backend, decode=decode)
        )

    def generate(
        self,
        prompts,
        *,
        n: int = 1,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop=None,
        seed: int | Sequence[int] | None = None,
        progress: bool = False,
    ) -> Rollout:
        """Sample ``n`` responses per prompt.

        Args:
            prompts: a list of strings, token-id lists (used as given) or chat-message lists.
            n: samples per prompt (rows prompt-major; they share one prefill).
            max_new_tokens: response budget per row (capped by the model's context).
            min_new_tokens: eos and stop tokens are suppressed before this many tokens.
            temperature: 0 is greedy (log-probs then at temperature 1).
            top_k, top_p: truncation, top-k then top-p as HF orders them (0 / 1: off).
            stop: a stop string, a stop token id, or a list of them; each row stops on its own (the
                token that completes the stop is kept, with finish reason "stop").
            seed: an int, one int >= 0 per prompt, or None (drawn from torch's global generator).
                Row j of prompt i samples from a stream keyed by (prompt i's seed, j, step) only, so
                with per-prompt seeds a prompt's samples do not depend on the other prompts of the
                call (or the batch size): splitting a call into several with the same per-prompt
                seeds gives the same rows. An int derives the per-prompt seeds from (seed, prompt
                index). Seeded runs repeat exactly (on the same device and backend).
            progress: show a tqdm bar over the decode steps.

        Returns:
            a :class:`Rollout` (docs/formulas.md "Rollout log-probs" for what ``logprobs`` and
            ``logit_floor`` hold).
        """
        strings, stop_ids = split_stop(stop)
        params = SamplingParams(
            max_new_tokens=max_new_tokens, n=n, min_new_tokens=min_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, stop_strings=strings, stop_token_ids=stop_ids, seed=seed,
        )  # fmt: skip
        progress = _checks.flag(progress, "progress")
        if strings and self.tokenizer is None:
            raise TypeError(
                "stop holds strings: RolloutEngine needs a tokenizer to detect them (tokenizer=None)"
            )
        prompt_ids = encode_prompts(
            prompts, self.tokenizer, vocab_size=self.spec.vocab_size, context=self.spec.context
        )
        if isinstance(params.seed, tuple) and len(params.seed) != len(prompt_ids):
            raise ValueError(
                f"seed must have one entry per prompt ({len(prompt_ids)}), got {len(params.seed)}"
            )
        rollout = self.runner.generate(prompt_ids, params, progress=progress)
        if rollout.texts is None and self.tokenizer is not None:
            rollout.texts = [
                self.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
                for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
            ]
        return rollout
