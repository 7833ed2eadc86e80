"""Whole-iteration GRPO benchmark: TRL's ``GRPOTrainer`` vs ``alignkit.Trainer`` (issue 11).

    python bench/bench_trainer.py                                  # small and large cases
    python bench/bench_trainer.py --case small --iterations 30 --seeds 0 1
    PYTHONPATH=/tmp/peer-site-packages python bench/bench_trainer.py   # where TRL lives elsewhere

One config, every framework: a random-init ``LlamaConfig`` (small: hidden 128, intermediate 512,
2 layers, 4 heads, 24 new tokens; large: hidden 256, intermediate 1024, 4 layers, 64 new tokens)
with a 46-symbol character tokenizer (44 characters + <pad> + <eos>), saved once and loaded by both
with ``from_pretrained``; 8 prompts x 8 generations per iteration, temperature 1, top-k 0, top-p 1;
lr 1e-3 constant (no warm-up), AdamW, max_grad_norm 1, no reference model (kl 0 / beta 0), one
optimizer step per iteration, token-mean loss (TRL's default ``loss_type="dapo"``: normalised by the
active tokens of the global batch; alignkit's grpo ``agg="token-mean"``), clip 0.2 both sides, no
dual clip, no gradient checkpointing, CPU fp32. Reward: the share of digits in the completion.

Each framework runs in its own subprocess, so its peak RSS (``ru_maxrss``, imports included) is its
own; runs are interleaved (ABBA over seeds) because the machine is shared, and each child uses one
torch thread by default (``--threads``). Per run: wall time of
every iteration, the median over iterations 2..N (the first is a warm-up), completion tokens per
second, peak RSS and the reward curve (mean reward of each iteration's 64 completions, recorded by
the same reward function in both). Results: bench/results/trainer_cpu.json and .md.

A third framework, ``trl+alignkit``, is TRL's GRPOTrainer after ``alignkit.compat.trl.patch()``
(its per-token log-probs from the fused, shared-prompt ops): the drop-in gain for TRL users.

TRL missing: alignkit still runs and TRL is reported as skipped. Not collected by pytest (no
``test_`` functions here): it runs whole training loops, so it is a script, not a benchmark case.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# 44 characters + <pad> + <eos> = the 46-symbol vocabulary of issue 11.
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?.,"
PROMPTS = [
    "what is 7+5?",
    "count 1 2 3",
    "a=4, b=9, a*b=",
    "the year is",
    "pi is 3.14",
    "12-7=",
    "write numbers.",
    "my phone is",
]
CASES = {
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "max_new_tokens": 24},
    "large": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "max_new_tokens": 64},
}
SHARED = {
    "num_attention_heads": 4,
    "prompts_per_iteration": 8,
    "num_generations": 8,
    "learning_rate": 1e-3,
    "max_grad_norm": 1.0,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "clip": 0.2,
}
# What TRL measured on this machine earlier (issue 11), for the table's context only.
PREVIOUS_TRL = {
    "small": {"s_per_iteration": 0.44, "peak_rss_mib": 653},
    "large": {"s_per_iteration": 3.9, "peak_rss_mib": 1369},
}
FRAMEWORKS = ("trl", "trl+alignkit", "alignkit")  # trl+alignkit: TRL after alignkit.compat.trl.patch()


# ----------------------------------------------------------------------------- shared pieces


class DigitShareReward:
    """Reward = share of digits in each completion; records each call's mean reward and completion
    token count (one call per iteration in both frameworks), so both curves come from this code."""

    __name__ = "digit_share"  # TRL names reward functions by __name__

    def __init__(self) -> None:
        self.means: list[float] = []
        self.tokens: list[int] = []

    def __call__(self, prompts, completions, completion_ids=None, **unused) -> list[float]:
        scores = [sum(c.isdigit() for c in text) / len(text) if text else 0.0 for text in completions]
        self.means.append(sum(scores) / len(scores))
        self.tokens.append(sum(len(ids) for ids in completion_ids) if completion_ids is not None else 0)
        return scores


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _load(model_dir: str, attn: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    return model, transformers.AutoTokenizer.from_pretrained(model_dir)


def _summary(times: list[float], reward: DigitShareReward, setup_rss_kib: int) -> dict:
    timed = times[1:] if len(times) > 1 else times  # iteration 1 is the warm-up
    tokens = reward.tokens[1:] if len(reward.tokens) > 1 else reward.tokens
    return {
        "iteration_s": times,
        "s_per_iteration": statistics.median(timed),
        "fastest_iteration_s": min(timed),  # the least disturbed by other load on a shared machine
        "tokens_per_s": sum(tokens) / sum(timed),
        "completion_tokens_per_iteration": statistics.mean(tokens),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_setup_mib": setup_rss_kib / 1024,
        "reward_curve": reward.means,
    }


# ----------------------------------------------------------------------------- children


def run_alignkit(model_dir: str, case: dict, *, seed: int, iterations: int, attn: str) -> dict:
    import alignkit

    model, tokenizer = _load(model_dir, attn)
    reward = DigitShareReward()
    config = alignkit.RLConfig(
        algorithm="grpo", agg="token-mean", loss_type="ppo_clip", iterations=iterations,
        prompts_per_iteration=SHARED["prompts_per_iteration"], num_generations=SHARED["num_generations"],
        max_new_tokens=case["max_new_tokens"], temperature=SHARED["temperature"], top_k=SHARED["top_k"],
        top_p=SHARED["top_p"], learning_rate=SHARED["learning_rate"], lr_schedule="constant",
        warmup_iterations=0, ppo_epochs=1, max_grad_norm=SHARED["max_grad_norm"], kl_coef=0.0,
        clip_low=SHARED["clip"], clip_high=SHARED["clip"], dual_clip=None, seed=seed, progress=False,
        output_dir=None,
    )  # fmt: skip
    trainer = alignkit.Trainer(model, tokenizer, reward_fn=reward, prompts=PROMPTS, config=config)
    setup_rss = _rss_kib("VmRSS")
    times, phases = [], []
    for _ in range(iterations):
        start = time.perf_counter()
        metrics = trainer.step()
        times.append(time.perf_counter() - start)
        phases.append({k: metrics[k] for k in ("time/rollout_s", "time/train_s", "reward/mean")})
    out = _summary(times, reward, setup_rss)
    timed = phases[1:] if len(phases) > 1 else phases
    out["phase_s"] = {
        "rollout+reward": statistics.median(p["time/rollout_s"] for p in timed),
        "score+update": statistics.median(p["time/train_s"] for p in timed),
    }
    # the trainer's own reward/mean must equal what the shared reward function saw
    out["reward_curve_check"] = max(
        abs(p["reward/mean"] - r) for p, r in zip(phases, reward.means, strict=True)
    )
    return out


def run_trl(
    model_dir: str, case: dict, *, seed: int, iterations: int, attn: str, patched: bool = False
) -> dict:
    try:
        import trl
        from datasets import Dataset
        from transformers import TrainerCallback
    except Exception as exc:  # a broken install is reported like a missing one
        return {"skipped": f"trl unavailable ({type(exc).__name__}: {exc}); install the bench extra"}

    if patched:  # TRL's per-token log-probs from alignkit's fused, shared-prompt ops
        from alignkit.compat import trl as compat_trl

        compat_trl.patch()
    model, tokenizer = _load(model_dir, attn)
    reward = DigitShareReward()
    rows = SHARED["prompts_per_iteration"] * SHARED["num_generations"]
    with tempfile.TemporaryDirectory() as out_dir:
        args = trl.GRPOConfig(
            output_dir=out_dir, max_steps=iterations, per_device_train_batch_size=rows,
            gradient_accumulation_steps=1, generation_batch_size=rows,
            num_generations=SHARED["num_generations"], max_completion_length=case["max_new_tokens"],
            temperature=SHARED["temperature"], top_k=SHARED["top_k"], top_p=SHARED["top_p"],
            learning_rate=SHARED["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=SHARED["max_grad_norm"], beta=0.0, num_iterations=1, loss_type="dapo",
            epsilon=SHARED["clip"], use_vllm=False, gradient_checkpointing=False, bf16=False, fp16=False,
            use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            seed=seed, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )  # fmt: skip
        marks: list[float] = []
        generation: list[float] = []

        class StepClock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                marks.append(time.perf_counter())

        generate_and_score = trainer._generate_and_score_completions

        def timed_generate_and_score(*a, **k):
            start = time.perf_counter()
            result = generate_and_score(*a, **k)
            generation.append(time.perf_counter() - start)
            return result

        trainer._generate_and_score_completions = timed_generate_and_score
        trainer.add_callback(StepClock())
        setup_rss = _rss_kib("VmRSS")
        trainer.train()
    times = [b - a for a, b in itertools.pairwise(marks)]
    out = _summary(times, reward, setup_rss)
    timed = generation[1:] if len(generation) > 1 else generation
    med_gen = statistics.median(timed)
    out["phase_s"] = {"rollout+reward": med_gen, "score+update": out["s_per_iteration"] - med_gen}
    out["settings"] = {
        "loss_type": args.loss_type,
        "scale_rewards": args.scale_rewards,
        "optim": str(args.optim),
        "steps_per_generation": args.steps_per_generation,
    }
    return out


def child_main(args: argparse.Namespace) -> None:
    import torch

    warnings.simplefilter("ignore")  # TRL / transformers deprecation notices
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    patched_trl = functools.partial(run_trl, patched=True)
    runs = {"trl": run_trl, "trl+alignkit": patched_trl, "alignkit": run_alignkit}
    result = runs[args.child](
        args.model_dir, CASES[args.case], seed=args.seed, iterations=args.iterations, attn=args.attn
    )
    result.update(framework=args.child, seed=args.seed, threads=torch.get_num_threads())
    Path(args.child_out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def build_model(case_name: str, root: Path) -> Path:
    """The case's random-init Llama and the character tokenizer, saved once (both children load it)."""
    from alignkit.demo.models import char_tokenizer, save_and_reload, tiny_llama

    case = CASES[case_name]
    tokenizer = char_tokenizer(CHARS)
    if len(tokenizer) != 46:
        raise RuntimeError(f"the character tokenizer should hold 46 symbols, holds {len(tokenizer)}")
    for prompt in PROMPTS:
        if set(prompt) - set(CHARS):
            raise RuntimeError(f"prompt {prompt!r} uses characters outside the tokenizer")
    model = tiny_llama(
        len(tokenizer), hidden_size=case["hidden_size"], intermediate_size=case["intermediate_size"],
        num_hidden_layers=case["num_hidden_layers"], num_attention_heads=SHARED["num_attention_heads"],
        seed=0,
    )  # fmt: skip
    path = root / case_name
    save_and_reload(model, tokenizer, path)
    return path


