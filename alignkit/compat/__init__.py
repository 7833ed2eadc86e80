"""Drop-in replacements for the functions verl and TRL users call, backed by alignkit ops.

* :mod:`alignkit.compat.verl`: verl's advantage estimators, policy / value losses, ``agg_loss``,
  ``kl_penalty`` and ``torch_functional`` helpers, with verl's names, signatures, return structures
  and metric keys.
* :mod:`alignkit.compat.trl`: TRL's ``selective_log_softmax`` / ``entropy_from_logits`` and a
  GRPOTrainer that scores completions from hidden states (no [B x T x V] logits).

Either change an import line, or call ``alignkit.compat.verl.patch()`` /
``alignkit.compat.trl.patch()`` once before building the trainer; the returned handle's
``restore()`` undoes the patch. Neither module imports its peer until ``patch()`` is called; the
peers are never dependencies of alignkit. README, "Migrating from verl / TRL".
"""

from __future__ import annotations

from . import trl, verl
from .patching import PatchHandle, PatchWarning

__all__ = ["PatchHandle", "PatchWarning", "trl", "verl"]
