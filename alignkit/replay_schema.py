"""Schema and batch types of the replay buffer (:class:`alignkit.ReplayBuffer`).

Field declarations (:class:`TokenField`, :class:`SequenceField`) with their dtype conversions
(torch <-> NumPy <-> the core's dtype codes) and pad values, :class:`Batch`, the torch tensors
that every copy out of the buffer returns, and the translation of both to and from the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _checks, _ext

__all__ = ["Batch", "SequenceField", "TokenField"]

TORCH_TO_NUMPY = {
    torch.bool: "bool",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}
NUMPY_TO_TORCH = {v: k for k, v in TORCH_TO_NUMPY.items()}  # storable dtype name -> torch dtype
NUMPY_DTYPE_TO_TORCH = {np.dtype(v): k for k, v in TORCH_TO_NUMPY.items()}  # dtype.name is slow
LAYOUTS = ("padded", "packed")
_RESERVED = frozenset(
    {
        "ids",
        "lengths",
        "attention_mask",
        "cu_seqlens",
        "position_ids",
        "weights",
        "priority",
        "priorities",
        "mask",
    }
)


def numpy_dtype(dtype: Any, name: str) -> np.dtype:
    """The NumPy dtype of a schema dtype given as torch.dtype, NumPy dtype or string (TypeError for
    None or a dtype the buffer cannot store)."""
    if isinstance(dtype, torch.dtype):
        dtype_name = TORCH_TO_NUMPY.get(dtype)
    elif dtype is None:  # np.dtype(None) is float64: never guess a dtype
        dtype_name = None
    else:
        try:
            dtype_name = np.dtype(dtype).name
        except (TypeError, ValueError):
            dtype_name = None
    if dtype_name not in NUMPY_TO_TORCH:
        raise TypeError(f"{name} must be one of {sorted(NUMPY_TO_TORCH)} (torch or NumPy), got {dtype!r}")
    return np.dtype(dtype_name)


def pad_bytes(value: Any, dtype: np.dtype, name: str) -> bytes:
    """A pad value as the bytes of one element of ``dtype``; TypeError for a non-number (or a bool
    for a non-bool field), ValueError for a value that does not fit. Floats may pad with inf/NaN."""
    if isinstance(value, torch.Tensor):
        value = _checks.tensor(value, name)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if isinstance(value, (bool, np.bool_)) and dtype.kind != "b":
        raise TypeError(f"{name} must be a number for dtype {dtype.name}, got bool {value!r}")
    if dtype.kind in "biu":
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise ValueError(f"{name} must be an integer for dtype {dtype.name}, got {value!r}")
        if dtype.kind == "b":
            if value not in (0, 1):
                raise ValueError(f"{name} must be 0/1/False/True for dtype bool, got {value!r}")
        else:
            info = np.iinfo(dtype)
            if not info.min <= int(value) <= info.max:
                raise ValueError(f"{name} = {value!r} does not fit in {dtype.name} [{info.min}, {info.max}]")
        return np.array(int(value), dtype=dtype).tobytes()
    try:
        with np.errstate(over="ignore"):
            cast = np.array(value, dtype=dtype)
        overflow = bool(np.isinf(cast)) and bool(np.isfinite(float(value)))
    except OverflowError:
        overflow = True
    if overflow:
        raise ValueError(f"{name} = {value!r} is out of range for {dtype.name}")
    return cast.tobytes()


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"field names must be str, got {type(name).__name__} {name!r}")
    if not name.isidentifier():
        raise ValueError(f"field names must be Python identifiers, got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"field name {name!r} is reserved (reserved: {sorted(_RESERVED)})")


@dataclass(frozen=True)
class TokenField:
    """A per-token field: one value per token of every sequence (tokens, logprobs, masks...)."""

    name: str  # key used in add(...) and in batches
    dtype: Any = torch.float32  # torch or NumPy dtype; bfloat16 is not storable
    pad: float | int | bool = 0  # default pad value in padded batches

    def __post_init__(self) -> None:
        _check_name(self.name)
        dtype = numpy_dtype(self.dtype, f"dtype of field {self.name!r}")
        object.__setattr__(self, "dtype", NUMPY_TO_TORCH[dtype.name])
        pad_bytes(self.pad, dtype, f"pad of field {self.name!r}")


@dataclass(frozen=True)
class SequenceField:
    """A per-sequence field: one value per sequence (score, group id, policy version, prompt length...)."""

    name: str  # key used in add(...) and in batches
    dtype: Any = torch.float32  # torch or NumPy dtype

    def __post_init__(self) -> None:
        _check_name(self.name)
        dtype = numpy_dtype(self.dtype, f"dtype of field {self.name!r}")
        object.__setattr__(self, "dtype", NUMPY_TO_TORCH[dtype.name])


def declared_fields(spec: Any, cls: type, name: str) -> list:
    """The ``cls`` objects declared by ``spec``: a list of them, or a ``{name: dtype}`` mapping."""
    if isinstance(spec, Mapping):
        return [cls(field_name, dtype) for field_name, dtype in spec.items()]
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__"):
        got = "None" if spec is None else type(spec).__name__
        raise TypeError(f"{name} must be a list of {cls.__name__} or a name -> dtype mapping, got {got}")
    out = []
    for f in spec:
        if not isinstance(f, cls):
            raise TypeError(
                f"{name} must hold {cls.__name__} objects (or be a name -> dtype mapping), got {f!r}"
            )
        out.append(f)
    return out


def role_indices(
    token_fields: list, sequence_fields: list, *, group_field: Any, version_field: Any
) -> tuple[int, int]:
    """Indices into ``sequence_fields`` of the group and version fields (-1 for None), after checking
    that field names are unique and that each role names an integer per-sequence field."""
    names = [f.name for f in (*token_fields, *sequence_fields)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate field names: {dup}")
    seq_names = [f.name for f in sequence_fields]
    roles = []
    for role, name in (("group_field", group_field), ("version_field", version_field)):
        if name is None:
            roles.append(-1)
            continue
        if not isinstance(name, str):
            raise TypeError(f"{role} must be a field name (str) or None, got {type(name).__name__}")
        if name not in seq_names:
            raise ValueError(f"{role}={name!r} is not a per-sequence field (have {seq_names})")
        f = sequence_fields[seq_names.index(name)]
        if f.dtype.is_floating_point:
            raise TypeError(f"{role}={name!r} must have an integer dtype, got {f.dtype}")
        roles.append(seq_names.index(name))
    return roles[0], roles[1]


# ----------------------------------------------------------------------------- the core's schema


def dtype_codes() -> dict[str, int]:
    """NumPy dtype name -> the core's dtype code."""
    return _ext.load().replay_dtype_codes()


