"""Checkpoints: written atomically (a temporary folder renamed into place, so the last good one is
never touched by a failed write), the last ``keep`` kept, and read back for an exact resume.

Layout of ``<output_dir>/checkpoint-<iteration>/``::

    model/              the policy, from_pretrained-loadable (and its tokenizer); with LoRA, the
                        adapter (PEFT's adapter_config.json + adapter_model.safetensors)
    trainer_state.pt    optimizer, scheduler, RNG states (torch, numpy, python), counters, config
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(
    output_dir: str | os.PathLike, iteration: int, *, model, tokenizer, state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoint-<iteration>`` atomically and delete all but the newest ``keep``."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{iteration}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{iteration}-", dir=root))
    try:
        model.save_pretrained(tmp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save({**state, "rng": rng_state()}, tmp / STATE_FILE)
        if final.exists():  # a re-run of the same iteration: replace it only once the new one is whole
            old = root / f".replaced-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the weights saved by ``save_pretrained`` into ``model`` in place (tied weights re-tied;
    a PEFT model's adapter weights when the folder holds an adapter)."""
    from safetensors.torch import load_file

    if (folder / "adapter_config.json").is_file():
        import peft

        peft.set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    untied = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if untied or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match the model: missing {untied}, unexpected {unexpected}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def load(path: str | os.PathLike, *, model) -> dict[str, Any]:
    """Load a checkpoint folder's weights into ``model``; return its trainer state (RNG restored)."""
    folder = Path(path)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_FILE})")
    load_model_weights(model, folder / "model")
    state = torch.load(folder / STATE_FILE, weights_only=False)
    set_rng_state(state["rng"])
    return state
