"""A pytest plugin for bench/gpu.sh: one JSON line per benchmark case, written as each case ends.

pytest-benchmark writes ``--benchmark-json`` once, when the whole session ends: a run killed at its
time limit would keep nothing. With ``-p gpu_bench_jsonl`` (bench/ on ``PYTHONPATH``) and
``GPU_BENCH_JSONL=<file>``, every case's outcome, timing statistics (seconds) and ``extra_info``
(provider, peak memory, bytes moved, FLOPs) are appended to ``<file>`` and flushed right away; skips
and failures are recorded too, with their reason.
"""

from __future__ import annotations

import json
import os

import pytest

ENV_VAR = "GPU_BENCH_JSONL"


def _record(item: pytest.Item, report: pytest.TestReport) -> dict:
    record = {
        "test": item.nodeid,
        "outcome": report.outcome,
        "phase": report.when,
        "seconds": report.duration,
    }
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    metadata = getattr(fixture, "stats", None)
    if metadata is not None:
        record["group"] = metadata.group
        record["extra_info"] = dict(metadata.extra_info)
        record["stats"] = metadata.stats.as_dict()
    if report.skipped and isinstance(report.longrepr, tuple):
        record["reason"] = report.longrepr[2]
    elif report.failed:
        record["error"] = report.longreprtext[-3000:]
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    path = os.environ.get(ENV_VAR)
    # One line per case: its call phase, or the setup phase when the case never got to run.
    if not path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    with open(path, "a") as sink:
        sink.write(json.dumps(_record(item, report), default=str) + "\n")
        sink.flush()
        os.fsync(sink.fileno())
