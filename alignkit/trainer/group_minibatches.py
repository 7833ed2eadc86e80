"""Token-budget minibatches that keep a prompt's samples together, for the shared-prompt forwards.

``ReplayBuffer.epoch(max_tokens=)`` bins rows by length alone, which scatters a group's n samples
over several minibatches, and each minibatch then forwards the prompt again. Here whole groups
go into a minibatch while its shared-layout cost fits the budget::

    cost = U * max_prompt + N * max_response      (U groups, N rows: the tensors the forwards see)

Groups are visited in a seeded random order (each epoch its own); a group that alone exceeds the
budget is split into row chunks that fit (each chunk still forwards its prompt once).
"""

from __future__ import annotations

import torch


def plan_group_minibatches(
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    max_tokens: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Row indices of each minibatch. ``prompt_lengths`` / ``response_lengths`` / ``group_ids``: (N,)
    per row; rows of a group share its prompt. Every row appears exactly once."""
    prompts, responses = prompt_lengths.tolist(), response_lengths.tolist()
    members: dict[int, list[int]] = {}
    for row, group in enumerate(group_ids.tolist()):
        members.setdefault(group, []).append(row)
    groups = list(members.values())
    order = torch.randperm(len(groups), generator=generator).tolist()
    bins: list[list[int]] = []
    current: list[int] = []
    state = (0, 0, 0, 0)  # groups, widest prompt, rows, widest response of the current minibatch

    def cost(groups_in: int, prompt: int, rows: int, response: int) -> int:
        return groups_in * prompt + rows * response

    for g in order:
        rows = groups[g]
        prompt = max(prompts[r] for r in rows)
        for chunk in _chunks(rows, prompt, responses, max_tokens):
            response = max(responses[r] for r in chunk)
            grown = (state[0] + 1, max(state[1], prompt), state[2] + len(chunk), max(state[3], response))
            if current and cost(*grown) > max_tokens:
                bins.append(current)
                current, grown = [], (1, prompt, len(chunk), response)
            current += chunk
            state = grown
    if current:
        bins.append(current)
    return bins


def _chunks(rows: list[int], prompt: int, responses: list[int], max_tokens: int) -> list[list[int]]:
    """The group's rows in pieces of cost <= max_tokens (one piece when the group fits)."""
    widest = max(responses[r] for r in rows)
    if prompt + widest > max_tokens:
        raise ValueError(
            f"minibatch_tokens ({max_tokens}) is smaller than one sample ({prompt + widest} tokens: "
            f"prompt {prompt} + response {widest}); raise minibatch_tokens"
        )
    per_chunk = max(1, (max_tokens - prompt) // max(widest, 1))
    return [rows[i : i + per_chunk] for i in range(0, len(rows), per_chunk)]
