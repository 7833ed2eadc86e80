"""``alignkit demo``: RL alignment of a small causal LM on a verifiable task, end to end, on CPU.

The phases, in the order they run (each through the public API a user would call)::

    model        a character tokenizer (``tokenizers``) and a tiny Llama from a config, saved and
                 reloaded through ``from_pretrained``; or ``--model``: a folder / hub id
    warm start   a short supervised fine-tune that teaches the answer format and part of the skill
    evaluate     greedy accuracy on a fixed held-out set (the "before")
    RL           alignkit.Trainer (GRPO by default) on an exact-match + format reward,
                 evaluated on the held-out set every ``eval_every`` iterations
    outputs      report.json, metrics.jsonl, samples before/after, the model and tokenizer, curves.png

See alignkit/demo/task.py for the task and docs in the README for the recipe and its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..trainer import ALGORITHMS, RLConfig, Trainer
from . import models, plots, task

TINY_DEFAULTS = {"warm_start_steps": 800, "warm_start_lr": 2e-3, "learning_rate": 3e-4}
PRETRAINED_DEFAULTS = {"warm_start_steps": 60, "warm_start_lr": 1e-5, "learning_rate": 1e-6}


class DemoError(RuntimeError):
    """A demo input that cannot work here (the message says which and why); the CLI prints it alone."""


@dataclass
class DemoConfig:
    """One ``alignkit demo`` run. Defaults: the tiny from-scratch model on CPU, under 5 minutes."""

    output: str = "alignkit-demo"  # output folder, relative to the current one
    algorithm: str = "grpo"  # any alignkit.ALGORITHMS entry
    model: str | None = None  # None: a tiny Llama built from a config; else a folder or a hub id
    device: str = "cpu"  # cpu, cuda, cuda:N, auto
    seed: int = 0  # seeds the model init, the data split, the warm start and the RL run
    threads: int | None = 1  # torch CPU threads (1: the tiny model's matmuls are too small to split)
    progress: bool = True  # tqdm bars for every long phase
    # --- task
    digits: int = task.DIGITS  # operand width: "07+38=" -> "045"
    train_problems: int = task.TRAIN_PROBLEMS  # training pool (warm start and RL prompts)
    held_out: int = task.HELD_OUT_PROBLEMS  # fixed held-out set: disjoint from the pool, same for all seeds
    # --- the tiny model (ignored with --model)
    hidden_size: int = 128  # width of the tiny Llama
    num_hidden_layers: int = 2  # depth of the tiny Llama
    # --- warm start (None: the tiny or the pretrained default)
    warm_start_steps: int | None = None  # at most this many supervised steps
    warm_start_target_loss: float | None = 0.4  # stop once the recent training loss is this low (None: never)
    warm_start_batch_size: int = 64  # problems per supervised step
    warm_start_lr: float | None = None  # AdamW learning rate of the warm start
    # --- RL (the rest of RLConfig keeps its defaults)
    iterations: int = 200  # RL iterations
    prompts_per_iteration: int = 16  # distinct problems per iteration
    num_generations: int = 8  # samples per problem (the group)
    temperature: float = 1.0  # sampling temperature of the rollouts
    learning_rate: float | None = None  # RL AdamW learning rate (None: the tiny or the pretrained default)
    warmup_iterations: int = 10  # linear learning-rate warm-up of the RL phase
    lr_schedule: str = "cosine"  # after the warm-up: constant, linear or cosine (to 0)
    kl_coef: float = 0.001  # KL-to-warm-start penalty (k3, in the loss; light: mostly a monitor); 0: none
    eval_every: int = 25  # held-out evaluation every this many RL iterations (and at the end)

    def __post_init__(self) -> None:
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output):
            raise ValueError(f"output must be a folder path, got {self.output!r}")
        self.output = str(self.output)
        self.algorithm = _checks.choice(self.algorithm, "algorithm", ALGORITHMS)
        if self.model is not None:
            models.check_model_name(self.model)
        self.seed = _checks.non_negative_int(self.seed, "seed")
        if self.threads is not None:
            self.threads = _checks.positive_int(self.threads, "threads")
        self.progress = _checks.flag(self.progress, "progress")
        for name in ("digits", "train_problems", "held_out", "hidden_size", "num_hidden_layers",
                     "warm_start_batch_size", "iterations", "prompts_per_iteration", "num_generations",
                     "eval_every"):  # fmt: skip
            setattr(self, name, _checks.positive_int(getattr(self, name), name))
        defaults = TINY_DEFAULTS if self.model is None else PRETRAINED_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.warm_start_steps = _checks.non_negative_int(self.warm_start_steps, "warm_start_steps")
        for name in ("warm_start_lr", "learning_rate", "temperature"):
            setattr(self, name, _checks.positive(getattr(self, name), name))
        self.warmup_iterations = _checks.non_negative_int(self.warmup_iterations, "warmup_iterations")
        self.kl_coef = _checks.non_negative(self.kl_coef, "kl_coef")
        if self.warm_start_target_loss is not None:
            self.warm_start_target_loss = _checks.positive(
                self.warm_start_target_loss, "warm_start_target_loss"
            )
        if self.digits > 6:
            raise ValueError(f"digits must be at most 6, got {self.digits}")
        self.rl_config()  # RLConfig checks the rest (lr_schedule, ...), naming the field

    def rl_config(self) -> RLConfig:
        """The trainer's config for this run (validated by RLConfig itself)."""
        return RLConfig(
            algorithm=self.algorithm,
            iterations=self.iterations,
            prompts_per_iteration=self.prompts_per_iteration,
            num_generations=self.num_generations,
            max_new_tokens=self.digits + 2,  # the answer (digits + 1 characters) and its eos
            temperature=self.temperature,
            learning_rate=self.learning_rate,
            warmup_iterations=self.warmup_iterations,
            lr_schedule=self.lr_schedule,
            kl_coef=self.kl_coef,
            seed=self.seed,
            progress=False,  # the demo draws its own bar, with the held-out accuracy on it
        )


