"""``alignkit demo`` end to end, shortened (a few seconds), through the CLI entry point; the task's
rewards and data; ``alignkit train --config`` on the demo's saved model; bad input."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import pytest
import torch

from alignkit import cli
from alignkit.demo import plots, task

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# A shortened demo: a smaller model, a few steps of each phase (the defaults take minutes).
SHORT = [
    "--warm-start-steps", "30", "--iterations", "4", "--eval-every", "2", "--held-out", "24", "--no-progress",
    "hidden_size=32", "num_hidden_layers=1", "prompts_per_iteration=4", "num_generations=4",
    "train_problems=200", "warm_start_batch_size=16",
]  # fmt: skip


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``alignkit ARGV`` in this process (argparse exits included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "out"
    code, out, err = run_cli(["demo", "--output", str(folder), "--seed", "3", *SHORT])
    assert code == 0, err
    return folder, out


def test_demo_writes_report_metrics_samples_model_and_plot(demo_run):
    folder, out = demo_run
    report = json.loads((folder / "report.json").read_text())
    for key in ("accuracy_before_rl", "accuracy_after_rl"):
        assert 0.0 <= report[key] <= 1.0
    assert report["seconds"] > 0
    assert report["config"]["seed"] == 3 and report["config"]["algorithm"] == "grpo"
    assert report["config"]["rl"]["iterations"] == 4
    assert [p["iteration"] for p in report["accuracy_curve"]] == [0, 2, 4]
    assert report["accuracy_curve"][0]["accuracy"] == report["accuracy_before_rl"]

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all("reward/mean" in r and "tokens_per_s" in r for r in rows)
    assert [r["eval/accuracy"] for r in rows if "eval/accuracy" in r] == [
        p["accuracy"] for p in report["accuracy_curve"][1:]
    ]

    for name in ("samples_before_rl.jsonl", "samples_after_rl.jsonl"):
        samples = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        assert len(samples) == 24 and {"prompt", "completion", "answer", "correct"} <= set(samples[0])
    after = [json.loads(line) for line in (folder / "samples_after_rl.jsonl").read_text().splitlines()]
    assert sum(s["correct"] for s in after) / len(after) == report["accuracy_after_rl"]

    if HAS_MATPLOTLIB:
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["curves"] == str(folder / "curves.png")
    else:
        assert not (folder / "curves.png").exists() and report["curves"] is None
        assert "pip install 'alignkit[plot]'" in out
    assert "held-out accuracy after RL" in out and "wall time" in out  # the final table


def test_demo_model_and_tokenizer_reload_with_from_pretrained(demo_run):
    import transformers

    folder, _ = demo_run
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "model")
    ids = torch.tensor([tokenizer.encode("07+38=")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert tokenizer.decode(tokenizer.encode("07+38=045")) == "07+38=045"


def test_demo_on_a_saved_pretrained_model(demo_run, tmp_path):
    """--model takes a saved folder (the path a hub checkpoint takes too) and its own defaults."""
    folder, _ = demo_run
    args = ["demo", "--model", str(folder / "model"), "--output", str(tmp_path / "out"), "--device", "auto"]
    code, _, err = run_cli([*args, *SHORT, "--warm-start-steps", "2", "--iterations", "2"])
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == str(folder / "model")
    assert report["config"]["learning_rate"] == 1e-6 and report["config"]["warm_start_lr"] == 1e-5


def test_demo_without_matplotlib_says_how_to_get_the_plot(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'alignkit\[plot\]'"):
        plots.plot_curves([], [(0, 0.5)], tmp_path / "curves.png", title="t")
    args = ["demo", "--output", str(tmp_path / "out"), *SHORT, "--warm-start-steps", "2", "--iterations", "1"]
    code, out, _ = run_cli(args)
    assert code == 0
    assert "curves.png needs matplotlib: pip install 'alignkit[plot]'" in out
    assert not (tmp_path / "out" / "curves.png").exists() and (tmp_path / "out" / "report.json").is_file()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib (the plot extra)")
def test_plot_curves_draws_accuracy_and_reward(tmp_path):
    metrics = [
        {"iteration": i, "reward/mean": 0.1 * i, "reward/correctness": 0.05 * i, "kl/mean": 0.01}
        for i in range(5)
    ]
    plots.plot_curves(metrics, [(0, 0.2), (5, 0.6)], tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- the task


def test_problems_are_fixed_width_distinct_and_held_out_is_disjoint():
    pool, held_out = task.split(digits=2, held_out=50, train=300, seed=1)
    assert len({p.prompt for p in pool}) == 300 and not {p.prompt for p in pool} & {
        p.prompt for p in held_out
    }
    assert held_out == task.split(digits=2, held_out=50, train=10, seed=7)[1]  # the same for every seed
    for p in pool + held_out:
        a, b = p.prompt[:-1].split("+")
        assert len(a) == len(b) == 2 and p.prompt.endswith("=") and p.answer == f"{int(a) + int(b):03d}"
    with pytest.raises(ValueError, match="count must be"):
        task.problems(10_001, digits=2, seed=0)


def test_rewards_exact_partial_and_format():
    completions = ["045", " 045 ", "055", "45", "04x", ""]
    answer = ["045"] * len(completions)
    assert task.correctness(None, completions, answer) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert task.digit_credit(None, completions, answer) == pytest.approx([1, 1, 2 / 3, 0, 2 / 3, 0])
    assert task.well_formed(None, completions, answer) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_supervised_batches_label_only_the_answer_and_eos():
    from alignkit.demo import char_tokenizer

    tokenizer = char_tokenizer()
    pool = [task.format_problem(7, 38, digits=2)]
    ids, mask, labels = next(task.supervised_batches(pool, tokenizer, batch_size=2, seed=0))
    assert tokenizer.decode(ids[0].tolist()) == "07+38=045<eos>"
    assert labels[0].tolist() == [-100] * 6 + tokenizer.encode("045") + [tokenizer.eos_token_id]
    assert mask.sum().item() == 2 * 10


# ----------------------------------------------------------------------------- alignkit train


def test_train_from_yaml_on_the_demo_model(demo_run, tmp_path):
    folder, _ = demo_run
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {folder / 'model'}\ndevice: cpu\ntask: addition\niterations: 2\nprompts_per_iteration: 2\n"
        f"num_generations: 2\nmax_new_tokens: 4\nprogress: false\noutput_dir: {tmp_path / 'train'}\n"
    )
    code, out, err = run_cli(["train", "--config", str(config), "learning_rate=1e-4", "seed=1"])
    assert code == 0, err
    assert "held-out accuracy (addition, greedy)" in out
    rows = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[-1])["lr"] == pytest.approx(1e-4)
    assert (tmp_path / "train" / "checkpoint-2" / "model" / "config.json").is_file()


def test_train_with_prompts_file_and_reward_import(demo_run, tmp_path, monkeypatch):
    folder, _ = demo_run
    (tmp_path / "my_rewards.py").write_text(
        "def digits_only(prompts, completions, **meta):\n"
        "    return [float(c.strip().isdigit()) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text("12+30=\n45+45=\n")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": str(folder / "model"), "device": "cpu", "prompts": str(tmp_path / "prompts.txt"),
        "reward": "my_rewards:no_such_function", "iterations": 1, "num_generations": 2,
        "max_new_tokens": 4, "progress": False, "output_dir": str(tmp_path / "train"),
    }))  # fmt: skip
    code, _, err = run_cli(["train", "--config", str(config)])
    assert code == 2 and "reward='my_rewards:no_such_function' cannot be imported" in err
    code, _, err = run_cli(["train", "--config", str(config), "reward=my_rewards:digits_only"])
    assert code == 0, err
    assert len((tmp_path / "train" / "metrics.jsonl").read_text().splitlines()) == 1


def test_train_on_an_env(demo_run, tmp_path):
    folder, _ = demo_run
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {folder / 'model'}\ndevice: cpu\nenv: alignkit/GuessNumber-v0\nenv_kwargs: {{high: 8}}\n"
        f"algorithm: ppo\niterations: 1\nprompts_per_iteration: 2\nnum_generations: 2\nmax_new_tokens: 3\n"
        f"max_turns: 2\nmax_total_tokens: 48\nprogress: false\noutput_dir: {tmp_path / 'train'}\n"
    )
    code, _, err = run_cli(["train", "--config", str(config)])
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= row["env/steps"] <= 8 and "value/loss" in row


@pytest.mark.parametrize(
    ("lines", "overrides", "message"),
    [
        ("task: addition\n", [], "model is required"),
        ("MODEL\nenv: alignkit/NoSuch-v0\n", [], "env 'alignkit/NoSuch-v0' is not a registered"),
        ("MODEL\nenv: alignkit/GuessNumber-v0\ntask: addition\n", [], "env brings its own prompts"),
        ("model: /no/such/model\ntask: addition\n", [], "model '/no/such/model': no such folder"),
        ("MODEL\ntask: addition\n", ["lr=1e-4"], "unknown config key(s) ['lr']"),
        ("MODEL\ntask: addition\n", ["learning_rate=-1"], "learning_rate"),
        ("MODEL\ntask: subtraction\n", [], "task must be one of ['addition'], got 'subtraction'"),
        ("MODEL\n", [], "prompts and reward missing"),
        ("MODEL\ntask: addition\n", ["reward_weights=[1]"], "reward_weights must be a list of 2 numbers"),
        ("MODEL\ntask: [addition\n", [], "is not valid YAML"),
        ("MODEL\ntask: addition\n", ["iterations"], "overrides must look like key=value"),
    ],
)
def test_train_config_errors_name_the_key(demo_run, tmp_path, lines, overrides, message):
    folder, _ = demo_run
    config = tmp_path / "run.yaml"
    config.write_text(lines.replace("MODEL", f"model: {folder / 'model'}"))
    code, _, err = run_cli(["train", "--config", str(config), *overrides])
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_missing_config_file(tmp_path):
    code, _, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "no such file" in err


# ----------------------------------------------------------------------------- bad demo input


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_demo_unknown_algo():
    code, _, err = run_cli(["demo", "--algo", "ppo-lagrangian"])
    _one_line_error(code, err, "argument --algo: invalid choice: 'ppo-lagrangian'")


def test_demo_missing_model_folder(tmp_path):
    code, _, err = run_cli(["demo", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o")])
    _one_line_error(code, err, f"model '{tmp_path / 'no-model'}': no such folder")


def test_demo_folder_that_is_not_a_model(tmp_path):
    code, _, err = run_cli(["demo", "--model", str(tmp_path), "--output", str(tmp_path / "o")])
    _one_line_error(code, err, "is not a saved model folder (no config.json in it)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_demo_cuda_without_cuda(tmp_path):
    code, _, err = run_cli(["demo", "--device", "cuda", "--output", str(tmp_path / "o")])
    _one_line_error(code, err, "device='cuda' but this machine has no usable CUDA device")


def test_demo_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(["demo", "--output", str(blocker / "out")])
    _one_line_error(code, err, f"cannot write the output folder '{blocker / 'out'}'")


def test_demo_bad_override_names_the_key(tmp_path):
    code, _, err = run_cli(["demo", "--output", str(tmp_path), "temprature=0.8"])
    _one_line_error(code, err, "unknown key(s) ['temprature']")
    code, _, err = run_cli(["demo", "--output", str(tmp_path), "temperature=-1"])
    _one_line_error(code, err, "temperature")
