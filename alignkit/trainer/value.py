"""State values for PPO: a value head on the policy's own body (the default), or a separate critic.

Alignment: the value of the state before response token ``t`` is read from the hidden state that
predicts token ``t``, the same state whose log-prob the policy loss uses (TRL's and verl's
``values[:, context - 1 : -1]``), so per-token values, log-probs and advantages share one layout.

A critic may be

* a Hugging Face ``*ForSequenceClassification`` with one label (TRL's value model: its body and its
  ``score`` head applied at every position), or a ``*ForTokenClassification`` with one label;
* any module called as ``critic(input_ids=, attention_mask=, position_ids=)`` that returns (B, L)
  or (B, L, 1) values, or an output whose ``logits`` are those.
"""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """``V(s) = w . h(s) + b`` on the policy body's last hidden state, zero-initialised (so the
    first advantages are the plain reward-to-go)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, k, H) -> (B, k) float32
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


def hidden_size_of(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(size, int):
        raise ValueError(
            f"cannot size a value head for {type(model).__name__}: its config has no hidden_size; "
            "pass critic= (a value model) instead"
        )
    return size


def check_critic(critic: object) -> torch.nn.Module:
    if not isinstance(critic, torch.nn.Module):
        raise TypeError(f"critic must be a torch.nn.Module (a value model), got {type(critic).__name__}")
    labels = getattr(getattr(critic, "config", None), "num_labels", 1)
    if labels != 1:
        raise ValueError(f"critic must output one value per token (num_labels=1), got num_labels={labels}")
    return critic


def critic_values(
    critic: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """(B, keep) float32 values of the states that predict the last ``keep`` tokens of each row."""
    head = getattr(critic, "score", None)
    body = getattr(critic, "base_model", None)
    if isinstance(head, torch.nn.Module) and body is not None and body is not critic:
        out = body(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        values = head(hidden[:, -keep - 1 : -1])
    else:
        out = critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        values = getattr(out, "logits", out)
        if not isinstance(values, torch.Tensor):
            raise TypeError(
                "critic must return a tensor of values (or an output with logits), got "
                f"{type(values).__name__}"
            )
        values = values[:, -keep - 1 : -1]
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    if values.shape != (input_ids.shape[0], keep):
        raise ValueError(
            f"critic values must have one value per token, shape {(input_ids.shape[0], keep)} after "
            f"alignment, got {tuple(values.shape)}"
        )
    return values.float()
