"""Every code block of the README runs as written: the python blocks in-process; the bash blocks
command by command in a scratch folder, with the YAML and python files they name written from the
README's own blocks (a block whose first line is ``# <file name>`` is that file). Long runs are
shortened by appending overrides (the last value of a key wins), never by changing the command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

# Appended to the README's commands so the test runs them in seconds.
SHORT_DEMO = [
    "--iterations",
    "2",
    "--warm-start-steps",
    "5",
    "--held-out",
    "8",
    "--eval-every",
    "1",
    "--no-progress",
]
SHORT_TRAIN = [
    "iterations=2",
    "prompts_per_iteration=2",
    "num_generations=2",
    "max_new_tokens=4",
    "progress=false",
]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _named_files() -> dict[str, str]:
    """Blocks whose first line is ``# <name>`` (run.yaml, train.py, ...), by file name."""
    files = {}
    for language in ("yaml", "python"):
        for block in _blocks(language):
            first = block.splitlines()[0] if block.strip() else ""
            match = re.match(r"#\s*([\w.-]+\.(?:yaml|py))\b", first)
            if match:
                files[match.group(1)] = block
    return files


def _commands() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()  # no command of ours uses '#' itself
            if line:
                lines.append(line)
    return lines


def test_readme_python_blocks_run(capsys):
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert "loss " in capsys.readouterr().out


def test_readme_bash_blocks_run(tmp_path):
    files = _named_files()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    ran = []
    # The demo first: `alignkit train` continues the model it writes.
    commands = sorted(_commands(), key=lambda c: not c.startswith("alignkit demo"))
    for command in commands:
        argv = shlex.split(command)
        if argv[:1] == ["make"]:
            # The two fresh-machine entry points: `.ci/run` runs `make test` on a clean clone and
            # `make demo` is `alignkit demo` (run below) after the same setup. Check the targets exist.
            assert re.search(rf"^{argv[1]}:", (ROOT / "Makefile").read_text(), re.M), command
            continue
        if argv[:2] == ["alignkit", "demo"]:
            argv += SHORT_DEMO
        elif argv[:2] == ["alignkit", "train"]:
            config = argv[argv.index("--config") + 1]
            assert config in files, f"{command}: the README has no block named {config}"
            (tmp_path / config).write_text(files[config])
            argv += SHORT_TRAIN
        elif argv[:1] == ["torchrun"]:
            script = next(a for a in argv if a.endswith(".py"))
            assert script in files, f"{command}: the README has no block named {script}"
            (tmp_path / script).write_text(files[script])
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        elif argv[:2] not in (["alignkit", "info"], ["alignkit", "smoke"]):
            pytest.fail(f"README bash command {command!r} has no runner in tests/test_readme.py")
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        ran.append(argv[0])
    assert "alignkit" in ran
