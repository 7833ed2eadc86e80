"""The embedded demo (``alignkit demo``: alignkit/demo/run.py), its task (task.py), the small
from-scratch models it and the tests use (models.py) and its plot (plots.py). The YAML run configs
of ``alignkit train`` live in alignkit/trainer/run_file.py."""

from __future__ import annotations

from .models import char_tokenizer, load_pretrained, save_and_reload, tiny_llama
from .run import DemoConfig, DemoError, run_demo

__all__ = [
    "DemoConfig",
    "DemoError",
    "char_tokenizer",
    "load_pretrained",
    "run_demo",
    "save_and_reload",
    "tiny_llama",
]
