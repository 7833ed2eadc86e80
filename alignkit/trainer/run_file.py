"""``alignkit train --config run.yaml key=value ...``: a training run described by a file.

A run config is one mapping (YAML, or JSON, which YAML reads too) of

    model: alignkit-demo/model     # a saved model folder or a hub id (required)
    device: cpu                    # cpu, cuda, cuda:N, auto (default: auto)
    task: addition                 # a built-in task: its prompts, rewards and held-out set ...
    prompts: prompts.jsonl         # ... or prompts: a .jsonl file of {"prompt": ..., columns} rows,
    reward: mypkg.rewards:score    #     a .txt file of one prompt per line, or an inline list;
                                   #     reward: module:function, or a list of them
    reward_weights: [1.0, 0.1]     # one per reward function (default: all 1)
    env: alignkit/GuessNumber-v0   # ... or env: a Gymnasium text env id (the env owns the reward),
    env_kwargs: {high: 8}          #     with keyword arguments for gymnasium.make
    learning_rate: 1.0e-5          # ... and any other alignkit.RLConfig field

``key=value`` overrides apply after the file (values parsed as JSON when they parse). Every error
names the key it is about. Without ``output_dir`` the run writes to ``./alignkit-train``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_overrides import parse_overrides
from ..demo import models, task
from .config import RLConfig
from .trainer import Trainer

RUN_KEYS = ("model", "device", "task", "prompts", "reward", "reward_weights", "env", "env_kwargs")
TASKS = ("addition",)
DEFAULT_OUTPUT = "alignkit-train"


@dataclass
class RunConfig:
    """A parsed run config: where the model, prompts and rewards come from, and the trainer's config."""

    model: str  # folder or hub id
    device: str  # cpu, cuda, cuda:N, auto
    task: str | None  # a TASKS entry, or None with prompts + reward
    prompts: list[Any]  # the trainer's prompts
    rewards: list[Any]  # reward functions
    reward_weights: list[float] | None  # one per reward function
    rl: RLConfig  # everything else
    held_out: list[task.Problem] | None = None  # the task's held-out set (evaluated before and after)
    env: Any = None  # an env factory (gymnasium.make of the env id), in place of prompts + rewards


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping (YAML; JSON is YAML too). OSError / ValueError say what is wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {problem}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {str(path)!r} must hold a mapping of keys to values, got a {type(values).__name__}"
        )
    return values


def _import_reward(spec: object, where: str):
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{where} must look like 'module:function', got {spec!r}")
    module_name, attribute = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}={spec!r} cannot be imported: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{where}={spec!r} is not callable")
    return fn


def _read_prompts(spec: object) -> list[Any]:
    if isinstance(spec, list):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"prompts must be a .jsonl / .txt file or a list, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"prompts={spec!r}: no such file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts={spec!r} line {number} is not JSON: {exc}") from None
    return rows


def load(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Parse and check a run config (see the module docstring); ValueError names the bad key."""
    values = {**read_mapping(config_path), **parse_overrides(overrides)}
    rl_keys = {f.name for f in dataclasses.fields(RLConfig)}
    unknown = sorted(set(values) - rl_keys - set(RUN_KEYS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}; run keys: {list(RUN_KEYS)}; RLConfig keys: {sorted(rl_keys)}"
        )
    run = {key: values.pop(key) for key in RUN_KEYS if key in values}
    if "model" not in run:
        raise ValueError("model is required: a saved model folder (e.g. alignkit-demo/model) or a hub id")
    model = run["model"]
    models.check_model_name(model)
    device = run.get("device", "auto")
    models.resolve_device(device)
    values.setdefault("output_dir", DEFAULT_OUTPUT)
    try:
        rl = RLConfig.from_dict(values)
    except TypeError as exc:  # RLConfig's own messages name the field
        raise ValueError(str(exc)) from None

    name = run.get("task")
    held_out = None
    if "env" in run or "env_kwargs" in run:
        return RunConfig(model, device, None, [], [], None, rl, env=_env_factory(run))
    if name is not None:
        if name not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
        if "prompts" in run or "reward" in run:
            raise ValueError(
                "task brings its own prompts and reward: give task, or prompts + reward, not both"
            )
        pool, held_out = task.split(
            digits=task.DIGITS, held_out=task.HELD_OUT_PROBLEMS, train=task.TRAIN_PROBLEMS, seed=rl.seed
        )
        prompts, rewards = task.as_prompts(pool), list(task.REWARD_FUNCTIONS)
        weights = run.get("reward_weights", list(task.REWARD_WEIGHTS))
    else:
        if "prompts" not in run or "reward" not in run:
            missing = [k for k in ("prompts", "reward") if k not in run]
            raise ValueError(
                f"{' and '.join(missing)} missing: give task ({', '.join(TASKS)}), or prompts + reward"
            )
        prompts = _read_prompts(run["prompts"])
        specs = run["reward"] if isinstance(run["reward"], list) else [run["reward"]]
        rewards = [
            _import_reward(s, f"reward[{i}]" if len(specs) > 1 else "reward") for i, s in enumerate(specs)
        ]
        weights = run.get("reward_weights")
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(rewards)):
        raise ValueError(
            f"reward_weights must be a list of {len(rewards)} numbers (one per reward), got {weights!r}"
        )
    return RunConfig(model, device, name, prompts, rewards, weights, rl, held_out)


def _env_factory(run: dict[str, Any]):
    """``gymnasium.make(env, **env_kwargs)`` as a factory, the id and the keys checked first."""
    others = [k for k in ("task", "prompts", "reward", "reward_weights") if k in run]
    if others:
        raise ValueError(
            f"env brings its own prompts and reward: give env, or {' / '.join(others)}, not both"
        )
    env_id, kwargs = run.get("env"), run.get("env_kwargs", {})
    if not isinstance(env_id, str):
        raise ValueError(f"env must be a Gymnasium env id such as alignkit/GuessNumber-v0, got {env_id!r}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"env_kwargs must be a mapping of keyword arguments, got {kwargs!r}")
    from .env_rollouts import env_factory

    env_factory(env_id)  # registered? (ValueError names the id)
    import gymnasium

    return lambda: gymnasium.make(env_id, **kwargs)


def build(run: RunConfig) -> Trainer:
    """Load the model and tokenizer and construct the trainer (ValueError when loading fails)."""
    device = models.resolve_device(run.device)
    model, tokenizer = models.load_pretrained(run.model, device=device)
    if run.env is not None:
        return Trainer(model, tokenizer, env=run.env, config=run.rl)
    return Trainer(model, tokenizer, reward_fn=run.rewards, prompts=run.prompts, config=run.rl,
                   reward_weights=run.reward_weights)  # fmt: skip


def train(run: RunConfig, trainer: Trainer, *, log=print) -> list[dict[str, Any]]:
    """Train; with a built-in task, report held-out greedy accuracy before and after."""
    before = task.evaluate(trainer.engine, run.held_out)[0] if run.held_out else None
    metrics = trainer.train()
    out = Path(run.rl.output_dir)
    if metrics:
        last = metrics[-1]
        reward, speed = last["reward/mean"], last["tokens_per_s"]
        log(f"iteration {last['iteration'] + 1}: reward {reward:.3f}, {speed:.0f} tokens/s")
    if before is not None:
        after = task.evaluate(trainer.engine, run.held_out)[0]
        log(f"held-out accuracy ({run.task}, greedy): {100 * before:.1f}% -> {100 * after:.1f}%")
    log(f"metrics: {out / 'metrics.jsonl'}; model: the newest {out}/checkpoint-*/model")
    return metrics
