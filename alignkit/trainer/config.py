"""The trainer's configuration: :class:`RLConfig`, one comment per field, validated at construction
(errors name the field), loadable from a YAML/JSON mapping with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import _checks
from ..config_overrides import parse_overrides
from ..ops.loss_config import AGG_MODES, LOSS_TYPES

# Advantage estimators that need a group of samples per prompt (num_generations >= 2).
GROUP_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce++-baseline")
# Algorithms whose advantages come from per-token rewards (where an in-reward KL can go).
TOKEN_ALGORITHMS = ("reinforce++", "ppo")
# Algorithms that learn a value function (a value head on the policy body, or a critic model).
VALUE_ALGORITHMS = ("ppo",)
ALGORITHMS = GROUP_ALGORITHMS + TOKEN_ALGORITHMS
LR_SCHEDULES = ("constant", "linear", "cosine")

# Per-algorithm defaults that differ from the field defaults (applied where the user left None).
_ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"agg": "token-mean"},
    "dr_grpo": {"agg": "seq-mean-token-sum-norm"},  # divided by max_new_tokens, no std scaling
    "dapo": {"agg": "token-mean", "clip_high": 0.28},  # clip-higher, token-level loss
    "rloo": {"agg": "token-mean"},
    "reinforce++": {"agg": "token-mean"},
    "reinforce++-baseline": {"agg": "token-mean"},
    "ppo": {"agg": "token-mean"},
}


@dataclass
class RLConfig:
    """Everything one RL fine-tuning run needs besides the model, the prompts and the reward."""

    # --- algorithm
    algorithm: str = "grpo"  # grpo, dr_grpo, dapo, rloo, reinforce++, reinforce++-baseline, ppo
    loss_type: str = "ppo_clip"  # ppo_clip (asymmetric + dual clip), gspo (sequence ratio), cispo
    agg: str | None = None  # loss aggregation (alignkit.agg_loss); None: the algorithm's default
    clip_low: float = 0.2  # ratio >= 1 - clip_low
    clip_high: float | None = None  # ratio <= 1 + clip_high; None: 0.2 (0.28 for dapo)
    dual_clip: float | None = 3.0  # dual-clip bound for negative advantages (> 1); None disables
    gamma: float = 1.0  # discount of the per-token returns (reinforce++, ppo)
    gae_lambda: float = 0.95  # ppo: GAE lambda
    vf_coef: float = 0.5  # ppo: weight of the value loss (added to the policy loss)
    value_clip: float = 0.2  # ppo: values move at most this far from the rollout's (clipped value loss)
    critic_learning_rate: float | None = (
        None  # ppo: learning rate of the value head / critic; None: learning_rate
    )
    group_eps: float = 1e-6  # added to the group std (grpo, dapo)
    dapo_max_refills: int = 4  # dapo: extra rollouts to replace groups whose rewards are all equal
    rollout_correction: str | None = None  # importance weights old/rollout: None, "tis" or "mis"
    rollout_correction_level: str = "token"  # "token" or "sequence" ratios
    rollout_correction_threshold: float = 2.0  # TIS truncates ratios at it, MIS masks ratios above it
    # --- KL and entropy
    kl_coef: float = 0.0  # weight of the KL to the reference; 0 loads no reference model
    kl_in_reward: bool = False  # k1 per token in the reward (reinforce++); else k3 in the loss
    entropy_coef: float = 0.0  # weight of the entropy bonus in the loss
    # --- sampling
    iterations: int = 100  # rollout + update rounds
    prompts_per_iteration: int = 8  # distinct prompts per iteration
    num_generations: int = 8  # samples per prompt (the group size)
    max_new_tokens: int = 64  # response budget
    temperature: float = 1.0  # sampling temperature (> 0 for training)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: list[str] | None = None  # stop strings (kept in the response)
    max_turns: int = 4  # env= rollouts: model turns per episode
    max_total_tokens: int = 512  # env= rollouts: prompt + every turn of an episode
    # --- optimisation
    learning_rate: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    lr_schedule: str = "constant"  # after warm-up: constant, linear (to 0) or cosine (to 0)
    warmup_iterations: int = 0  # linear learning-rate warm-up
    ppo_epochs: int = 1  # optimizer steps per iteration (each a pass over the iteration's samples)
    minibatch_tokens: int = 8192  # token budget of one forward/backward (gradients accumulate)
    share_prompts: bool = True  # forward each distinct prompt once per minibatch (its samples attend
    # to its cached states; same values, fewer FLOPs; also with gradient checkpointing); whole rows
    # for sliding-window models
    max_grad_norm: float | None = 1.0  # gradient clipping; None disables
    # --- model
    precision: str = "auto"  # "fp32", "bf16" (autocast, fp32 weights) or "auto": bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward (Hugging Face's)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (PEFT) instead of the full model
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = lora_alpha / lora_rank)
    lora_target_modules: str | list[str] = "all-linear"  # PEFT target_modules
    # --- bookkeeping
    seed: int = 0  # seeds prompt order, sampling and minibatch order
    output_dir: str | None = None  # where metrics.jsonl and checkpoints go; None: nowhere
    save_every: int = 0  # checkpoint every this many iterations (0: only at the end)
    keep_checkpoints: int = 2  # checkpoints kept (oldest removed first)
    progress: bool = True  # a progress bar with live reward / KL
    tensorboard: bool | None = None  # TensorBoard event files in output_dir; None: when installed
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, stored with checkpoints

    def __post_init__(self) -> None:
        self.algorithm = _checks.choice(self.algorithm, "algorithm", ALGORITHMS)
        self.loss_type = _checks.choice(self.loss_type, "loss_type", LOSS_TYPES)
        defaults = _ALGORITHM_DEFAULTS[self.algorithm]
        self.agg = _checks.choice(self.agg if self.agg is not None else defaults["agg"], "agg", AGG_MODES)
        self.clip_low = _checks.non_negative(self.clip_low, "clip_low")
        clip_high = self.clip_high if self.clip_high is not None else defaults.get("clip_high", 0.2)
        self.clip_high = _checks.non_negative(clip_high, "clip_high")
        if self.dual_clip is not None and not _checks.finite(self.dual_clip, "dual_clip") > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip}")
        self.gamma = _checks.unit_interval(self.gamma, "gamma")
        self.gae_lambda = _checks.unit_interval(self.gae_lambda, "gae_lambda")
        self.vf_coef = _checks.non_negative(self.vf_coef, "vf_coef")
        self.value_clip = _checks.non_negative(self.value_clip, "value_clip")
        if self.critic_learning_rate is not None:
            self.critic_learning_rate = _checks.positive(self.critic_learning_rate, "critic_learning_rate")
        self.group_eps = _checks.eps(self.group_eps, "group_eps")
        self.dapo_max_refills = _checks.non_negative_int(self.dapo_max_refills, "dapo_max_refills")
        if self.rollout_correction is not None:
            self.rollout_correction = _checks.choice(
                self.rollout_correction, "rollout_correction", ("tis", "mis")
            )
        self.rollout_correction_level = _checks.choice(
            self.rollout_correction_level, "rollout_correction_level", ("token", "sequence")
        )
        self.rollout_correction_threshold = _checks.positive(
            self.rollout_correction_threshold, "rollout_correction_threshold"
        )
        self.kl_coef = _checks.non_negative(self.kl_coef, "kl_coef")
        self.kl_in_reward = _checks.flag(self.kl_in_reward, "kl_in_reward")
        if self.kl_in_reward and self.algorithm not in TOKEN_ALGORITHMS:
            raise ValueError(
                "kl_in_reward=True puts a per-token KL into the rewards, which only "
                f"{', '.join(TOKEN_ALGORITHMS)} use; algorithm={self.algorithm!r} takes the KL in the loss "
                "(kl_in_reward=False)"
            )
        self.entropy_coef = _checks.finite(self.entropy_coef, "entropy_coef")
        for name in (
            "iterations", "prompts_per_iteration", "num_generations", "max_new_tokens", "max_turns",
            "max_total_tokens",
        ):  # fmt: skip
            setattr(self, name, _checks.positive_int(getattr(self, name), name))
        if self.algorithm in GROUP_ALGORITHMS and self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 for algorithm={self.algorithm!r}, whose advantages compare "
                f"the samples of one prompt; got {self.num_generations}"
            )
        self.temperature = _checks.positive(self.temperature, "temperature")
        self.top_k = _checks.non_negative_int(self.top_k, "top_k")
        if not 0.0 < _checks.finite(self.top_p, "top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stop is not None:
            if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
                raise TypeError(f"stop must be None or a list of non-empty strings, got {self.stop!r}")
            self.stop = list(self.stop)
        self.learning_rate = _checks.positive(self.learning_rate, "learning_rate")
        self.weight_decay = _checks.non_negative(self.weight_decay, "weight_decay")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0.0 <= _checks.finite(b, "adam_betas") < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        self.lr_schedule = _checks.choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        self.warmup_iterations = _checks.non_negative_int(self.warmup_iterations, "warmup_iterations")
        self.precision = _checks.choice(self.precision, "precision", ("auto", "fp32", "bf16"))
        self.gradient_checkpointing = _checks.flag(self.gradient_checkpointing, "gradient_checkpointing")
        self.share_prompts = _checks.flag(self.share_prompts, "share_prompts")
        self.lora_rank = _checks.non_negative_int(self.lora_rank, "lora_rank")
        self.lora_alpha = _checks.positive(self.lora_alpha, "lora_alpha")
        targets = self.lora_target_modules
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise TypeError(
                f"lora_target_modules must be a module name pattern or a list of names, got {targets!r}"
            )
        self.lora_target_modules = targets if isinstance(targets, str) else list(targets)
        self.ppo_epochs = _checks.positive_int(self.ppo_epochs, "ppo_epochs")
        self.minibatch_tokens = _checks.positive_int(self.minibatch_tokens, "minibatch_tokens")
        if self.max_grad_norm is not None:
            self.max_grad_norm = _checks.positive(self.max_grad_norm, "max_grad_norm")
        self.seed = _checks.non_negative_int(self.seed, "seed")
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            self.output_dir = str(self.output_dir)
        self.save_every = _checks.non_negative_int(self.save_every, "save_every")
        self.keep_checkpoints = _checks.positive_int(self.keep_checkpoints, "keep_checkpoints")
        self.progress = _checks.flag(self.progress, "progress")
        if self.tensorboard is not None:
            self.tensorboard = _checks.flag(self.tensorboard, "tensorboard")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")

    @property
    def rows_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RLConfig:
        """A config from a mapping (a parsed YAML/JSON file) and ``key=value`` overrides, each value
        parsed as JSON when it parses (``lr=1e-4``, ``stop=["\\n"]``), else taken as a string.
        Unknown keys raise ValueError naming them."""
        if not isinstance(values, dict):
            raise TypeError(
                f"a config must be a mapping of field names to values, got {type(values).__name__}"
            )
        merged = {**values, **parse_overrides(overrides)}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**merged)
