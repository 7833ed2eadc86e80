"""The trainer's forwards over (prompt + response) rows, scored in the response layout.

Rows hold each sample's prompt and response as one contiguous run of tokens (the rollout's
left-padded layout, or the replay buffer's right-padded one). :func:`score_responses` returns the
log-probs (entropy, hidden states) of the response tokens only, (N, T) aligned like
:class:`~alignkit.ops.shared_prompts.SharedPromptBatch`'s responses, and a :class:`ResponseLayout`
that gathers the rows' per-token fields into the same layout.

With ``share_prompts`` and rows that repeat a prompt (n samples per prompt), each distinct prompt
runs once (:func:`~alignkit.ops.shared_prompts.shared_prompt_logprobs`); otherwise the whole rows
run (:func:`~alignkit.ops.logprobs.causal_lm_logprobs`), the lm_head applied from the first
response column on. Both give the same values (tests/test_trainer_shared_prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.logprobs import causal_lm_logprobs
from ..ops.shared_prompts import shared_prompt_logprobs, split_shared_prompts


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
    split = split_shared_prompts(input_ids, attention_mask, start)
    layout = ResponseLayout(split.response_columns, split.response_mask)
    floor = None if logit_floor is None else layout.gather(logit_floor, float("-inf"))
    if share_prompts and split.prompt_ids.shape[0] < input_ids.shape[0]:
        out = shared_prompt_logprobs(
            model, split.prompt_ids, split.prompt_mask, split.response_ids, split.response_mask,
            split.prompt_index, temperature=temperature, return_entropy=return_entropy,
            logit_floor=floor, return_hidden=return_hidden,
        )  # fmt: skip
        return layout, out if isinstance(out, tuple) else (out,)
    # Whole rows; the lm_head runs on the last `keep` columns, which hold every response token.
    width = input_ids.shape[1]
    keep = min(max(int(width - start.min()), 1), width - 1) if start.numel() else 1
    first = width - keep  # the first kept (scored) column
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = causal_lm_logprobs(
        model, input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=keep,
        temperature=temperature, return_entropy=return_entropy, return_hidden=return_hidden,
        logit_floor=None if logit_floor is None else logit_floor[:, first:], chunk_size=None,
    )  # fmt: skip
    out = out if isinstance(out, tuple) else (out,)
    index = (layout.columns - first).clamp_min(0)  # (N, T): kept column of each response token
    gathered = []
    for tensor in out:
        if tensor.dim() == 3:
            gathered.append(tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1])))
        else:
            gathered.append(tensor.gather(1, index).masked_fill(~layout.mask, 0.0))
    return layout, tuple(gathered)
