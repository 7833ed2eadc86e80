"""Options of the policy loss, validated once: :class:`PolicyLossConfig`, shared by
:func:`alignkit.ppo_policy_loss`, :func:`alignkit.fused_linear_ppo_loss` and the trainer, plus the
validators of the names every loss uses (``agg``, ``agg_scale``, ``kl_estimator``).

Formulas: docs/formulas.md ("Clipped policy loss", "CISPO", "KL estimators", "Loss aggregation").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .. import _checks
from ..loss_layout import KL_CODES, KL_ESTIMATORS, LOSS_CODES

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Policy-loss variants (docs/formulas.md): the clipped PPO objective, its sequence-ratio form (GSPO,
# one ratio per sequence) and CISPO (the clipped ratio as a detached weight on -A logp).
LOSS_TYPES = ("ppo_clip", "gspo", "cispo")


def agg_mode(value: object, name: str = "agg") -> str:
    """One of :data:`AGG_MODES`."""
    return _checks.choice(value, name, AGG_MODES)


def agg_scale(value: object, agg: str, name: str = "agg_scale") -> float | None:
    """None, or a positive divisor for the modes that take one (token-mean: a global token count;
    seq-mean-token-sum-norm: the divisor, default T)."""
    if value is None:
        return None
    if agg not in ("token-mean", "seq-mean-token-sum-norm"):
        raise ValueError(
            f"{name} applies to token-mean (a global token count) and seq-mean-token-sum-norm (the "
            f"divisor), not to agg={agg!r}; got {value!r}"
        )
    return _checks.positive(value, name)


def kl_estimator(value: object, name: str = "kl_estimator") -> str:
    """The canonical estimator name (k1, abs, k2, k3) of any accepted name or verl alias."""
    return KL_ESTIMATORS[_checks.choice(value, name, tuple(KL_ESTIMATORS))]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the policy loss (docs/formulas.md, "Clipped policy loss", "CISPO"), validated at
    construction; errors name the field. Frozen: build a variant with ``dataclasses.replace``."""

    clip_low: float = 0.2  # lower clip range: ratio >= 1 - clip_low
    clip_high: float = 0.2  # upper clip range: ratio <= 1 + clip_high (DAPO's clip-higher: > clip_low)
    dual_clip: float | None = 3.0  # dual-clip bound (> 1) for negative advantages; None disables
    agg: str = "token-mean"  # aggregation mode, see alignkit.agg_loss
    agg_scale: float | None = None  # global token count (token-mean) or divisor (seq-mean-token-sum-norm)
    loss_type: str = "ppo_clip"  # "ppo_clip" (PPO), "gspo" (one ratio per sequence) or "cispo"
    kl_coef: float = 0.0  # weight of the KL penalty in the loss (needs ref_logp when != 0)
    kl_estimator: str = "k3"  # k1/kl, abs, k2/mse, k3/low_var_kl; stored canonical
    entropy_coef: float = 0.0  # weight of the entropy bonus (needs entropy when != 0)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are written once, here
        put(self, "clip_low", _checks.non_negative(self.clip_low, "clip_low"))
        put(self, "clip_high", _checks.non_negative(self.clip_high, "clip_high"))
        if self.dual_clip is not None:
            dual = _checks.finite(self.dual_clip, "dual_clip")
            if not dual > 1.0:
                raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual}")
            put(self, "dual_clip", dual)
        put(self, "agg", agg_mode(self.agg))
        put(self, "agg_scale", agg_scale(self.agg_scale, self.agg))
        put(self, "loss_type", _checks.choice(self.loss_type, "loss_type", LOSS_TYPES))
        put(self, "kl_coef", _checks.finite(self.kl_coef, "kl_coef"))
        put(self, "kl_estimator", kl_estimator(self.kl_estimator))
        put(self, "entropy_coef", _checks.finite(self.entropy_coef, "entropy_coef"))

    @property
    def kl_code(self) -> int:
        """The estimator's integer code for the kernels (alignkit.loss_layout.KL_CODES)."""
        return KL_CODES[self.kl_estimator]

    @property
    def sequence_ratio(self) -> bool:
        """GSPO: one ratio per sequence (the pass needs the row's mean log-ratio first)."""
        return self.loss_type == "gspo"

    @property
    def loss_code(self) -> int:
        """The loss type's integer code for the kernels (alignkit.loss_layout.LOSS_CODES)."""
        return LOSS_CODES[self.loss_type]

    @property
    def active_dual_clip(self) -> float | None:
        """The dual clip the pass applies: None for GSPO and CISPO, which have none."""
        return self.dual_clip if self.loss_type == "ppo_clip" else None

    def check_inputs(self, *, has_ref: bool, has_entropy: bool) -> None:
        """Raise when a term with a nonzero weight has no input to compute it from."""
        if self.kl_coef != 0.0 and not has_ref:
            raise ValueError(f"kl_coef={self.kl_coef} needs ref_logp, got None")
        if self.entropy_coef != 0.0 and not has_entropy:
            raise ValueError(f"entropy_coef={self.entropy_coef} needs entropy, got None")


UNSET: Any = object()  # default of the loss functions' option keywords: "take it from config"
FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


def resolve_config(config: object, options: dict[str, Any]) -> PolicyLossConfig:
    """``config`` (or the defaults) with the keyword options a caller set (those not :data:`UNSET`)."""
    if config is None:
        config = PolicyLossConfig()
    elif not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be an alignkit.PolicyLossConfig or None, got {type(config).__name__}")
    given = {k: v for k, v in options.items() if v is not UNSET}
    return dataclasses.replace(config, **given) if given else config
