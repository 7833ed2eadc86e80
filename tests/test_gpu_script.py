"""bench/gpu.sh, the first GPU run, checked on CPU (issue 15): it parses, its dry run lists the stages
of its budget table in order within 8 minutes, and its stage machinery records skips, budget cuts
and per-case results in files. The helpers it runs are checked at the smallest size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"
STAGE = re.compile(r"^(\d-[a-z0-9]+)\s+(\d+)\s+(.*)$")


def _run(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    # The interpreter's bin/ first: torchrun is found where this torch installed it.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(SCRIPT)], env={**os.environ, "PATH": path, "PYTHON": sys.executable, **env},
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def _dry_run(**env: str) -> list[tuple[str, int, str]]:
    proc = _run({"GPU_SH_DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return [(m[1], int(m[2]), m[3]) for line in proc.stdout.splitlines() if (m := STAGE.match(line))]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_the_budget_table_in_order(tmp_path):
    stages = _dry_run(OUT=str(tmp_path))
    text = SCRIPT.read_text()
    table = [
        (m[1], int(m[2]))
        for line in text.splitlines()
        if (m := re.match(r"^#\s+(\d-[a-z0-9]+)\s+(\d+)\s", line))
    ]
    assert [(name, limit) for name, limit, _ in stages] == table
    names = [name for name, _, _ in stages]
    assert names[:5] == ["0-env", "0-build", "0-info", "1-kernels", "1-syncfree"]
    assert names == sorted(names, key=lambda n: n[0])  # stage 0, then 1, 2, 3, 4
    total = sum(limit for _, limit, _ in stages)
    assert total <= 450, f"the stages may take {total} s: over the 8-minute plan"
    assert re.search(rf'BUDGET="\$\{{GPU_SH_BUDGET_S:-{total}\}}"', text)
    assert not list(tmp_path.iterdir()), "a dry run must write nothing"
    commands = dict((name, command) for name, _, command in stages)
    assert "--no-build-isolation --no-deps" in commands["0-build"]
    assert "ALIGNKIT_PIN_CONFIG=1" in commands["1-kernels"] and "ALIGNKIT_PIN_CONFIG=1" in commands["3-tests"]
    for name in ("2-logprobs", "2-gae", "3-losses", "3-rollout"):
        assert f"--benchmark-json={tmp_path}/{name}.json" in commands[name]
        assert f"GPU_BENCH_JSONL={tmp_path}/{name}.jsonl" in commands[name]


def test_nothing_hides_a_failure():
    code = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert "|| true" not in code and "2>/dev/null || :" not in code


def test_stage_selection():
    assert [name for name, _, _ in _dry_run(GPU_SH_STAGES="1")] == ["1-kernels", "1-syncfree"]
    assert [name for name, _, _ in _dry_run(GPU_SH_STAGES="2-gae 3-fsdp2")] == ["2-gae", "3-fsdp2"]


def test_a_skipped_stage_and_a_spent_budget_are_recorded(tmp_path):
    """3-fsdp2 without CUDA exits 77 (skipped, not a failure); with no budget left, a stage is
    marked not-run and the script fails."""
    if sys.platform != "linux" or not Path("/usr/bin/timeout").exists():
        pytest.skip("needs GNU coreutils timeout")
    out = tmp_path / "run"
    proc = _run({"OUT": str(out), "GPU_SH_STAGES": "3-fsdp2"})
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert rows[0] == ["stage", "status", "exit", "seconds", "limit"]
    if rows[1][1] == "skipped":  # no CUDA here (or no torchrun): the expected case on CPU machines
        assert rows[1][:3] == ["3-fsdp2", "skipped", "77"] and proc.returncode == 0, proc.stdout
        assert json.loads((out / "3-fsdp2.json").read_text())["status"] == "skipped"
    assert (out / "summary.md").read_text().startswith("# bench/gpu.sh summary")
    proc = _run({"OUT": str(out), "GPU_SH_STAGES": "0-info", "GPU_SH_BUDGET_S": "5"})
    assert proc.returncode == 1
    assert (out / "summary.tsv").read_text().splitlines()[-1].split("\t")[:2] == ["0-info", "not-run"]


def test_kernel_pass_writes_one_line_per_case(tmp_path):
    out = tmp_path / "kernels.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_kernels.py"), "--out", str(out), "--device", "cpu",
         "-k", "gae padded"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ALIGNKIT_PIN_CONFIG": "1", "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["ok"] and record["case"].startswith("gae padded") and record["outputs"] == 2


def test_benchmark_cases_are_written_as_they_end(tmp_path):
    """bench/gpu_bench_jsonl.py: one JSON line per case, with its statistics, skips included."""
    (tmp_path / "bench_toy.py").write_text(
        "import pytest\n"
        "def test_fast(benchmark):\n"
        "    benchmark.extra_info['provider'] = 'toy'\n"
        "    benchmark.pedantic(sum, args=([1, 2],), rounds=3)\n"
        "def test_skipped(benchmark):\n"
        "    pytest.skip('peer toy unavailable')\n"
    )
    sink = tmp_path / "cases.jsonl"
    env = {**os.environ, "GPU_BENCH_JSONL": str(sink), "PYTHONPATH": str(REPO / "bench")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "gpu_bench_jsonl", "-p", "no:cacheprovider",
         "-o", "python_files=bench_*.py", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fast, skipped = [json.loads(line) for line in sink.read_text().splitlines()]
    assert fast["outcome"] == "passed" and fast["extra_info"] == {"provider": "toy"}
    assert fast["stats"]["rounds"] == 3 and fast["stats"]["median"] > 0
    assert skipped["outcome"] == "skipped" and "peer toy unavailable" in skipped["reason"]


def test_pinned_configs_keep_the_first_config(monkeypatch):
    from alignkit import kernels

    configs = ["first", "second", "third"]  # stand-ins for triton.Config objects
    monkeypatch.delenv(kernels.PIN_CONFIG_ENV_VAR, raising=False)
    assert kernels.pinned_configs(configs) == configs and not kernels.config_pinned()
    for value in ("1", "true", "ON"):
        monkeypatch.setenv(kernels.PIN_CONFIG_ENV_VAR, value)
        assert kernels.pinned_configs(configs) == ["first"]
    monkeypatch.setenv(kernels.PIN_CONFIG_ENV_VAR, "0")
    assert kernels.pinned_configs(configs) == configs
    with pytest.raises(ValueError, match="configs must hold at least one autotune config"):
        kernels.pinned_configs([])