def core_field_specs(fields: tuple | list) -> list[tuple[str, int, bytes]]:
    """``(name, dtype code, pad bytes)`` per field, as ``ReplayBufferCore`` takes them (per-sequence
    fields have no pad: zero bytes)."""
    codes = dtype_codes()
    specs = []
    for f in fields:
        dtype = numpy_dtype(f.dtype, f"dtype of field {f.name!r}")
        pad = pad_bytes(f.pad, dtype, f"pad of field {f.name!r}") if isinstance(f, TokenField) else None
        specs.append((f.name, codes[dtype.name], pad if pad is not None else bytes(dtype.itemsize)))
    return specs


def fields_from_core(token_specs: list, sequence_specs: list) -> tuple[tuple, tuple]:
    """``(token_fields, sequence_fields)`` rebuilt from the core's ``schema()`` specs."""
    names = {code: name for name, code in dtype_codes().items()}
    token_fields = tuple(
        TokenField(n, NUMPY_TO_TORCH[names[c]], np.frombuffer(pad, dtype=names[c])[0].item())
        for n, c, pad in token_specs
    )
    sequence_fields = tuple(SequenceField(n, NUMPY_TO_TORCH[names[c]]) for n, c, _ in sequence_specs)
    return token_fields, sequence_fields


# ----------------------------------------------------------------------------- batches


def _optional_tensor(value: Any, name: str) -> torch.Tensor | None:
    return None if value is None else _checks.tensor(value, name)


