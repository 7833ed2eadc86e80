"""RL fine-tuning of Hugging Face causal LMs on alignkit's ops: :class:`RLConfig` and
:class:`Trainer` (see alignkit/trainer/trainer.py for one iteration, phase by phase)."""

from __future__ import annotations

from .advantages import ESTIMATORS, register_advantage
from .config import ALGORITHMS, RLConfig
from .rewards import RewardError, RewardFunction
from .trainer import Trainer

__all__ = [
    "ALGORITHMS",
    "ESTIMATORS",
    "RLConfig",
    "RewardError",
    "RewardFunction",
    "Trainer",
    "register_advantage",
]
