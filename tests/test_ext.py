"""The compiled extension: loads, matches the Python side's ABI, and fails clearly when stale."""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
import types
from pathlib import Path

import pytest

import alignkit
from alignkit import _ext

REPO = Path(__file__).resolve().parents[1]


def test_extension_loads_and_reports_build_info():
    module = _ext.load()
    assert module.ABI_VERSION == _ext.EXPECTED_ABI
    assert module.__version__ == alignkit.__version__
    info = module.build_info()
    assert info["abi"] == _ext.EXPECTED_ABI and info["cplusplus"] >= 201703
    loaded, detail = _ext.status()
    assert loaded and "_C" in detail


def test_abi_number_agrees_with_the_cpp_header():
    header = (REPO / "csrc" / "core" / "version.h").read_text()
    match = re.search(r"#define ALIGNKIT_EXT_ABI (\d+)", header)
    assert match is not None and int(match.group(1)) == _ext.EXPECTED_ABI


def test_version_agrees_with_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == alignkit.__version__


def test_stale_extension_is_a_clear_error(monkeypatch):
    stale = types.ModuleType("alignkit._C")
    stale.ABI_VERSION = _ext.EXPECTED_ABI - 1
    stale.__version__ = "0.0.0"
    monkeypatch.setitem(sys.modules, "alignkit._C", stale)
    with pytest.raises(_ext.ExtensionError, match=r"stale.*pip install -e \."):
        _ext._import_and_check()


# Run in a fresh interpreter where alignkit._C cannot be imported: alignkit itself imports and its ops
# run; the replay buffer fails with the one clear error. Prints the error's last line.
_WITHOUT_EXTENSION = """
import torch
import alignkit
from alignkit import _ext
r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
adv, ret = alignkit.gae(r, v, m, gamma=0.9, lam=0.8)
assert adv.shape == (2, 5)
loss, _ = alignkit.ppo_policy_loss(r, r, v, m)
assert torch.isfinite(loss)
loaded, detail = _ext.status()
assert not loaded and "could not be imported" in detail, detail
for attempt in range(2):  # the same error on every use, without a second import attempt
    try:
        alignkit.ReplayBuffer({"tokens": torch.int32}, capacity_tokens=64)
    except ImportError as exc:
        assert type(exc) is _ext.ExtensionError, type(exc)
        print(str(exc))
    else:
        raise SystemExit("ReplayBuffer was built without the extension")
"""


def _assert_one_clear_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], proc.stdout
    assert (
        "could not be imported" in lines[0] and "pip install --no-build-isolation --no-deps -e ." in lines[0]
    )
    assert "replay buffer" in lines[0]


def test_import_works_without_the_extension():
    """A failed C++ build must not take the ops and kernels down with it (issue 15): a loader that
    cannot find alignkit._C (simulated by an import hook) leaves ``import alignkit`` working."""
    block = (
        "import importlib.abc, sys\n"
        "class _NoExtension(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'alignkit._C':\n"
        "            raise ImportError('simulated: no alignkit._C')\n"
        "sys.meta_path.insert(0, _NoExtension())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", block + _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300
    )
    _assert_one_clear_error(proc)
    assert "simulated: no alignkit._C" in proc.stdout


def test_unbuilt_source_tree_imports_and_the_buffer_says_how_to_rebuild(tmp_path):
    """An unbuilt source tree imports; using the replay buffer names the problem and the rebuild
    command."""
    tree = tmp_path / "src"
    shutil.copytree(
        REPO / "alignkit",
        tree / "alignkit",
        symlinks=False,
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    # -S: no .pth processing, so an editable install's import redirect cannot serve the build;
    # site-packages is added back by hand for torch and friends.
    code = f"import sys; sys.path[:0] = {[str(tree), *site.getsitepackages()]!r}\n" + _WITHOUT_EXTENSION
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300)
    _assert_one_clear_error(proc)
