"""The trainer's forwards over (prompt + response) rows, scored in the response layout.

Rows hold each sample's prompt and response as one contiguous run of tokens (the rollout's
left-padded layout, or the replay buffer's right-padded one). :func:`score_responses` returns the
log-probs (entropy, hidden states) of the response tokens only, (N, T) aligned like
:class:`~alignkit.ops.shared_prompts.SharedPromptBatch`'s responses, and a :class:`ResponseLayout`
that gathers the rows' per-token fields into the same layout.

With ``share_prompts`` and rows that repeat a prompt (n samples per prompt), each distinct prompt
runs once (:func:`~alignkit.ops.shared_prompts.shared_prompt_hidden`); otherwise the whole rows
run through the model's body. Either way the lm_head is applied to the response positions only
(:func:`~alignkit.ops.logprobs.fused_linear_logprobs` here, or the caller's fused loss on
:func:`response_hidden`'s states). Both give the same values (tests/test_trainer_shared_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.logprobs import body_hidden_states, fused_linear_logprobs, output_head
from ..ops.shared_prompts import shared_prompt_hidden, split_shared_prompts


@dataclass(frozen=True)
class ResponseLayout:
    """Where the response tokens of the rows are: ``columns`` (N, T) their column in the rows,
    ``mask`` (N, T) bool, True on real response tokens (padding beyond a row's end is False)."""

    columns: torch.Tensor
    mask: torch.Tensor

    def gather(self, field: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A per-token field of the rows, (N, L) (the value of the token at each column), in the
        response layout (N, T); ``fill`` where the mask is False."""
        return field.gather(1, self.columns).masked_fill(~self.mask, fill)


def response_start(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) the column of each row's first trained token (its end, for a row with none)."""
    trained = loss_mask.bool()
    end = attention_mask.to(torch.int8).argmax(-1) + attention_mask.bool().sum(-1)
    return torch.where(trained.any(-1), trained.to(torch.int8).argmax(-1), end)


def response_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: torch.Tensor,
    *,
    share_prompts: bool,
) -> tuple[ResponseLayout, torch.Tensor, torch.Tensor]:
    """(layout, response ids (N, T), hidden (N, T, H)): the last hidden states that predict each
    response token of rows ``input_ids`` / ``attention_mask`` (N, L) whose responses begin at
    columns ``start`` (N,); shared prompts when asked and some prompt repeats, else whole rows."""
    split = split_shared_prompts(input_ids, attention_mask, start)
    layout = ResponseLayout(split.response_columns, split.response_mask)
    if share_prompts and split.prompt_ids.shape[0] < input_ids.shape[0]:
        hidden = shared_prompt_hidden(
            model, split.prompt_ids, split.prompt_mask, split.response_ids, split.response_mask,
            split.prompt_index,
        )  # fmt: skip
        return layout, split.response_ids, hidden
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    states = body_hidden_states(model, input_ids, attention_mask, position_ids=positions)  # (N, L, H)
    # Column c - 1 predicts the token at column c.
    index = (layout.columns - 1).clamp_min(0)[..., None].expand(-1, -1, states.shape[-1])
    return layout, split.response_ids, states.gather(1, index)


def score_responses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: torch.Tensor,
    *,
    share_prompts: bool,
    temperature: float,
    logit_floor: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_hidden: bool = False,
) -> tuple[ResponseLayout, tuple[torch.Tensor, ...]]:
    """(layout, outputs) for rows ``input_ids`` / ``attention_mask`` (N, L) whose responses begin at
    columns ``start`` (N,). ``logit_floor``: a per-token field of the rows (N, L) or None.

    outputs: ``(logp, [entropy,] [hidden])``, each (N, T[, H]), 0 (hidden: anything) off the mask."""
    layout, response_ids, hidden = response_hidden(
        model, input_ids, attention_mask, start, share_prompts=share_prompts
    )
    weight, bias = output_head(model)
    labels = response_ids.masked_fill(~layout.mask, -100)
    floor = None if logit_floor is None else layout.gather(logit_floor, float("-inf"))
    out = fused_linear_logprobs(
        hidden.to(weight.dtype), weight, labels, bias=bias, temperature=temperature,
        return_entropy=return_entropy, logit_floor=floor,
    )  # fmt: skip
    out = out if isinstance(out, tuple) else (out,)
    return layout, (*out, hidden) if return_hidden else out
