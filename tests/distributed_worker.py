"""A training run for tests/test_trainer_distributed.py: launched by torchrun (each rank writes its
final parameters and metrics) or called in-process (the single-process reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # run by torchrun as a script: toy_task beside it
from toy_task import PROMPTS, digit_share


def has_digit(prompts, completions, **meta):
    """1 if a completion holds a digit: many groups tie (all 0 or all 1), so DAPO refills."""
    return [float(any(ch.isdigit() for ch in text)) for text in completions]


def run(model_dir: str, out: Path, algorithm: str) -> None:
    import transformers

    from alignkit.trainer import RLConfig, Trainer

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = RLConfig(
        algorithm=algorithm, iterations=3, prompts_per_iteration=4, num_generations=4, max_new_tokens=8,
        learning_rate=3e-3, kl_coef=0.05 if algorithm == "grpo" else 0.0, minibatch_tokens=64, progress=False,
        seed=3, dapo_max_refills=2,
    )  # fmt: skip
    reward = has_digit if algorithm == "dapo" else digit_share
    trainer = Trainer(model, tokenizer, reward_fn=reward, prompts=PROMPTS, config=config)
    history = trainer.train()
    params = torch.cat([p.detach().reshape(-1) for p in trainer.trainable_parameters()])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(params, out / f"params-rank{trainer.rank}.pt")
    (out / f"metrics-rank{trainer.rank}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
