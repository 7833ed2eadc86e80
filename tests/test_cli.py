"""The command line: --version, info, smoke, and the demo / train subcommands (their runs: test_demo.py)."""

from __future__ import annotations

import subprocess
import sys

import alignkit
from alignkit import cli


def test_version_flag():
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"alignkit {alignkit.__version__}"


def test_info_reports_versions_extension_devices_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"alignkit      {alignkit.__version__}" in out
    for line in ("torch ", "triton ", "transformers ", "extension     loaded", "cuda "):
        assert line in out
    assert "gae " in out and "cpu / " in out


def test_smoke_runs_both_backends(capsys):
    assert cli.main(["smoke"]) == 0
    out = capsys.readouterr().out
    for op in (
        "gae_packed",
        "discounted_returns",
        "fused_linear_logprobs + ppo",
        "value_loss",
        "fused_linear_ppo_loss",
    ):
        assert op in out
    assert "smoke run OK" in out


def test_demo_and_train_are_subcommands_with_their_options(capsys):
    for argv, options in (
        (["demo", "--help"], ("--output", "--algo", "--model", "--device", "--seed", "KEY=VALUE")),
        (["train", "--help"], ("--config", "KEY=VALUE", "task (addition")),
    ):
        try:
            cli.main(argv)
        except SystemExit as exc:
            assert exc.code == 0
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (argv, option)


def test_bad_subcommand_is_one_line(capsys):
    try:
        cli.main(["dmeo"])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'dmeo'" in err and len(err.strip().splitlines()) == 1
