"""Command line: ``alignkit --version``, ``info``, ``smoke``, ``demo`` and ``train``.

``alignkit demo`` runs the embedded example end to end (alignkit/demo/run.py); ``alignkit train
--config run.yaml key=value ...`` runs the trainer from a YAML file without Python code. Bad input
(an unknown option value, a missing model folder, no CUDA, an unwritable folder, a bad config key)
ends with one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``alignkit demo: error: ...``) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(command: str, exc: BaseException) -> int:
    print(f"alignkit {command}: error: {exc}", file=sys.stderr)
    return 2


def info() -> int:
    """Print versions, the extension's status, CUDA devices and each op's backend."""
    import torch

    import alignkit
    from alignkit import _ext, backend, kernels

    print(f"alignkit      {alignkit.__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    for dist in ("torch", "triton", "transformers", "numba", "numpy"):
        print(f"{dist:<13} {_dist_version(dist)}")
    loaded, detail = _ext.status()
    print(f"extension     {'loaded' if loaded else 'NOT LOADED'}: {detail}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {props.name}, {props.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda          no CUDA device")
    print(f"triton        {'interpreter on CPU' if kernels.interpreter_active() else 'compiled'}")
    print(f"backend       {backend.ENV_VAR}={backend.requested()}")
    print("op backends   (for CPU tensors / CUDA tensors)")
    for op, row in backend.describe().items():
        print(f"  {op:<28} {row['cpu']} / {row['cuda']}")
    return 0


def smoke() -> int:
    """A short real run of every op on both backends (alignkit/smoke.py)."""
    from alignkit import smoke as _smoke

    return _smoke.run()


def demo(args: argparse.Namespace) -> int:
    """The embedded demo: warm start, then RL, on held-out addition (alignkit/demo/run.py)."""
    from alignkit.config_overrides import apply_overrides
    from alignkit.demo.run import DemoConfig, DemoError, run_demo

    fields = {
        "output": args.output, "algorithm": args.algo, "model": args.model, "device": args.device,
        "seed": args.seed, "iterations": args.iterations, "warm_start_steps": args.warm_start_steps,
        "held_out": args.held_out, "eval_every": args.eval_every, "threads": args.threads,
        "progress": not args.no_progress,
    }  # fmt: skip
    try:  # a bad field value: ValueError / TypeError naming the field
        values = apply_overrides({k: v for k, v in fields.items() if v is not None}, args.overrides,
                                 known=DemoConfig)  # fmt: skip
        config = DemoConfig(**values)
    except (ValueError, TypeError) as exc:
        return _fail("demo", exc)
    try:  # only inputs that cannot work here (device, output folder, model) raise DemoError
        run_demo(config)
    except DemoError as exc:
        return _fail("demo", exc)
    return 0


def train(args: argparse.Namespace) -> int:
    """``alignkit train --config run.yaml key=value ...`` (alignkit/trainer/run_file.py)."""
    from alignkit.trainer import RewardError, run_file

    try:
        run = run_file.load(args.config, args.overrides)
        trainer = run_file.build(run)
    except (ValueError, TypeError, OSError) as exc:
        return _fail("train", exc)
    try:
        run_file.train(run, trainer)
    except RewardError as exc:
        return _fail("train", exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    from alignkit.trainer.config import ALGORITHMS

    parser = _Parser(prog="alignkit", description="Fast, memory-lean building blocks for RL fine-tuning "
                     "of causal language models.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"alignkit {_dist_version('alignkit')}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("info", help="versions, compiled extension, CUDA devices, backend of each op")
    sub.add_parser("smoke", help="a short real run of every op on both backends")

    d = sub.add_parser(
        "demo",
        help="RL-align a small LM on held-out addition, on CPU in minutes (report, plots, model)",
        description="Warm-start a tiny Llama (or --model) on fixed-width addition, then RL it; evaluate "
        "greedy held-out accuracy before and after. Extra KEY=VALUE arguments set any field of "
        "alignkit.demo.DemoConfig (e.g. temperature=0.8 prompts_per_iteration=32).",
    )
    d.add_argument("--output", help="output folder (default: ./alignkit-demo)")
    d.add_argument("--algo", choices=ALGORITHMS, help="RL algorithm (default: grpo)")
    d.add_argument(
        "--model", help="a saved model folder or a hub id (default: a tiny Llama built from scratch)"
    )
    d.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu)")
    d.add_argument("--seed", type=int, help="seed of the whole run (default: 0)")
    d.add_argument("--iterations", type=int, help="RL iterations (default: 200)")
    d.add_argument("--warm-start-steps", type=int, help="supervised warm-start steps")
    d.add_argument("--held-out", type=int, help="held-out problems (default: 500)")
    d.add_argument("--eval-every", type=int, help="held-out evaluation every N RL iterations")
    d.add_argument("--threads", type=int, help="torch CPU threads (default: 1)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any other DemoConfig field")

    t = sub.add_parser(
        "train",
        help="run the trainer from a YAML config (model, task or prompts + reward, RLConfig keys)",
        description="Keys: model (folder or hub id), device, task (addition: the demo's prompts and "
        "rewards) or prompts (a .jsonl / .txt file) and reward (module:function, or a list), "
        "reward_weights, and any alignkit.RLConfig field. KEY=VALUE arguments override the file.",
    )
    t.add_argument("--config", required=True, help="a YAML (or JSON) run config")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a key of the config")

    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return info()
        if args.command == "smoke":
            return smoke()
        if args.command == "demo":
            return demo(args)
        if args.command == "train":
            return train(args)
    except KeyboardInterrupt:
        print(f"\nalignkit {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
