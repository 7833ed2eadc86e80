"""The one loader of alignkit's compiled extension (``alignkit._C``, built from csrc/).

A missing or stale build raises :class:`ExtensionError` (an ImportError) with the command that
rebuilds it, instead of an ImportError from deep inside a call. Only what needs the extension loads
it, on first use (the replay buffer and ``token_budget_minibatches``): ``import alignkit`` and the
ops and Triton kernels work without it, so a failed build on a new machine still leaves every
kernel checkable.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Must equal ALIGNKIT_EXT_ABI in csrc/core/version.h (tests/test_ext.py checks the two agree).
EXPECTED_ABI = 3

REBUILD_HINT = (
    "Rebuild it from the repository root with `pip install -e .` (offline, in an environment that "
    "already has the build requirements: `pip install --no-build-isolation --no-deps -e .`)."
)

_module: ModuleType | None = None
_error: ExtensionError | None = None  # the first failure, raised again without a second import


class ExtensionError(ImportError):
    """The compiled extension alignkit._C is missing, broken or stale."""


def load() -> ModuleType:
    """Return ``alignkit._C``, importing and validating it on first use; raise
    :class:`ExtensionError` (the same one on every later call) when it is missing or stale."""
    global _module, _error
    if _module is None:
        if _error is not None:
            raise _error
        try:
            _module = _import_and_check()
        except ExtensionError as exc:
            _error = exc
            raise
    return _module


def _import_and_check() -> ModuleType:
    from . import __version__

    try:
        module = importlib.import_module("alignkit._C")
    except ImportError as exc:
        raise ExtensionError(
            f"alignkit's compiled extension (alignkit._C) could not be imported: {exc}. "
            "The replay buffer and token_budget_minibatches need it (the ops and kernels do not). "
            "This happens when alignkit is imported from a source tree that was never built, or "
            f"after the build was removed or failed. {REBUILD_HINT}"
        ) from exc
    abi = getattr(module, "ABI_VERSION", None)
    built_version = getattr(module, "__version__", None)
    if abi != EXPECTED_ABI or built_version != __version__:
        raise ExtensionError(
            f"alignkit's compiled extension is stale: it was built for ABI {abi} / version "
            f"{built_version}, but this source needs ABI {EXPECTED_ABI} / version {__version__} "
            f"(loaded from {getattr(module, '__file__', '?')}). {REBUILD_HINT}"
        )
    return module


def status() -> tuple[bool, str]:
    """``(loaded, detail)`` for ``alignkit info``: never raises."""
    try:
        module = load()
    except ExtensionError as exc:
        return False, str(exc)
    return True, f"{module.__file__} ({module.build_info()['compiler']})"
