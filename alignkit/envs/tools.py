"""Tools: plain Python functions (sync or ``async def``) the model may call between its turns.

The call format (one per reply; the first one counts)::

    <tool>name(json-args)</tool>

``json-args`` is empty (no arguments), a JSON object (keyword arguments) or a JSON array (positional
arguments): ``<tool>add({"a": 2, "b": 3})</tool>``, ``<tool>add([2, 3])</tool>``, ``<tool>now()</tool>``.

:class:`ToolEnv` wraps any text env. A reply holding a tool call does not reach the wrapped env:
the tool runs (an async one is awaited; both under ``timeout_s``) and its result comes back as the
next observation, ``<result>...</result>`` (strings as they are, anything else as JSON), reward 0.
A reply without a call is the wrapped env's ordinary step. A call that fails (the tool raises, times
out, is unknown, or the call is malformed) is shown to the model as ``<error>...</error>`` when
``tool_errors="observe"`` (the default) and raises :class:`ToolError` when ``tool_errors="raise"``.
More than ``max_tool_calls`` calls in one episode truncate it.

Every tool runs in a worker thread joined with the timeout, so a stuck tool never hangs the
rollout; a *sync* tool past its timeout cannot be stopped and finishes in its (daemon) thread.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium

from .. import _checks
from .core import env_name

TOOL_ERRORS = ("observe", "raise")
_CALL = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
_SIGNATURE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)


class ToolError(RuntimeError):
    """A tool call failed: the tool raised or timed out, or the call is unknown or malformed."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_tool_call(reply: str) -> ToolCall | None:
    """The first ``<tool>name(json-args)</tool>`` of ``reply``; None when it holds no ``<tool>``
    block; :class:`ToolError` when the block is malformed (the message shows it)."""
    found = _CALL.search(reply)
    if found is None:
        return None
    body = found.group(1)
    signature = _SIGNATURE.match(body)
    if signature is None:
        raise ToolError(f"malformed tool call {body!r}: expected name(json-args)")
    name, raw = signature.group(1), signature.group(2).strip()
    if not raw:
        return ToolCall(name)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ToolError(f"malformed arguments of tool {name}: {raw!r} is not JSON ({exc.msg})") from None
    if isinstance(value, dict):
        return ToolCall(name, kwargs=value)
    if isinstance(value, list):
        return ToolCall(name, args=tuple(value))
    raise ToolError(f"arguments of tool {name} must be a JSON object or array, got {raw!r}")


def _tool_table(tools: object) -> dict[str, Callable]:
    if isinstance(tools, Mapping):
        table = dict(tools)
    elif isinstance(tools, Sequence) and not isinstance(tools, str):
        table = {}
        for fn in tools:
            name = getattr(fn, "__name__", None)
            if not callable(fn) or not isinstance(name, str):
                raise TypeError(
                    f"tools must be functions (or a name -> function dict), got {type(fn).__name__}"
                )
            if name in table:
                raise ValueError(f"tools holds two functions named {name!r}: pass a name -> function dict")
            table[name] = fn
    else:
        raise TypeError(
            f"tools must be a list of functions or a name -> function dict, got {type(tools).__name__}"
        )
    if not table:
        raise ValueError("tools must hold at least one function, got none")
    for name, fn in table.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"tool names must be identifiers, got {name!r}")
        if not callable(fn):
            raise TypeError(f"tool {name!r} must be callable, got {type(fn).__name__}")
    return table


