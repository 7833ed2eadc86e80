"""Build and run the C++ unit test of the replay buffer core under ASan + UBSan (~15 s).

The same target from the top-level build: cmake -DALIGNKIT_BUILD_TESTS=ON -DALIGNKIT_SANITIZE=ON.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake and a C++17 compiler")
def test_core_unit_test_under_sanitizers(tmp_path: Path) -> None:
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT / "csrc" / "tests"),
            "-B",
            str(build),
            *generator,
            "-DALIGNKIT_SANITIZE=ON",
            "-DCMAKE_BUILD_TYPE=Debug",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(
        ["cmake", "--build", str(build), "--parallel", "2"], capture_output=True, text=True, env=env
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    run = subprocess.run(
        [str(build / "test_replay_core")], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
    assert "runtime error" not in run.stderr  # UBSan reports (fatal anyway with -fno-sanitize-recover)
