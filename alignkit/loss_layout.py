"""Numbers shared by the loss kernels (kernels/ppo_loss.py), their CPU twins
(alignkit/cpu/losses.py) and the wrappers (alignkit/ops/losses.py): declared here once.

The fused loss passes reduce every row of a (B, T) batch to a few statistics, one column each of a
(B, POLICY_STATS) / (B, VALUE_STATS) table, from which every aggregation mode and metric follows.
"""

from __future__ import annotations

# Columns of the policy-loss statistics, per row.
POLICY_COUNT = 0  # tokens with mask != 0
POLICY_LOSS = 1  # sum of the per-token policy loss (IS-weighted)
POLICY_ENTROPY = 2  # sum of the entropy
POLICY_KL = 3  # sum of the KL estimate
POLICY_CLIP = 4  # tokens where the clip is active (L2 > L1; CISPO: ratio outside the clip range)
POLICY_CLIP_LOWER = 5  # tokens where the dual clip is active (A < 0 and Lc > L3)
POLICY_NEG_LOGRATIO = 6  # sum of -clamp(logp - old_logp, -20, 20)
POLICY_BAD_MASK = 7  # mask values other than 0 and 1 (validated during the pass)
POLICY_STATS = 8

# Columns of the value-loss statistics, per row.
VALUE_COUNT = 0
VALUE_LOSS = 1  # sum of max((v - R)^2, (vclip - R)^2)
VALUE_CLIP = 2  # tokens where (vclip - R)^2 > (v - R)^2
VALUE_BAD_MASK = 3
VALUE_STATS = 4

# Policy-loss types (alignkit.ops.loss_config.LOSS_TYPES) -> the integer code the kernels branch on.
LOSS_CODES = {"ppo_clip": 0, "gspo": 1, "cispo": 2}

# KL estimators: canonical name -> the integer code the kernels branch on.
KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
# Accepted names (verl's aliases included) -> canonical name.
KL_ESTIMATORS = {
    "k1": "k1",
    "kl": "k1",
    "abs": "abs",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}
