"""alignkit: fast, memory-lean building blocks for RL fine-tuning of causal language models.

Importing alignkit does not need its compiled extension (alignkit._C): the ops and Triton kernels
run without it. The replay buffer (and ``token_budget_minibatches``) load it on first use and raise
one clear ImportError (``alignkit._ext.ExtensionError``), saying how to rebuild, when that build is
missing or stale; ``alignkit info`` reports its status.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._checks import VALIDATION_MODES, set_validation, validation_mode
from .backend import BACKENDS

# Public ops and classes (one import line per module).
from .ops.advantages import discounted_returns, discounted_returns_packed, gae, gae_packed
from .ops.fused_ppo import fused_linear_ppo_loss
from .ops.group_advantages import group_advantages
from .ops.logprobs import causal_lm_logprobs, fused_linear_logprobs, token_logprobs
from .ops.loss_config import PolicyLossConfig
from .ops.losses import agg_loss, kl_penalty, ppo_policy_loss, value_loss
from .ops.rollout_correction import rollout_correction_weights
from .ops.shared_prompts import (
    SharedPromptBatch,
    shared_prompt_hidden,
    shared_prompt_logprobs,
    split_shared_prompts,
)
from .ops.whiten import masked_mean, masked_var, masked_whiten
from .replay_buffer import Batch, ReplayBuffer, SequenceField, TokenField, token_budget_minibatches
from .rollout import Rollout, RolloutEngine
from .trainer import RLConfig, Trainer

# The Stable-Baselines3-style fronts need gymnasium: imported on first use, so `import alignkit`
# does not import it.
_LAZY = {"PPO": "alignkit.envs", "GRPO": "alignkit.envs"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "GRPO",
    "PPO",
    "VALIDATION_MODES",
    "Batch",
    "PolicyLossConfig",
    "RLConfig",
    "ReplayBuffer",
    "Rollout",
    "RolloutEngine",
    "SequenceField",
    "SharedPromptBatch",
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
    "set_validation",
    "shared_prompt_hidden",
    "shared_prompt_logprobs",
    "split_shared_prompts",
    "token_budget_minibatches",
    "token_logprobs",
    "validation_mode",
    "value_loss",
]
