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


def test_missing_extension_is_one_clear_error(tmp_path):
    """Importing an unbuilt source tree names the problem and the rebuild command."""
    tree = tmp_path / "src"
    shutil.copytree(
        REPO / "alignkit",
        tree / "alignkit",
        symlinks=False,
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    # -S: no .pth processing, so an editable install's import redirect cannot serve the build;
    # site-packages is added back by hand for torch and friends.
    code = f"import sys; sys.path[:0] = {[str(tree), *site.getsitepackages()]!r}; import alignkit"
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ExtensionError" in last and "could not be imported" in last and "pip install -e ." in last
