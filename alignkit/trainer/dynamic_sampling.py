"""DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476): a group whose rewards are all equal
has zero advantage everywhere and only dilutes the batch, so it is dropped and replaced by the
groups of fresh prompts, up to ``dapo_max_refills`` extra rollouts per iteration.

Under torchrun the choice is global: every rank samples its share of each (re)fill, the ranks'
informative flags are gathered, the groups are taken in the order one process would take them
(fill by fill, prompt slot by prompt slot), and the kept groups are dealt out evenly to the ranks,
so the trained batch does not depend on the number of processes. When fewer informative groups
than ranks are found, each rank trains on its first batch instead (as with none at all)."""

from __future__ import annotations

from typing import Any

import torch

from ..rollout import Rollout
from . import distributed


def informative_groups(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the groups (n consecutive rows each) whose scores are not all equal."""
    grouped = scores.reshape(-1, n)
    return torch.nonzero(grouped.amax(-1) > grouped.amin(-1)).reshape(-1).tolist()


def _pad(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    fill = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([fill, t] if left else [t, fill], dim=1)


def concat_groups(parts: list[tuple[Rollout, list[int]]], n: int, pad_id: int) -> Rollout:
    """The chosen groups of several rollouts as one rollout (prompts left-padded, responses
    right-padded to the widest; group ids renumbered 0..G-1)."""
    rows = [(r, [g * n + j for g in groups for j in range(n)]) for r, groups in parts if groups]
    P = max(r.prompt_ids.shape[1] for r, _ in rows)
    T = max(r.response_ids.shape[1] for r, _ in rows)
    floors = any(r.logit_floor is not None for r, _ in rows)

    def gather(name: str, width: int, value: float, left: bool) -> torch.Tensor:
        return torch.cat([_pad(getattr(r, name)[idx], width, value, left) for r, idx in rows])

    def floor_of(r: Rollout, idx: list[int]) -> torch.Tensor:
        f = r.logit_floor if r.logit_floor is not None else torch.full(r.logprobs.shape, float("-inf"))
        return _pad(f[idx], T, float("-inf"), left=False)

    total_groups = sum(len(idx) for _, idx in rows) // n
    texts = None
    if all(r.texts is not None for r, _ in rows):
        texts = [r.texts[i] for r, idx in rows for i in idx]
    return Rollout(
        prompt_ids=gather("prompt_ids", P, pad_id, left=True),
        prompt_mask=gather("prompt_mask", P, 0, left=True),
        response_ids=gather("response_ids", T, pad_id, left=False),
        response_mask=gather("response_mask", T, 0, left=False),
        logprobs=gather("logprobs", T, 0.0, left=False),
        logit_floor=torch.cat([floor_of(r, idx) for r, idx in rows]) if floors else None,
        finish_reason=[r.finish_reason[i] for r, idx in rows for i in idx],
        group_ids=torch.arange(total_groups).repeat_interleave(n),
        texts=texts,
    )


def refill_groups(trainer, iteration: int, prompts, rollout: Rollout, scores: torch.Tensor, per_fn):
    """Keep the informative groups of the first rollout and top them up from fresh prompts."""
    if distributed.enabled():
        return _refill_groups_global(trainer, iteration, prompts, rollout, scores, per_fn)
    cfg = trainer.config
    n, want = cfg.num_generations, len(prompts)
    kept_prompts: list[dict[str, Any]] = []
    parts: list[tuple[Rollout, list[int]]] = []
    kept_scores: list[torch.Tensor] = []
    refills = 0
    current_prompts, current, current_scores = prompts, rollout, scores
    while True:
        groups = informative_groups(current_scores, n)[: want - len(kept_prompts)]
        parts.append((current, groups))
        kept_prompts += [current_prompts[g] for g in groups]
        kept_scores += [current_scores[g * n : (g + 1) * n] for g in groups]
        if len(kept_prompts) >= want or refills >= cfg.dapo_max_refills:
            break
        refills += 1
        current_prompts = trainer.select_prompts(iteration, stream=refills)
        current = trainer.rollout(current_prompts, iteration, stream=refills)
        current_scores, _ = trainer.rewards(current_prompts, current)
    extra = {"dapo/kept_groups": len(kept_prompts), "dapo/refills": refills}
    if not kept_prompts:  # nothing informative: train on the first batch (its advantages are all 0)
        return prompts, rollout, scores, per_fn, extra
    merged = concat_groups(parts, n, pad_id=_pad_id(rollout))
    return kept_prompts, merged, torch.cat(kept_scores), per_fn, extra


def _pad_id(rollout: Rollout) -> int:
    return next((int(i) for i in (rollout.prompt_ids[~rollout.prompt_mask.bool()]).tolist()[:1]), 0)


def _group(rollout: Rollout, prompts, scores: torch.Tensor, g: int, n: int) -> dict[str, Any]:
    """Group ``g`` (rows g*n ... g*n + n - 1) as CPU tensors and lists: what the ranks exchange."""
    rows = slice(g * n, (g + 1) * n)
    cpu = {name: getattr(rollout, name)[rows].cpu() for name in
           ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs")}  # fmt: skip
    cpu["logit_floor"] = None if rollout.logit_floor is None else rollout.logit_floor[rows].cpu()
    return {
        **cpu, "finish_reason": rollout.finish_reason[rows],
        "texts": None if rollout.texts is None else rollout.texts[rows], "prompt": prompts[g],
        "scores": scores[rows].cpu(),
    }  # fmt: skip


def _refill_groups_global(trainer, iteration: int, prompts, rollout: Rollout, scores: torch.Tensor, per_fn):
    """:func:`refill_groups` over every rank's groups (module docstring)."""
    cfg = trainer.config
    n, per_rank, world, rank = cfg.num_generations, len(prompts), trainer.world_size, trainer.rank
    want = per_rank * world
    chosen: list[tuple[int, int, dict[str, Any]]] = []  # (fill, global slot, group) held by this rank
    kept = refills = 0
    current_prompts, current, current_scores = prompts, rollout, scores
    while True:
        flags = torch.zeros(per_rank, dtype=torch.int64, device=current_scores.device)
        flags[informative_groups(current_scores, n)] = 1
        slots = torch.nonzero(distributed.all_gather_rows(flags)).reshape(-1).tolist()[: want - kept]
        for slot in slots:
            if slot // per_rank == rank:
                group = _group(current, current_prompts, current_scores, slot % per_rank, n)
                chosen.append((refills, slot, group))
        kept += len(slots)
        if kept >= want or refills >= cfg.dapo_max_refills:
            break
        refills += 1
        current_prompts = trainer.select_prompts(iteration, stream=refills)
        current = trainer.rollout(current_prompts, iteration, stream=refills)
        current_scores, _ = trainer.rewards(current_prompts, current)
    extra = {"dapo/kept_groups": kept, "dapo/refills": refills}
    if kept < world:  # not one group per rank: every rank trains on its first batch
        return prompts, rollout, scores, per_fn, extra
    gathered = [c for part in distributed.all_gather_objects(chosen) for c in part]
    everything = sorted(gathered, key=lambda c: c[:2])  # one process's order: fill, then slot
    share = [group for _, _, group in everything[rank * kept // world : (rank + 1) * kept // world]]
    device = rollout.prompt_ids.device
    parts = []
    for group in share:
        tensors = {k: v.to(device) for k, v in group.items() if isinstance(v, torch.Tensor) and k != "scores"}
        tensors.setdefault("logit_floor", None)
        part = Rollout(
            **tensors, finish_reason=group["finish_reason"], texts=group["texts"],
            group_ids=torch.zeros(n, dtype=torch.int64, device=device),
        )  # fmt: skip
        parts.append((part, [0]))
    merged = concat_groups(parts, n, pad_id=_pad_id(rollout))
    kept_scores = torch.cat([group["scores"] for group in share]).to(scores.device)
    return [group["prompt"] for group in share], merged, kept_scores, per_fn, extra