def run_child(framework: str, model_dir: Path, case: str, seed: int, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", framework, "--model-dir", str(model_dir),
        "--case", case, "--seed", str(seed), "--iterations", str(args.iterations_for[case]),
        "--threads", str(args.threads), "--attn", args.attn, "--child-out", str(out),
    ]  # fmt: skip
    env = dict(os.environ)
    if framework.startswith("trl") and args.trl_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.trl_path, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"framework": framework, "seed": seed, "skipped": f"child failed ({proc.returncode}): "
                    + " | ".join(tail)}  # fmt: skip
        result = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    result["process_wall_s"] = time.perf_counter() - start
    return result


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(runs: list[dict]) -> dict:
    """Per framework: medians over seeds; ratios alignkit vs TRL (throughput > 1 and memory < 1 are wins)."""
    per: dict[str, dict] = {}
    for fw in FRAMEWORKS:
        ok = [r for r in runs if r["framework"] == fw and "skipped" not in r]
        if not ok:
            reasons = sorted({r["skipped"] for r in runs if r["framework"] == fw})
            per[fw] = {"skipped": "; ".join(reasons) or "not run"}
            continue
        per[fw] = {
            "s_per_iteration": statistics.median(r["s_per_iteration"] for r in ok),
            "fastest_iteration_s": min(r["fastest_iteration_s"] for r in ok),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "rss_after_setup_mib": max(r["rss_after_setup_mib"] for r in ok),
            "rollout_reward_s": statistics.median(r["phase_s"]["rollout+reward"] for r in ok),
            "score_update_s": statistics.median(r["phase_s"]["score+update"] for r in ok),
            "reward_first5": _mean([_mean(r["reward_curve"][:5]) for r in ok]),
            "reward_last5": _mean([_mean(r["reward_curve"][-5:]) for r in ok]),
        }
    out = {"frameworks": per}
    a, t = per["alignkit"], per["trl"]
    if "skipped" not in a and "skipped" not in t:
        out["ratios"] = {
            "speedup_s_per_iteration": t["s_per_iteration"] / a["s_per_iteration"],
            "speedup_fastest_iteration": t["fastest_iteration_s"] / a["fastest_iteration_s"],
            "throughput_tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
            "peak_rss": a["peak_rss_mib"] / t["peak_rss_mib"],
        }
        out["goal_met"] = out["ratios"]["speedup_s_per_iteration"] >= 2.0 and out["ratios"]["peak_rss"] <= 1.0
    p = per["trl+alignkit"]
    if "skipped" not in p and "skipped" not in t:
        out["patched_trl"] = {
            "speedup_s_per_iteration": t["s_per_iteration"] / p["s_per_iteration"],
            "throughput_tokens_per_s": p["tokens_per_s"] / t["tokens_per_s"],
            "peak_rss": p["peak_rss_mib"] / t["peak_rss_mib"],
        }
    return out