# ----------------------------------------------------------------------------- checks before any work


def prepare_output(folder: str) -> Path:
    """Create ``folder`` (and its parents) and prove it writable, or DemoError saying why not."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DemoError(
            f"cannot write the output folder {str(path)!r}: {reason}; pass --output FOLDER"
        ) from exc
    return path


def check_environment(config: DemoConfig) -> tuple[torch.device, Path]:
    """The device and the output folder, checked before anything is built (DemoError if unusable)."""
    try:
        device = models.resolve_device(config.device)
    except ValueError as exc:
        raise DemoError(str(exc)) from exc
    return device, prepare_output(config.output)


# ----------------------------------------------------------------------------- phases


def _bar(enabled: bool, total: int, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{desc:<12}", unit=unit, dynamic_ncols=True, leave=True)


def build_model(config: DemoConfig, device: torch.device, scratch: Path):
    """(model, tokenizer, description). The tiny model goes through save_pretrained/from_pretrained
    exactly as a user's checkpoint would."""
    if config.model is not None:
        model, tokenizer = models.load_pretrained(config.model, device=device)
        return model, tokenizer, config.model
    tokenizer = models.char_tokenizer()
    model = models.tiny_llama(
        len(tokenizer), hidden_size=config.hidden_size, intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, seed=config.seed,
    )  # fmt: skip
    model, tokenizer = models.save_and_reload(model, tokenizer, scratch / "initial")
    size = models.count_parameters(model) / 1e6
    return model.to(device).eval(), tokenizer, f"tiny Llama ({size:.2f}M parameters, from scratch)"


def evaluate(engine, held_out, *, progress: bool, desc: str) -> tuple[float, list[dict[str, Any]]]:
    bar = _bar(progress, len(held_out), desc, "problem")
    try:
        return task.evaluate(engine, held_out, bar=bar)
    finally:
        if bar is not None:
            bar.close()


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def reinforce(trainer: Trainer, config: DemoConfig, held_out, out: Path):
    """The RL phase: ``trainer.step()`` per iteration, the held-out set every ``eval_every``;
    metrics.jsonl gets one line per iteration (with ``eval/accuracy`` where evaluated). Returns
    (metrics, evaluations as (iteration, accuracy), the last evaluation's rows)."""
    metrics: list[dict[str, Any]] = []
    evaluations: list[tuple[int, float]] = []
    rows: list[dict[str, Any]] = []
    bar = _bar(config.progress, config.iterations, "RL " + config.algorithm, "it")
    try:
        with open(out / "metrics.jsonl", "w") as log:
            while trainer.iteration < config.iterations:
                row = trainer.step()
                done = trainer.iteration
                if done % config.eval_every == 0 or done == config.iterations:
                    accuracy, rows = task.evaluate(trainer.engine, held_out)
                    evaluations.append((done, accuracy))
                    row["eval/accuracy"] = accuracy
                metrics.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if bar is not None:
                    shown = {"reward": f"{row['reward/mean']:.3f}"}
                    if evaluations:
                        shown["held-out"] = f"{100 * evaluations[-1][1]:.1f}%"
                    bar.set_postfix(shown)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return metrics, evaluations, rows


def _mean_last(metrics: list[dict[str, Any]], key: str, count: int) -> float | None:
    values = [m[key] for m in metrics[-count:] if m.get(key) is not None]
    return sum(values) / len(values) if values else None


