"""``key=value`` overrides of a dataclass config (RLConfig, the demo's config, ``alignkit train``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-4", "stop=[\\"\\\\n\\"]", "name=x"]`` -> a dict; each value parsed as JSON when it
    parses, else kept as a string (RLConfig.from_dict's rule). ValueError for an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"overrides must look like key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def apply_overrides(values: dict[str, Any], items: Iterable[str], *, known: type) -> dict[str, Any]:
    """``values`` updated by the ``key=value`` ``items``; ValueError naming any key that is not a
    field of the dataclass ``known``."""
    merged = {**values, **parse_overrides(items)}
    fields = {f.name for f in dataclasses.fields(known)}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; known keys: {sorted(fields)}")
    return merged
