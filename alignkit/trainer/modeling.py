"""How the trainer holds the policy: loading, LoRA adapters (PEFT), mixed precision and gradient
checkpointing, and where the KL reference comes from.

* LoRA (``lora_rank > 0``): PEFT injects the adapters into the model's own modules, so the trainer
  keeps computing on the original ``*ForCausalLM`` (its body and output head, as the fused
  log-prob ops need) while only the adapters train. The KL reference is then the same model with
  the adapters switched off: no second copy of the weights.
* Precision: ``"bf16"`` runs every forward (rollout, scoring, the update) under bfloat16 autocast
  with fp32 master weights; ``"auto"`` is bf16 on CUDA and fp32 on CPU.
* Gradient checkpointing: Hugging Face's, which acts only in train mode; the update runs the model in
  train mode with every dropout module switched off, so the loss is the eval-mode loss.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import RLConfig


def load_model(model: object) -> torch.nn.Module:
    if isinstance(model, (str, Path)):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a causal LM module or a path / hub id, got {type(model).__name__}")
    return model


def apply_lora(model: torch.nn.Module, config: RLConfig):
    """The PEFT model wrapping ``model`` with LoRA adapters (the base weights frozen). The adapters'
    random initialisation draws from ``config.seed`` (in a forked generator: the caller's random
    state is left as it was), so a seeded run starts from the same adapters every time."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError("lora_rank > 0 needs PEFT: pip install 'alignkit[lora]'") from exc
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    device = next(model.parameters()).device
    with (
        warnings.catch_warnings(),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        # PEFT reads transformers' deprecated is_gradient_checkpointing (a FutureWarning from
        # transformers >= 5 about PEFT's code, not ours or the user's).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(config.seed)
        return peft.get_peft_model(model, lora)


def autocast_dtype(config: RLConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 when the forwards run under autocast, else None (fp32)."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def train_mode_without_dropout(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Train mode (so gradient checkpointing engages) with every dropout module in eval mode."""
    if not enabled:
        yield
        return
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.eval()
    try:
        yield
    finally:
        model.eval()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"gradient_checkpointing=True needs a Hugging Face model, got {type(model).__name__}"
        )
