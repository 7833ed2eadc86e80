"""Swap a peer library's functions for alignkit's, and back: the machinery behind
``alignkit.compat.verl.patch()`` and ``alignkit.compat.trl.patch()``.

A peer defines a function in one module and other modules re-import it by name
(``from verl.trainer.ppo.core_algos import agg_loss``), so replacing the defining module's
attribute alone misses every copy imported before the patch. :func:`replace_everywhere` therefore
scans every imported module of the peer package for attributes that *are* the original object
(identity, not name: a different function that happens to share the name is left alone) and
records each replacement in a :class:`PatchHandle`, whose :meth:`PatchHandle.restore` puts the
originals back in reverse order.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from types import ModuleType
from typing import Any

MISSING = object()  # "no such attribute": what restore() puts back by deleting the attribute


class PatchWarning(UserWarning):
    """patch() could not do its work (the peer is not installed or does not import) and did nothing."""


class PatchHandle:
    """The replacements one ``patch()`` call made; :meth:`restore` undoes them (also on leaving a
    ``with`` block). Restoring twice is a no-op.

    Attributes:
        peer: the peer package name ("verl", "trl").
        replaced: ``"<where>.<name>"`` of every replacement, in the order made.
    """

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.replaced: list[str] = []
        self._undo: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        """True while at least one replacement is in place."""
        return bool(self._undo)

    def set_attribute(self, target: Any, name: str, value: Any) -> None:
        """``setattr(target, name, value)``, remembering what was there (a module or a class)."""
        original = target.__dict__.get(name, MISSING) if hasattr(target, "__dict__") else MISSING

        def undo() -> None:
            if original is MISSING:
                delattr(target, name)
            else:
                setattr(target, name, original)

        setattr(target, name, value)
        self._undo.append(undo)
        self.replaced.append(f"{getattr(target, '__name__', type(target).__name__)}.{name}")

    def set_item(self, mapping: MutableMapping[Any, Any], key: Any, value: Any, where: str) -> None:
        """``mapping[key] = value`` for an existing key (a registry entry), remembering the old value."""
        original = mapping[key]

        def undo() -> None:
            mapping[key] = original

        mapping[key] = value
        self._undo.append(undo)
        self.replaced.append(f"{where}[{key!r}]")

    def restore(self) -> None:
        """Put every original back, last replacement first."""
        while self._undo:
            self._undo.pop()()
        self.replaced.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"PatchHandle(peer={self.peer!r}, replaced={len(self.replaced)})"


def import_peer(peer: str, modules: Iterable[str]) -> dict[str, ModuleType] | None:
    """Import the peer's defining modules; None (after a :class:`PatchWarning`) when the peer is not
    installed or fails to import, so that ``patch()`` is a no-op there."""
    loaded = {}
    for name in modules:
        try:
            loaded[name] = importlib.import_module(name)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or ""
            if missing == peer or missing.startswith(peer + "."):
                reason = f"{peer} is not installed"
            else:
                reason = f"{name} failed to import ({type(exc).__name__}: {exc})"
            warnings.warn(f"alignkit.compat.{peer}.patch() did nothing: {reason}", PatchWarning, stacklevel=3)
            return None
    return loaded


def peer_modules(peer: str) -> list[ModuleType]:
    """The imported modules of package ``peer`` (the package itself and its submodules)."""
    prefix = peer + "."
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType) and (name == peer or name.startswith(prefix))
    ]


def is_alignkit_function(value: object) -> bool:
    """True for a function alignkit defines (a second patch() must not treat it as an original)."""
    return str(getattr(value, "__module__", "")).startswith("alignkit.")


def replace_everywhere(handle: PatchHandle, replacements: dict[int, tuple[Any, Any]]) -> None:
    """In every imported module of ``handle.peer``, replace each attribute that is one of the
    originals by its replacement. ``replacements`` maps ``id(original)`` to ``(original, new)``."""
    for module in peer_modules(handle.peer):
        for name, value in list(vars(module).items()):
            pair = replacements.get(id(value))
            if pair is not None and pair[0] is value:
                handle.set_attribute(module, name, pair[1])


def replace_in_registry(
    handle: PatchHandle, registry: object, replacements: dict[int, tuple[Any, Any]], where: str
) -> None:
    """Replace the entries of a name -> function registry (a dict) that are originals."""
    if not isinstance(registry, MutableMapping):
        return
    for key, value in list(registry.items()):
        pair = replacements.get(id(value))
        if pair is not None and pair[0] is value:
            handle.set_item(registry, key, pair[1], where)


def originals_of(module: ModuleType, names: Iterable[str], compat: ModuleType) -> dict[int, tuple[Any, Any]]:
    """``{id(original): (original, compat function)}`` for each of ``names`` that ``module`` defines
    and that is not already an alignkit function (a second patch() replaces nothing twice)."""
    found = {}
    for name in names:
        original = getattr(module, name, None)
        if original is None or is_alignkit_function(original):
            continue
        found[id(original)] = (original, getattr(compat, name))
    return found
