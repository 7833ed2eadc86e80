"""Bad input to every public entry point of the replay buffer: one property per class of bad input
(None where data is due, wrong types, bools for numbers, NaN/inf, floats for ints, meta tensors,
out-of-range ints, bad flags and choices), parametrised over every argument it applies to. Each
must raise a clear TypeError/ValueError that names the argument, never a pybind11 signature dump,
a C++ exception name or a crash, and must leave the buffer unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignkit import Batch, ReplayBuffer, SequenceField, TokenField, _ext, token_budget_minibatches

META = "meta"


def make_buffer(**kw) -> ReplayBuffer:
    kw = {"capacity_tokens": 64, "group_field": "group_id", "version_field": "version", **kw}
    return ReplayBuffer(
        [TokenField("tokens", torch.int32, pad=-1), TokenField("logprobs", torch.float32)],
        [
            SequenceField("score", torch.float32),
            SequenceField("group_id", torch.int64),
            SequenceField("version", torch.int64),
        ],
        **kw,
    )


def one(**over) -> dict:
    return {
        "tokens": [1, 2, 3],
        "logprobs": [0.0, -1.0, -2.0],
        "score": 1.0,
        "group_id": 0,
        "version": 0,
        **over,
    }


def padded(**over) -> dict:
    base = {
        "tokens": torch.ones(2, 3, dtype=torch.int32),
        "logprobs": torch.zeros(2, 3),
        "score": torch.zeros(2),
        "group_id": torch.zeros(2, dtype=torch.int64),
        "version": torch.zeros(2, dtype=torch.int64),
        "lengths": [3, 2],
    }
    return {**base, **over}


def packed(**over) -> dict:
    base = {
        "tokens": torch.ones(5, dtype=torch.int32),
        "logprobs": torch.zeros(5),
        "score": torch.zeros(2),
        "group_id": torch.zeros(2, dtype=torch.int64),
        "version": torch.zeros(2, dtype=torch.int64),
        "cu_seqlens": [0, 3, 5],
    }
    return {**base, **over}


def make_batch(**over) -> Batch:
    kw = {
        "ids": torch.zeros(1, dtype=torch.int64),
        "lengths": torch.ones(1, dtype=torch.int64),
        "fields": {"tokens": torch.zeros(1, 1, dtype=torch.int32)},
        "layout": "padded",
        "max_seqlen": 1,
        "attention_mask": torch.ones(1, 1, dtype=torch.bool),
        **over,
    }
    return Batch(**kw)


def new_buffer(**over):
    return lambda rb: make_buffer(**over)


# Every argument of the public API: name -> call(rb, value) with only that argument set to value.
# The name (for fields: the quoted field name) must appear in the error message.
CALLS = {
    # ReplayBuffer(...)
    "capacity_tokens": lambda rb, v: make_buffer(capacity_tokens=v),
    "capacity_sequences": lambda rb, v: make_buffer(capacity_sequences=v),
    "alpha": lambda rb, v: make_buffer(alpha=v),
    "seed": lambda rb, v: make_buffer(seed=v),
    "token_fields": lambda rb, v: ReplayBuffer(v, capacity_tokens=8),
    "sequence_fields": lambda rb, v: ReplayBuffer({"t": torch.int32}, v, capacity_tokens=8),
    "group_field": lambda rb, v: make_buffer(group_field=v),
    # fields of add / add_padded / add_packed
    "add 'tokens'": lambda rb, v: rb.add(**one(tokens=v)),
    "add 'score'": lambda rb, v: rb.add(**one(score=v)),
    "add 'group_id'": lambda rb, v: rb.add(**one(group_id=v)),
    "add priority": lambda rb, v: rb.add(**one(), priority=v),
    "add_padded 'tokens'": lambda rb, v: rb.add_padded(**padded(tokens=v)),
    "add_padded 'group_id'": lambda rb, v: rb.add_padded(**padded(group_id=v)),
    "add_padded lengths": lambda rb, v: rb.add_padded(**padded(lengths=v)),
    "add_padded mask": lambda rb, v: rb.add_padded(**{**padded(), "lengths": None, "mask": v}),
    "add_padded priorities": lambda rb, v: rb.add_padded(**padded(), priorities=v),
    "add_padded padding_side": lambda rb, v: rb.add_padded(**padded(), padding_side=v),
    "add_packed 'logprobs'": lambda rb, v: rb.add_packed(**packed(logprobs=v)),
    "add_packed 'score'": lambda rb, v: rb.add_packed(**packed(score=v)),
    "add_packed cu_seqlens": lambda rb, v: rb.add_packed(**packed(cu_seqlens=v)),
    "add_packed priorities": lambda rb, v: rb.add_packed(**packed(), priorities=v),
    # sample
    "sample batch_size": lambda rb, v: rb.sample(v),
    "sample prioritized": lambda rb, v: rb.sample(1, prioritized=v),
    "sample replace": lambda rb, v: rb.sample(1, replace=v),
    "sample beta": lambda rb, v: rb.sample(1, prioritized=True, beta=v),
    "sample min_version": lambda rb, v: rb.sample(1, min_version=v),
    "sample layout": lambda rb, v: rb.sample(1, layout=v),
    "sample padding_side": lambda rb, v: rb.sample(1, padding_side=v),
    "sample pad_values": lambda rb, v: rb.sample(1, pad_values=v),
    "sample pad_values['tokens']": lambda rb, v: rb.sample(1, pad_values={"tokens": v}),
    "sample timeout": lambda rb, v: rb.sample(1, timeout=v),
    "sample min_available": lambda rb, v: rb.sample(1, min_available=v),
    "sample pin_memory": lambda rb, v: rb.sample(1, pin_memory=v),
    # sample_groups
    "sample_groups num_groups": lambda rb, v: rb.sample_groups(v),
    "sample_groups min_group_size": lambda rb, v: rb.sample_groups(1, min_group_size=v),
    "sample_groups min_version": lambda rb, v: rb.sample_groups(1, min_version=v),
    "sample_groups layout": lambda rb, v: rb.sample_groups(1, layout=v),
    "sample_groups timeout": lambda rb, v: rb.sample_groups(1, timeout=v),
    "sample_groups pin_memory": lambda rb, v: rb.sample_groups(1, pin_memory=v),
    # get / epoch
    "get ids": lambda rb, v: rb.get(v),
    "get layout": lambda rb, v: rb.get([0], layout=v),
    "get padding_side": lambda rb, v: rb.get([0], padding_side=v),
    "get skip_missing": lambda rb, v: rb.get([0], skip_missing=v),
    "get pin_memory": lambda rb, v: rb.get([0], pin_memory=v),
    "epoch batch_size": lambda rb, v: rb.epoch(v),
    "epoch max_tokens": lambda rb, v: rb.epoch(max_tokens=v),
    "epoch shuffle": lambda rb, v: rb.epoch(2, shuffle=v),
    "epoch drop_last": lambda rb, v: rb.epoch(2, drop_last=v),
    "epoch min_version": lambda rb, v: rb.epoch(2, min_version=v),
    "epoch layout": lambda rb, v: rb.epoch(2, layout=v),
    "epoch padding_side": lambda rb, v: rb.epoch(2, padding_side=v),
    "epoch pin_memory": lambda rb, v: rb.epoch(2, pin_memory=v),
    # priorities
    "update_priorities ids": lambda rb, v: rb.update_priorities(v, [1.0]),
    "update_priorities priorities": lambda rb, v: rb.update_priorities([0], v),
    "update_priorities ignore_missing": lambda rb, v: rb.update_priorities([0], [1.0], ignore_missing=v),
    "priorities ids": lambda rb, v: rb.priorities(v),
    # persistence
    "save path": lambda rb, v: rb.save(v),
    "load path": lambda rb, v: ReplayBuffer.load(v),
    # token_budget_minibatches
    "token_budget_minibatches lengths": lambda rb, v: token_budget_minibatches(v, 8),
    "token_budget_minibatches max_tokens": lambda rb, v: token_budget_minibatches([1, 2], v),
    "token_budget_minibatches padded": lambda rb, v: token_budget_minibatches([1, 2], 8, padded=v),
    # schema and batch types
    "TokenField name": lambda rb, v: TokenField(v),
    "TokenField dtype of field 't'": lambda rb, v: TokenField("t", v),
    "TokenField pad of field 't'": lambda rb, v: TokenField("t", torch.int32, pad=v),
    "SequenceField dtype of field 's'": lambda rb, v: SequenceField("s", v),
    "mapping dtype of field 't'": lambda rb, v: ReplayBuffer({"t": v}, capacity_tokens=8),
    "Batch ids": lambda rb, v: make_batch(ids=v),
    "Batch lengths": lambda rb, v: make_batch(lengths=v),
    "Batch fields": lambda rb, v: make_batch(fields=v),
    "Batch layout": lambda rb, v: make_batch(layout=v),
    "Batch max_seqlen": lambda rb, v: make_batch(max_seqlen=v),
    "Batch attention_mask": lambda rb, v: make_batch(attention_mask=v),
    "Batch weights": lambda rb, v: make_batch(weights=v),
}


def argument_name(key: str) -> str:
    """What the message must mention: the last word of the key (``name`` -> "field names")."""
    name = key.split(" ", 1)[1] if " " in key else key
    return "field names" if name == "name" else name


def assert_clear_error(key: str, value, exc: type[Exception]) -> None:
    rb = make_buffer()
    for k in range(3):
        rb.add(**one(group_id=k))
    before = (rb.live_ids, rb.num_tokens)
    value = value() if callable(value) else value
    with pytest.raises(exc) as info:
        CALLS[key](rb, value)
    message = str(info.value)
    assert argument_name(key) in message, message
    for dump in ("incompatible function arguments", "std::", "Unable to cast", "Invoked with"):
        assert dump not in message, message
    assert (rb.live_ids, rb.num_tokens) == before  # nothing half-added


def cases(values: dict[str, list], exc: type[Exception]) -> list:
    def label(v) -> str:
        return "meta tensor" if callable(v) else repr(v)[:40]

    return [pytest.param(key, v, exc, id=f"{key}={label(v)}") for key, vs in values.items() for v in vs]


def meta(*shape, dtype=torch.int64):
    """A factory (so each case gets a fresh tensor) of a meta-device tensor."""
    return lambda: torch.zeros(shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------- the classes

# None where a tensor, an array, a count or a path is due (where None does not mean "default").
NONE_IS_NOT_DATA = {
    key: [None]
    for key in (
        "capacity_tokens",
        "alpha",
        "seed",
        "token_fields",
        "sequence_fields",
        "add 'tokens'",
        "add 'score'",
        "add_padded 'tokens'",
        "add_padded 'group_id'",
        "add_packed 'logprobs'",
        "add_packed 'score'",
        "add_packed cu_seqlens",
        "sample batch_size",
        "sample prioritized",
        "sample beta",
        "sample_groups num_groups",
        "sample_groups min_group_size",
        "get ids",
        "get skip_missing",
        "epoch shuffle",
        "update_priorities ids",
        "update_priorities priorities",
        "priorities ids",
        "save path",
        "load path",
        "token_budget_minibatches lengths",
        "token_budget_minibatches max_tokens",
        "TokenField name",
        "TokenField dtype of field 't'",
        "TokenField pad of field 't'",
        "SequenceField dtype of field 's'",
        "mapping dtype of field 't'",
        "Batch ids",
        "Batch lengths",
        "Batch fields",
        "Batch max_seqlen",
    )
}

# Objects of the wrong type: strings for numbers and arrays, numbers for names and mappings.
WRONG_TYPES = {
    "capacity_tokens": ["64"],
    "capacity_sequences": ["4"],
    "alpha": ["0.5"],
    "seed": ["1"],
    "token_fields": [3, "tokens"],
    "sequence_fields": [object()],
    "group_field": [0],
    "add 'tokens'": ["abc", object(), {1, 2}],
    "add 'score'": ["1.0", object()],
    "add priority": ["high", [1.0]],
    "add_padded 'tokens'": [object()],
    "add_padded lengths": ["32", object()],
    "add_padded mask": [[["a", "b", "c"], ["a", "b", "c"]], object()],
    "add_packed cu_seqlens": [["0", "3", "5"], object()],
    "add_packed priorities": ["1.0", [1j, 2j]],
    "sample batch_size": ["4"],
    "sample beta": ["x"],
    "sample min_version": ["0"],
    "sample pad_values": ["tokens", [("tokens", 0)]],
    "sample pad_values['tokens']": ["0", [0]],
    "sample timeout": ["1"],
    "sample min_available": ["1"],
    "sample_groups num_groups": ["1"],
    "get ids": ["0", object()],
    "epoch max_tokens": ["8"],
    "update_priorities priorities": [["a"], object()],
    "priorities ids": [["0"]],
    "save path": [3, object()],
    "load path": [3],
    "token_budget_minibatches lengths": ["12", 3],
    "token_budget_minibatches max_tokens": ["8"],
    "TokenField name": [3, b"tokens"],
    "TokenField dtype of field 't'": ["float33", torch.bfloat16, torch.complex64, "U3", object()],
    "TokenField pad of field 't'": ["0", np.str_("0"), [0], object()],
    "SequenceField dtype of field 's'": ["int128", torch.bfloat16],
    "mapping dtype of field 't'": [3, "nope"],
    "Batch ids": [[0], np.zeros(1, np.int64), torch.zeros(1)],
    "Batch fields": [[("tokens", torch.zeros(1))], {"tokens": [0]}],
    "Batch max_seqlen": ["1"],
}

# A bool where an int (or a real number) is due.
BOOL_FOR_NUMBER = {
    key: [True]
    for key in (
        "capacity_tokens",
        "capacity_sequences",
        "alpha",
        "seed",
        "add 'tokens'",
        "add 'group_id'",
        "add 'score'",
        "add priority",
        "sample batch_size",
        "sample beta",
        "sample min_version",
        "sample pad_values['tokens']",
        "sample timeout",
        "sample min_available",
        "sample_groups num_groups",
        "sample_groups min_group_size",
        "sample_groups min_version",
        "sample_groups timeout",
        "get ids",
        "epoch batch_size",
        "epoch max_tokens",
        "epoch min_version",
        "update_priorities ids",
        "priorities ids",
        "token_budget_minibatches max_tokens",
        "TokenField pad of field 't'",
        "Batch max_seqlen",
    )
} | {
    "add 'tokens'": [[True, False, True]],
    "add_padded lengths": [[True, True]],
    "add_packed cu_seqlens": [[False, True, True]],
    "add_packed priorities": [[True, True]],
    "get ids": [True, [True]],
    "update_priorities priorities": [[True]],
    "token_budget_minibatches lengths": [[True, True]],
}

# NaN / inf where a finite number is due (ValueError).
NOT_FINITE = {
    key: [float("nan"), float("inf"), -float("inf")]
    for key in (
        "alpha",
        "sample beta",
        "sample timeout",
        "sample_groups timeout",
        "add priority",
        "add_padded priorities",
        "add_packed priorities",
        "update_priorities priorities",
        "TokenField pad of field 't'",
        "sample pad_values['tokens']",
    )
}

# A float (even an integral one) where an int is due: never truncated.
FLOAT_FOR_INT = {
    key: [1.5, 2.0, np.float64(2.0)]
    for key in (
        "capacity_tokens",
        "capacity_sequences",
        "seed",
        "sample batch_size",
        "sample min_version",
        "sample min_available",
        "sample_groups num_groups",
        "sample_groups min_group_size",
        "sample_groups min_version",
        "get ids",
        "epoch batch_size",
        "epoch max_tokens",
        "epoch min_version",
        "priorities ids",
        "token_budget_minibatches max_tokens",
        "Batch max_seqlen",
    )
} | {
    "add 'group_id'": [1.5],
    "add 'tokens'": [[1.5, 2.0, 3.0]],
    "add_padded lengths": [[3.0, 2.0]],
    "add_packed cu_seqlens": [[0.0, 3.0, 5.0]],
    "get ids": [[0.0], np.zeros(1)],
    "update_priorities ids": [[0.0]],
    "token_budget_minibatches lengths": [[1.0, 2.0]],
    "Batch ids": [torch.zeros(1)],
    "Batch lengths": [torch.ones(1)],
}

# Tensors on the meta device (no data): a clear ValueError, not NotImplementedError.
META_TENSORS = {
    "add 'tokens'": [meta(3, dtype=torch.int32)],
    "add 'score'": [meta(dtype=torch.float32)],
    "add priority": [meta(dtype=torch.float64)],
    "add_padded 'tokens'": [meta(2, 3, dtype=torch.int32)],
    "add_padded 'group_id'": [meta(2)],
    "add_padded lengths": [meta(2)],
    "add_padded mask": [meta(2, 3, dtype=torch.bool)],
    "add_padded priorities": [meta(2, dtype=torch.float32)],
    "add_packed 'logprobs'": [meta(5, dtype=torch.float32)],
    "add_packed cu_seqlens": [meta(3)],
    "add_packed priorities": [meta(2, dtype=torch.float32)],
    "get ids": [meta(1)],
    "update_priorities ids": [meta(1)],
    "update_priorities priorities": [meta(1, dtype=torch.float32)],
    "priorities ids": [meta(1)],
    "token_budget_minibatches lengths": [meta(2)],
    "TokenField pad of field 't'": [meta(dtype=torch.int32)],
    "sample pad_values['tokens']": [meta(dtype=torch.int32)],
    "Batch ids": [meta(1)],
    "Batch lengths": [meta(1)],
    "Batch fields": [lambda: {"tokens": torch.zeros(1, 1, device=META)}],
    "Batch attention_mask": [meta(1, 1, dtype=torch.bool)],
    "Batch weights": [meta(1, dtype=torch.float32)],
}

# Ints outside what the argument (or the core's int64) can hold.
OUT_OF_RANGE = {
    "capacity_tokens": [0, -1, 2**40 + 1, 2**70],
    "capacity_sequences": [0, 2**63],
    "seed": [-1, 2**64],
    "add 'group_id'": [2**63, [2**64]],
    "add_padded lengths": [[0, 2], [3, 4], np.array([2**63, 1], np.uint64)],
    "add_packed cu_seqlens": [[0, 3], [1, 3, 5], [0, 3, 3, 5], np.array([0, 3, 2**63], np.uint64)],
    "sample batch_size": [0, -3, 2**63],
    "sample min_version": [2**63, -(2**63) - 1],
    "sample min_available": [-1, 2**63],
    "sample_groups num_groups": [0, 2**63],
    "sample_groups min_group_size": [0, 2**64],
    "sample_groups min_version": [2**63],
    "get ids": [2**63, np.uint64(2**63), np.array([2**63], np.uint64), [2**64]],
    "epoch batch_size": [0, 2**63],
    "epoch max_tokens": [-1, 2**63],
    "epoch min_version": [2**63],
    "update_priorities ids": [np.array([2**63], np.uint64)],
    "priorities ids": [[2**63]],
    "token_budget_minibatches lengths": [[0, 2], [-1], np.array([2**63], np.uint64)],
    "token_budget_minibatches max_tokens": [0, 2**63],
    "TokenField pad of field 't'": [2**31, 0.5],
    "sample pad_values['tokens']": [-(2**31) - 1],
    "Batch max_seqlen": [-1],
}

# Flags take a bool only (0/1, None, strings are refused).
FLAGS = {
    key: [1, 0, None, "yes"]
    for key in (
        "sample prioritized",
        "sample replace",
        "sample pin_memory",
        "sample_groups pin_memory",
        "get skip_missing",
        "get pin_memory",
        "epoch shuffle",
        "epoch drop_last",
        "epoch pin_memory",
        "update_priorities ignore_missing",
        "token_budget_minibatches padded",
    )
}

# Choices take one of their strings only.
CHOICES = {
    key: [None, "ragged", 0]
    for key in (
        "add_padded padding_side",
        "sample layout",
        "sample padding_side",
        "sample_groups layout",
        "get layout",
        "get padding_side",
        "epoch layout",
        "epoch padding_side",
        "Batch layout",
    )
}


@pytest.mark.parametrize("key,value,exc", cases(NONE_IS_NOT_DATA, TypeError))
def test_none_where_data_is_due_is_a_type_error(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(WRONG_TYPES, TypeError) + cases(FLAGS, TypeError))
def test_wrong_types_are_type_errors(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(BOOL_FOR_NUMBER, TypeError))
def test_bool_where_a_number_is_due_is_a_type_error(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(NOT_FINITE, ValueError))
def test_nan_and_inf_scalars_are_value_errors(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(FLOAT_FOR_INT, TypeError))
def test_float_where_an_int_is_due_is_a_type_error_not_truncated(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(META_TENSORS, ValueError))
def test_meta_device_tensors_are_value_errors(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


@pytest.mark.parametrize("key,value,exc", cases(OUT_OF_RANGE, ValueError) + cases(CHOICES, ValueError))
def test_out_of_range_ints_and_unknown_choices_are_value_errors(key, value, exc) -> None:
    assert_clear_error(key, value, exc)


def test_every_argument_is_covered() -> None:
    """Each argument in CALLS is exercised by at least one class above."""
    tables = (NONE_IS_NOT_DATA, WRONG_TYPES, BOOL_FOR_NUMBER, NOT_FINITE, FLOAT_FOR_INT, META_TENSORS)
    covered = set().union(*tables, OUT_OF_RANGE, FLAGS, CHOICES)
    assert set(CALLS) - covered == set()
    assert covered - set(CALLS) == set()


# ----------------------------------------------------------------------------- single cases


def test_maximum_capacity_reserves_nothing_up_front() -> None:
    # 16 buffers x 2 fields x 2**40 int64/float64 tokens would be 256 TiB if reserved.
    buffers = [ReplayBuffer({"a": torch.int64, "b": torch.float64}, capacity_tokens=2**40) for _ in range(16)]
    rb = buffers[-1]
    assert rb.capacity_tokens == 2**40
    rb.add(a=np.arange(5000), b=np.zeros(5000))  # the rings grow with the tokens stored
    rb.add(a=np.arange(7), b=np.ones(7))
    assert rb.get([0, 1], layout="packed")["a"].tolist() == [*range(5000), *range(7)]
    core = _ext.load().ReplayBufferCore
    with pytest.raises(ValueError, match=r"capacity_tokens must be at most 2\*\*40"):
        core([("t", 5, bytes(8))], [], -1, -1, 2**40 + 1, 0, 1.0, 0)  # the core agrees on the limit


def test_a_batch_too_large_to_allocate_is_a_clear_memory_error() -> None:
    rb = make_buffer()
    rb.add(**one())
    with pytest.raises(MemoryError, match=r"out of memory reserving \d+ entries for sample\(batch_size="):
        rb.sample(2**61)


def test_directories_are_named_as_such(tmp_path) -> None:
    rb = make_buffer()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ReplayBuffer.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        rb.save(tmp_path)
    with pytest.raises(OSError, match="is a directory"):
        _ext.load().ReplayBufferCore.load(str(tmp_path))  # the core says so too
    with pytest.raises(FileNotFoundError, match="no replay buffer file"):
        ReplayBuffer.load(tmp_path / "missing")


def test_large_unsigned_ids_do_not_wrap_negative() -> None:
    rb = make_buffer()
    rb.add(**one())
    with pytest.raises(ValueError, match="beyond int64"):
        rb.get(np.array([2**64 - 1], np.uint64))  # used to read as id -1
    assert rb.get(np.array([0], np.uint64)).ids.tolist() == [0]  # in-range unsigned ids are fine


def test_schema_dtype_none_is_refused_not_float64() -> None:
    with pytest.raises(TypeError, match="dtype of field 'x'.*got None"):
        TokenField("x", None)
    with pytest.raises(TypeError, match="dtype of field 'score'.*got None"):
        ReplayBuffer({"t": torch.int32}, {"score": None}, capacity_tokens=8)


def test_valid_edge_values_are_accepted() -> None:
    rb = make_buffer(alpha=0, seed=2**64 - 1, capacity_sequences=2**63 - 1)
    rb.add(**one(group_id=np.int64(2), version=-5), priority=np.float32(0.5))
    rb.add(**one(), priority=torch.tensor(2.0))
    assert rb.priorities(np.array([0, 1], np.uint8)).tolist() == [0.5, 2.0]
    assert len(rb.sample(np.int64(3), beta=0, min_version=-(2**63), min_available=0)) == 3
    assert len(rb.sample(1, timeout=None)) == 1
    rb.update_priorities(1, 3.0)  # one id, one priority
    assert rb.priorities(1).tolist() == [3.0]
    assert TokenField("f", torch.float32, pad=float("-inf")).pad == float("-inf")  # explicit pads may be inf
    assert TokenField("b", torch.bool, pad=True).pad is True
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ids = rb.add_padded(**{**padded(), "lengths": None, "mask": mask})
    assert rb.get(ids).lengths.tolist() == [2, 2]