def run_demo(config: DemoConfig, *, log=print) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the report also written to report.json.
    Raises DemoError for an input that cannot work here (device, output folder, model)."""
    start = time.perf_counter()
    device, out = check_environment(config)
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignkit-demo-") as scratch:
        try:
            with models.transformers_bars_off():
                model, tokenizer, described = build_model(config, device, Path(scratch))
        except ValueError as exc:
            raise DemoError(str(exc)) from exc
    pool, held_out = task.split(
        digits=config.digits, held_out=config.held_out, train=config.train_problems, seed=config.seed
    )
    seconds["model"] = time.perf_counter() - t
    log(f"alignkit demo: {config.digits}-digit addition ({held_out[0].prompt}{held_out[0].answer}), "
        f"{described}, {config.algorithm}, seed {config.seed}, {device}")  # fmt: skip

    t = time.perf_counter()
    bar = _bar(config.progress, config.warm_start_steps, "warm start", "step")
    try:
        losses = task.warm_start(
            model, tokenizer, pool, steps=config.warm_start_steps, batch_size=config.warm_start_batch_size,
            lr=config.warm_start_lr, seed=config.seed, target_loss=config.warm_start_target_loss, bar=bar,
        )  # fmt: skip
        if bar is not None and bar.n < bar.total:
            bar.total = bar.n  # reached the target loss early: show a full bar
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    seconds["warm_start"] = time.perf_counter() - t

    rl_config = config.rl_config()
    trainer = Trainer(
        model, tokenizer, reward_fn=task.REWARD_FUNCTIONS, prompts=task.as_prompts(pool), config=rl_config,
        reward_weights=task.REWARD_WEIGHTS,
    )  # fmt: skip
    t = time.perf_counter()
    accuracy_before, rows_before = evaluate(
        trainer.engine, held_out, progress=config.progress, desc="eval before"
    )
    _write_jsonl(out / "samples_before_rl.jsonl", rows_before)
    seconds["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics, evaluations, rows_after = reinforce(trainer, config, held_out, out)
    evaluations.insert(0, (0, accuracy_before))
    accuracy_after = evaluations[-1][1]
    _write_jsonl(out / "samples_after_rl.jsonl", rows_after)
    seconds["rl"] = time.perf_counter() - t

    t = time.perf_counter()
    with models.transformers_bars_off():
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    title = (f"alignkit demo: {config.digits}-digit addition, {config.algorithm}, seed {config.seed}: "
             f"{100 * accuracy_before:.1f}% -> {100 * accuracy_after:.1f}% held-out")  # fmt: skip
    try:
        weights = {fn.__name__: w for fn, w in zip(task.REWARD_FUNCTIONS, task.REWARD_WEIGHTS, strict=True)}
        plots.plot_curves(metrics, evaluations, out / "curves.png", title=title, reward_weights=weights)
        plot = str(out / "curves.png")
    except ImportError as exc:
        plot = None
        log(f"note: {exc}; everything else is written")
    seconds["outputs"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    last = max(1, min(20, len(metrics)))
    report = {
        "accuracy_before_rl": accuracy_before,
        "accuracy_after_rl": accuracy_after,
        "seconds": seconds["total"],
        "seconds_by_phase": seconds,
        "accuracy_curve": [{"iteration": i, "accuracy": a} for i, a in evaluations],
        "held_out_problems": len(held_out),
        "warm_start_steps_run": len(losses),
        "warm_start_final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "reward_mean_last": _mean_last(metrics, "reward/mean", last),
        "correct_fraction_last": _mean_last(metrics, "reward/correctness", last),
        "kl_mean_last": _mean_last(metrics, "kl/mean", last),
        "tokens_per_s": _mean_last(metrics, "tokens_per_s", len(metrics)),
        "model": described,
        "device": str(device),
        "curves": plot,
        "config": {**dataclasses.asdict(config), "rl": rl_config.to_dict()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    log(summary_table(report, last=last))
    log(samples_table(rows_before, rows_after))
    log(f"outputs in {out}/: report.json metrics.jsonl samples_before_rl.jsonl samples_after_rl.jsonl model/"
        + (" curves.png" if plot else ""))  # fmt: skip
    return report


# ----------------------------------------------------------------------------- the printed summary


def summary_table(report: dict[str, Any], *, last: int) -> str:
    before, after = report["accuracy_before_rl"], report["accuracy_after_rl"]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        (
            f"held-out accuracy after warm start ({report['held_out_problems']} problems, greedy)",
            f"{100 * before:.1f}%",
        ),
        ("held-out accuracy after RL", f"{100 * after:.1f}%  ({100 * (after - before):+.1f} points)"),
        (f"mean reward, last {last} iterations", number(report["reward_mean_last"], ".3f")),
        (
            f"exactly right while sampling, last {last} iterations",
            number(report["correct_fraction_last"], ".3f"),
        ),
        (f"KL to the warm start, last {last} iterations", number(report["kl_mean_last"], ".4f")),
        ("RL throughput (response tokens/s)", number(report["tokens_per_s"], ".0f")),
        ("wall time", f"{report['seconds']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    lines = [rule, *(f"| {k:<{width}} | {v:<{value_width}} |" for k, v in rows), rule]
    return "\n".join(lines)


def samples_table(before: list[dict[str, Any]], after: list[dict[str, Any]], *, count: int = 6) -> str:
    """The first ``count`` held-out problems: the greedy completion before RL and after, marked."""

    def shown(row: dict[str, Any]) -> str:
        return f"{row['completion'].strip() or '(empty)':<6}{'ok' if row['correct'] else 'x'}"

    lines = ["held-out samples (greedy)", f"  {'problem':<12}{'answer':<9}{'before RL':<12}after RL"]
    for b, a in zip(before[:count], after[:count], strict=False):
        lines.append(f"  {b['prompt']:<12}{b['answer']:<9}{shown(b):<12}{shown(a)}")
    return "\n".join(lines)
