"""alignkit: fast, memory-lean building blocks for RL fine-tuning of causal language models.

Importing alignkit loads its compiled extension (alignkit._C) and fails with one clear error,
saying how to rebuild, when that build is missing or stale.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext

_ext.load()

from .backend import BACKENDS  # noqa: E402

# Public ops and classes (one import line per module).
from .ops.advantages import discounted_returns, discounted_returns_packed, gae, gae_packed  # noqa: E402
from .ops.fused_ppo import fused_linear_ppo_loss  # noqa: E402
from .ops.group_advantages import group_advantages  # noqa: E402
from .ops.logprobs import causal_lm_logprobs, fused_linear_logprobs, token_logprobs  # noqa: E402
from .ops.loss_config import PolicyLossConfig  # noqa: E402
from .ops.losses import agg_loss, kl_penalty, ppo_policy_loss, value_loss  # noqa: E402
from .ops.rollout_correction import rollout_correction_weights  # noqa: E402
from .ops.whiten import masked_mean, masked_var, masked_whiten  # noqa: E402
from .replay_buffer import Batch, ReplayBuffer, SequenceField, TokenField, token_budget_minibatches  # noqa: E402
from .rollout import Rollout, RolloutEngine  # noqa: E402
from .trainer import RLConfig, Trainer  # noqa: E402

__all__ = [
    "BACKENDS",
    "Batch",
    "PolicyLossConfig",
    "RLConfig",
    "ReplayBuffer",
    "Rollout",
    "RolloutEngine",
    "SequenceField",
    "TokenField",
    "Trainer",
    "__version__",
    "agg_loss",
    "causal_lm_logprobs",
    "discounted_returns",
    "discounted_returns_packed",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "gae_packed",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "rollout_correction_weights",
    "token_budget_minibatches",
    "token_logprobs",
    "value_loss",
]