def machine_info(threads: int) -> dict:
    versions = {}
    for dist in ("alignkit", "torch", "transformers", "tokenizers", "trl", "accelerate", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    if versions["trl"] is None:  # TRL may live only on the children's PYTHONPATH
        probe = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__)"],
                               capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
        versions["trl"] = probe.stdout.strip() or None
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "versions": versions, "git_commit": commit,
        "datetime": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }  # fmt: skip


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(data: dict) -> str:
    info = data["machine"]
    v = info["versions"]
    lines = [
        f"Machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads; "
        f"torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}; "
        f"commit {str(info['git_commit'] or '?')[:10]}; {info['datetime']}",
        "",
    ]
    for case, block in data["cases"].items():
        cfg = block["config"]
        lines += [
            f"**GRPO iteration, {case}: Llama h={cfg['hidden_size']} i={cfg['intermediate_size']} "
            f"L={cfg['num_hidden_layers']}, vocab 46, 8 prompts x 8 generations x "
            f"{cfg['max_new_tokens']} new tokens, {cfg['iterations']} iterations x seeds {cfg['seeds']}, "
            "CPU fp32**",
            "",
            "| framework | s / iteration | speed-up of alignkit | tokens / s | peak RSS | rollout+reward | "
            "score+update | reward first 5 -> last 5 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        summary = block["summary"]["frameworks"]
        base = summary["alignkit"]
        for fw in FRAMEWORKS:
            s = summary[fw]
            if "skipped" in s:
                lines.append(f"| {fw} | skipped: {s['skipped']} | | | | | | |")
                continue
            ratio = s["s_per_iteration"] / base["s_per_iteration"] if "skipped" not in base else None
            lines.append(
                f"| {fw} | {s['s_per_iteration']:.3f} s | {_fmt(ratio, '.2f')}x | {s['tokens_per_s']:.0f} | "
                f"{s['peak_rss_mib']:.0f} MiB | {s['rollout_reward_s']:.3f} s | "
                f"{s['score_update_s']:.3f} s | {s['reward_first5']:.3f} -> {s['reward_last5']:.3f} |"
            )
        if "ratios" in block["summary"]:
            r = block["summary"]["ratios"]
            goal = "met" if block["summary"]["goal_met"] else "not met"
            lines += [
                "",
                f"alignkit vs TRL: {r['speedup_s_per_iteration']:.2f}x iterations/s "
                f"({r['speedup_fastest_iteration']:.2f}x on the fastest iteration), "
                f"{r['throughput_tokens_per_s']:.2f}x tokens/s, {r['peak_rss']:.2f}x peak RSS "
                f"(goal >= 2x at <= 1x: {goal})",
            ]
        if "patched_trl" in block["summary"]:
            r = block["summary"]["patched_trl"]
            lines += [
                "",
                "TRL patched by alignkit.compat.trl vs TRL: "
                f"{r['speedup_s_per_iteration']:.2f}x iterations/s, "
                f"{r['throughput_tokens_per_s']:.2f}x tokens/s, {r['peak_rss']:.2f}x peak RSS",
            ]
        lines += ["", "Reward per iteration (mean of 64 completions):", ""]
        for run in block["runs"]:
            if "skipped" in run:
                continue
            curve = " ".join(f"{x:.2f}" for x in run["reward_curve"])
            lines.append(f"- {run['framework']} seed {run['seed']}: {curve}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=(*CASES, "all"), default="all")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per run (default: 30 small, 10 large)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 small, 0 large")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (default 1: on a shared machine, 2+ threads "
                        "that get preempted spin and slow down a lot; 0: torch's default)")  # fmt: skip
    parser.add_argument("--attn", default="sdpa", help="attn_implementation both frameworks load with")
    parser.add_argument("--trl-path", default=None, help="prepended to PYTHONPATH of the TRL child only")
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer_cpu.json")
    # internal: one framework's run
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 2:
        parser.error(f"--iterations must be >= 2 (the first is a warm-up), got {args.iterations}")
    if args.child:
        child_main(args)
        return 0

    import torch

    args.threads = args.threads if args.threads > 0 else torch.get_num_threads()
    cases = list(CASES) if args.case == "all" else [args.case]
    args.iterations_for = {c: args.iterations or (30 if c == "small" else 10) for c in cases}
    data = {"benchmark": "GRPO trainer iteration, TRL GRPOTrainer vs alignkit.Trainer",
            "machine": machine_info(args.threads), "shared": {**SHARED, "chars": CHARS, "prompts": PROMPTS,
            "attn_implementation": args.attn}, "previous_trl": PREVIOUS_TRL, "cases": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            seeds = args.seeds if args.seeds is not None else ([0, 1] if case == "small" else [0])
            model_dir = build_model(case, Path(tmp))
            runs = []
            for i, seed in enumerate(seeds):  # ABBA: each framework goes first in turn
                for fw in FRAMEWORKS if i % 2 == 0 else FRAMEWORKS[::-1]:
                    result = run_child(fw, model_dir, case, seed, args)
                    runs.append(result)
                    note = result.get("skipped") or (
                        f"{result['s_per_iteration']:.3f} s/it, {result['peak_rss_mib']:.0f} MiB"
                    )
                    print(f"[{case}] {fw} seed {seed}: {note}", flush=True)
            config = {**CASES[case], "iterations": args.iterations_for[case], "seeds": seeds}
            data["cases"][case] = {"config": config, "runs": runs, "summary": summarise(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    text = render(data)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