@dataclass
class Batch:
    """Sequences copied out of the buffer, as torch tensors (B sequences, N = sum of lengths).

    padded layout: ``fields[name]`` is (B, T) for per-token fields (T = longest length), with
    ``attention_mask`` (B, T) bool; packed layout: ``fields[name]`` is (N,), with ``cu_seqlens``
    (B + 1,) int32 and ``position_ids`` (N,) int64 (0..len-1 per sequence). Per-sequence fields are
    (B,). ``weights`` (B,) float32: importance weights, prioritized sampling only.
    """

    ids: torch.Tensor  # (B,) int64
    lengths: torch.Tensor  # (B,) int64
    fields: dict[str, torch.Tensor]
    layout: str  # "padded" or "packed"
    max_seqlen: int  # T (padded) / longest sequence (packed)
    attention_mask: torch.Tensor | None = None  # (B, T) bool, padded only
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32, packed only
    position_ids: torch.Tensor | None = None  # (N,) int64, packed only
    weights: torch.Tensor | None = None  # (B,) float32, prioritized only

    def __post_init__(self) -> None:
        # Type and shape checks only: no reduction, no device sync.
        ids = _checks.integer_tensor(self.ids, "ids")
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D (B,), got shape {tuple(ids.shape)}")
        _checks.same_shape(_checks.integer_tensor(self.lengths, "lengths"), "lengths", ids, "ids")
        if not isinstance(self.fields, dict):
            raise TypeError(f"fields must be a dict of name -> tensor, got {type(self.fields).__name__}")
        for name, value in self.fields.items():
            if not isinstance(name, str):
                raise TypeError(f"fields keys must be str, got {type(name).__name__} {name!r}")
            _checks.tensor(value, f"fields[{name!r}]")
        _checks.choice(self.layout, "layout", LAYOUTS)
        self.max_seqlen = _checks.non_negative_int(self.max_seqlen, "max_seqlen")
        extras = {"attention_mask": "padded", "cu_seqlens": "packed", "position_ids": "packed"}
        for name, layout in extras.items():
            value = _optional_tensor(getattr(self, name), name)
            if (value is None) == (layout == self.layout):
                needs = "needs" if value is None else "must not have"
                raise ValueError(f"a {self.layout} batch {needs} {name}")
        if _optional_tensor(self.weights, "weights") is not None:
            _checks.same_shape(self.weights, "weights", ids, "ids")

    def __getitem__(self, name: str) -> torch.Tensor:
        """The field ``name``'s tensor (KeyError naming the fields for an unknown name)."""
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"the batch has no field {name!r}; fields: {sorted(self.fields)}") from None

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def num_tokens(self) -> int:
        """N: the tokens of all sequences (sum of lengths)."""
        return int(self.lengths.sum())

    def pin_memory(self) -> Batch:
        """This batch with every tensor copied to pinned host memory (needs CUDA); returns self."""
        for name in ("ids", "lengths", "attention_mask", "cu_seqlens", "position_ids", "weights"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.pin_memory())
        self.fields = {k: v.pin_memory() for k, v in self.fields.items()}
        return self


def empty_batch(
    ids: np.ndarray, lengths: np.ndarray, token_fields: tuple, sequence_fields: tuple, layout: str, pin: bool
) -> Batch:
    """A :class:`Batch` of the sequences ``ids`` (with ``lengths``) whose tensors are allocated
    (pinned when ``pin``) but not filled: the core's ``gather_into`` writes their NumPy views."""
    B = int(ids.size)
    padded = layout == "padded"
    max_len = int(lengths.max()) if B else 0
    length = max_len if padded else int(lengths.sum())
    shape = (B, length) if padded else (length,)
    fields = {f.name: torch.empty(shape, dtype=f.dtype, pin_memory=pin) for f in token_fields}
    fields.update({f.name: torch.empty(B, dtype=f.dtype, pin_memory=pin) for f in sequence_fields})
    ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    if pin:
        ids_t, lengths_t = ids_t.pin_memory(), lengths_t.pin_memory()
    return Batch(
        ids_t,
        lengths_t,
        fields,
        layout,
        max_len,
        attention_mask=torch.empty(shape, dtype=torch.bool, pin_memory=pin) if padded else None,
        cu_seqlens=None if padded else torch.empty(B + 1, dtype=torch.int32, pin_memory=pin),
        position_ids=None if padded else torch.empty(length, dtype=torch.int64, pin_memory=pin),
    )


def batch_from_core(out: dict[str, Any], token_fields: tuple, sequence_fields: tuple, layout: str) -> Batch:
    """A :class:`Batch` wrapping (zero-copy) the arrays of one core sample/gather result."""
    fields = {f.name: torch.from_numpy(a) for f, a in zip(token_fields, out["token_fields"], strict=True)}
    fields.update(
        {f.name: torch.from_numpy(a) for f, a in zip(sequence_fields, out["sequence_fields"], strict=True)}
    )
    packed = layout == "packed"
    return Batch(
        ids=torch.from_numpy(out["ids"]),
        lengths=torch.from_numpy(out["lengths"]),
        fields=fields,
        layout=layout,
        max_seqlen=int(out["max_length"]),
        attention_mask=None if packed else torch.from_numpy(out["attention_mask"]),
        cu_seqlens=torch.from_numpy(out["cu_seqlens"]) if packed else None,
        position_ids=torch.from_numpy(out["position_ids"]) if packed else None,
        weights=torch.from_numpy(out["weights"]) if "weights" in out else None,
    )
