"""Installs: no top-level `kernels` module (transformers probes that name), alignkit.kernels
ships inside the package, and `import alignkit` works from any directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, alignkit, alignkit.kernels, alignkit.kernels.gae;"
    "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels');"
    "print(alignkit.__file__)"
)


def _probe(python: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_current_install_exposes_no_top_level_kernels(tmp_path):
    """The install the tests run against (editable under `make test`), from outside the repo."""
    _probe(sys.executable, tmp_path)


@pytest.mark.slow
def test_regular_wheel_install_exposes_no_top_level_kernels(tmp_path):
    """Build a wheel offline and install it into a fresh venv that sees this one's packages."""
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("alignkit-*.whl")
    site_dir = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site_dir), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    # -S skips .pth files, so the editable install's import redirect cannot shadow the wheel;
    # this environment's site-packages is added back (after the wheel) for torch and friends.
    code = f"import sys; sys.path[:0] = {[str(site_dir), *site.getsitepackages()]!r}; " + PROBE
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(site_dir)), proc.stdout


def test_numba_loads_only_for_large_cpu_passes():
    """numba (~120 MiB resident with LLVM) loads with the first numba-backed CPU op, not with
    ``import alignkit``; small loss passes (policy, value, fused, forward and backward) and scans
    (GAE, discounted returns) run the torch twins and never load it; a large one does."""
    code = (
        "import sys, torch, alignkit\n"
        "assert 'numba' not in sys.modules, 'import alignkit loaded numba'\n"
        "x = torch.randn(64, 24, requires_grad=True)\n"
        "m = torch.ones(64, 24)\n"
        "loss, _ = alignkit.ppo_policy_loss(x, x.detach() + 0.1, x.detach(), m, loss_type='cispo')\n"
        "loss.backward()\n"
        "alignkit.value_loss(x, x.detach(), x.detach() + 1, m)[0].backward()\n"
        "h, w = torch.randn(4, 6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)\n"
        "a, labels = torch.randn(4, 6), torch.randint(0, 11, (4, 6))\n"
        "alignkit.fused_linear_ppo_loss(h, w, labels, a, a, torch.ones(4, 6))[0].backward()\n"
        "r = torch.randn(4, 6)\n"
        "alignkit.gae(r, r, torch.ones(4, 6)), alignkit.discounted_returns(r, torch.ones(4, 6))\n"
        "assert 'numba' not in sys.modules, 'a small CPU loss or scan loaded numba'\n"
        "x = torch.randn(256, 512)\n"
        "alignkit.ppo_policy_loss(x, x, x, torch.ones(256, 512))\n"
        "assert 'numba' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