def run_tool(fn: Callable, call: ToolCall, *, timeout_s: float) -> Any:
    """``fn(*call.args, **call.kwargs)`` (awaited when it is a coroutine) in a worker thread, at most
    ``timeout_s`` seconds; :class:`ToolError` if it raises or runs past the timeout."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            out = fn(*call.args, **call.kwargs)
            if inspect.isawaitable(out):

                async def bounded():
                    return await asyncio.wait_for(out, timeout_s)

                out = asyncio.run(bounded())  # this thread's own loop: works under a running one too
            box["value"] = out
        except BaseException as exc:  # reported to the caller, never lost in the thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"alignkit-tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.05)  # async tools time out inside; the margin lets that land first
    if thread.is_alive() or isinstance(box.get("error"), (asyncio.TimeoutError, TimeoutError)):
        raise ToolError(f"tool {call.name} timed out after {timeout_s:g} s")
    if "error" in box:
        exc = box["error"]
        raise ToolError(f"tool {call.name} raised {type(exc).__name__}: {exc}") from exc
    return box.get("value")


def format_result(value: Any) -> str:
    """A tool's result as observation text: strings as they are, anything else as JSON (repr if not
    JSON-serialisable)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def describe_tools(tools: object) -> str:
    """One line per tool, ``name(signature): first docstring line``, and the call format: a system
    prompt for the model."""
    lines = ["tools (call one as <tool>name(json-args)</tool>):"]
    for name, fn in _tool_table(tools).items():
        try:
            signature = str(inspect.signature(fn, eval_str=True))  # "a: int", not "a: 'int'"
        except (TypeError, ValueError, NameError):
            try:
                signature = str(inspect.signature(fn))
            except (TypeError, ValueError):
                signature = "(...)"
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        lines.append(f"- {name}{signature}" + (f": {doc[0]}" if doc else ""))
    return "\n".join(lines)


class ToolEnv(gymnasium.Wrapper):
    """Adds tools to any text env (see the module docstring for the call format and the rules).

    Args:
        env: the wrapped env (a :class:`~alignkit.envs.TextEnv` or any env with text observations).
        tools: a list of functions (named by ``__name__``) or a ``name -> function`` dict.
        tool_errors: ``"observe"``: a failed call's message is the next observation;
            ``"raise"``: it raises :class:`ToolError`.
        timeout_s: seconds a tool may run.
        max_tool_calls: tool calls per episode; one more truncates the episode.
        announce: prepend :func:`describe_tools` to the first observation (a system message when it
            is chat messages).
    """

    def __init__(
        self,
        env: gymnasium.Env,
        tools: object,
        *,
        tool_errors: str = "observe",
        timeout_s: float = 10.0,
        max_tool_calls: int = 8,
        announce: bool = False,
    ) -> None:
        super().__init__(env)
        self.tools = _tool_table(tools)
        if tool_errors not in TOOL_ERRORS:
            raise ValueError(f"tool_errors must be one of {TOOL_ERRORS}, got {tool_errors!r}")
        self.tool_errors = tool_errors
        self.timeout_s = _checks.positive(timeout_s, "timeout_s")
        self.max_tool_calls = _checks.non_negative_int(max_tool_calls, "max_tool_calls")
        self.announce = _checks.flag(announce, "announce")
        self.tool_calls = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.tool_calls = 0
        observation, info = self.env.reset(seed=seed, options=options)
        if self.announce:
            text = describe_tools(self.tools)
            if isinstance(observation, str):
                observation = f"{text}\n{observation}"
            else:
                observation = type(observation)([{"role": "system", "content": text}, *observation])
        return observation, info

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(
                f"{env_name(self)}.step takes the model's reply as a string, got {type(action).__name__}"
            )
        try:
            call = parse_tool_call(action)
        except ToolError as exc:
            return self._failed(exc, None)
        if call is None:
            return self.env.step(action)
        self.tool_calls += 1
        if self.tool_calls > self.max_tool_calls:
            info = {"tool": call.name, "tool_error": True, "tool_calls": self.tool_calls}
            text = f"<error>tool call limit ({self.max_tool_calls}) reached</error>"
            return text, 0.0, False, True, info
        fn = self.tools.get(call.name)
        try:
            if fn is None:
                raise ToolError(f"unknown tool {call.name!r}; available: {', '.join(self.tools)}")
            result = run_tool(fn, call, timeout_s=self.timeout_s)
        except ToolError as exc:
            return self._failed(exc, call.name)
        info = {"tool": call.name, "tool_error": False, "tool_calls": self.tool_calls}
        return f"<result>{format_result(result)}</result>", 0.0, False, False, info

    def _failed(self, exc: ToolError, name: str | None):
        if self.tool_errors == "raise":
            raise ToolError(f"{env_name(self)}: {exc}") from exc
        info = {"tool": name, "tool_error": True, "tool_calls": self.tool_calls}
        return f"<error>{exc}</error>", 0.0, False, False, info
