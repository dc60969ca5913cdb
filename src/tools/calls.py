"""Tool calls in the Qwen/Hermes convention, and the environment that answers them.

A policy turn may contain any number of blocks
``<tool_call>{"name": "calculator", "arguments": {"expression": "2**100"}}</tool_call>``; ``arguments``
may also be a JSON-encoded string (some models write it so) and ``parameters`` is accepted as an alias
(the Llama convention). ``ToolEnvironment.execute(text)`` answers each block, in order, with a tool message
``{"role": "tool", "name": ..., "content": ...}``. Whatever goes wrong (unparseable block, unknown tool,
bad arguments, a tool raising or hanging) becomes ``content = "error: ..."``, never an exception: the
error is an observation the policy should learn from, and one bad sample must not end a rollout.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections import Counter
from typing import Any, Mapping, Sequence

from src.tools.base import ToolError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|(?=<tool_call>)|\Z)", re.S)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict
    raw: str = ""


@dataclasses.dataclass
class ToolCallError:
    """A block that cannot be executed. ``kind``: ``malformed`` (not a ``{"name", "arguments"}`` JSON
    object, or unterminated), ``unknown_tool`` or ``bad_arguments``."""

    message: str
    kind: str = "malformed"
    name: str | None = None
    raw: str = ""


def has_tool_call(text: str) -> bool:
    """Whether a turn tries to call a tool (a well-formed call or not): the multi-turn loop's stop test."""
    return TOOL_CALL_OPEN in text


def _parse_block(body: str, closed: bool) -> ToolCall | ToolCallError:
    raw = body
    if not closed:
        return ToolCallError(f"unterminated {TOOL_CALL_OPEN} block (missing {TOOL_CALL_CLOSE})", raw=raw)
    body = body.strip()
    if body.startswith("```"):  # a fenced block inside the tags
        body = re.sub(r"^```(?:json)?\s*|\s*```$", "", body)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(f"tool call is not valid JSON ({e.msg} at char {e.pos}); expected "
                             '{"name": <tool>, "arguments": {...}}', raw=raw)
    if not isinstance(obj, dict):
        return ToolCallError('tool call must be a JSON object {"name": <tool>, "arguments": {...}}', raw=raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError('tool call has no "name"', raw=raw)
    arguments = obj.get("arguments", obj.get("parameters"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCallError(f'"arguments" of {name!r} is a string that is not valid JSON ({e.msg})',
                                 name=name, raw=raw)
    if not isinstance(arguments, dict):
        return ToolCallError(f'"arguments" of {name!r} must be a JSON object', name=name, raw=raw)
    return ToolCall(name=name, arguments=arguments, raw=raw)


def parse_tool_calls(text: str, tools: Mapping[str, Any] | Sequence[Any] | None = None
                     ) -> list[ToolCall | ToolCallError]:
    """Every ``<tool_call>`` block of ``text``, in order, as a ``ToolCall`` or a ``ToolCallError``.

    With ``tools`` (by name, or a list of tools) the name must be known and the arguments are validated
    (and normalised) by the tool's ``validate``; without, only the syntax is checked. Never raises.
    """
    if tools is not None and not isinstance(tools, Mapping):
        tools = {t.name: t for t in tools}
    out: list[ToolCall | ToolCallError] = []
    for m in _BLOCK.finditer(text):
        call = _parse_block(m.group(1), closed=m.group(2) == TOOL_CALL_CLOSE)
        if tools is not None and isinstance(call, ToolCall):
            tool = tools.get(call.name)
            if tool is None:
                call = ToolCallError(f"unknown tool {call.name!r}; available: {', '.join(sorted(tools))}",
                                     kind="unknown_tool", name=call.name, raw=call.raw)
            elif hasattr(tool, "validate"):
                try:
                    call.arguments = tool.validate(call.arguments)
                except Exception as e:  # noqa: BLE001 - a validator's failure is the call's failure
                    call = ToolCallError(str(e), kind="bad_arguments", name=call.name, raw=call.raw)
        out.append(call)
    return out


class ToolEnvironment:
    """The tools a policy may call, and the executor of its tool calls.

    Args:
        tools: ``Tool`` objects (names must be unique).
        timeout_s: wall-clock limit per call. In-process tools run on a daemon thread that is abandoned,
            not killed, when it overruns (Python cannot kill a thread); a tool that can hang for real
            (``PythonTool``) must enforce its own, shorter, limit on a process it can kill.
        max_output_chars: longer tool output is cut, with a note saying so.
        max_calls_per_turn: calls beyond this in one turn are answered with an error, not run.
    """

    def __init__(self, tools: Sequence[Any], timeout_s: float = 10.0, max_output_chars: int = 4000,
                 max_calls_per_turn: int = 8):
        self.tools = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            inner = getattr(tool, "timeout_s", None)
            if inner is not None and inner >= timeout_s:
                raise ValueError(f"tool {tool.name!r} has timeout_s={inner} >= the environment's timeout_s="
                                 f"{timeout_s}; its own limit must fire first so it can kill its process")
            self.tools[tool.name] = tool
        self.timeout_s, self.max_output_chars = timeout_s, max_output_chars
        self.max_calls_per_turn = max_calls_per_turn
        self.counts: Counter = Counter()
        self._lock = threading.Lock()  # rollouts may execute turns from several threads

    def _count(self, *keys: str) -> None:
        with self._lock:
            self.counts.update(keys)

    def schemas(self) -> list[dict]:
        """Function definitions for ``tokenizer.apply_chat_template(..., tools=env.schemas())``."""
        return [tool.schema() for tool in self.tools.values()]

    def execute(self, text: str) -> list[dict]:
        """One tool message per ``<tool_call>`` block of ``text`` (none if there is no block)."""
        messages = []
        for i, call in enumerate(parse_tool_calls(text, self.tools)):
            keys = ["calls"]
            if i >= self.max_calls_per_turn:
                content = f"error: too many tool calls in one turn (at most {self.max_calls_per_turn})"
                ok = False
                keys.append("refused")
            elif isinstance(call, ToolCallError):
                content, ok = f"error: {call.message}", False
                keys.append("malformed" if call.kind == "malformed" else "invalid")
            else:
                keys.append(f"{call.name}/calls")
                content, ok = self._run(call)
                if not ok:
                    keys.append("failed")
            if not ok:
                keys.append("errors")
            self._count(*keys)
            messages.append({"role": "tool", "name": call.name or "invalid", "content": self._cap(content)})
        return messages

    def _run(self, call: ToolCall) -> tuple[str, bool]:
        tool, result = self.tools[call.name], {}

        def target():
            try:
                result["content"] = tool(**call.arguments)
            except BaseException as e:  # noqa: BLE001 - the worker reports everything, including SystemExit
                result["error"] = e

        worker = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self._count("timeouts")
            return f"error: tool {call.name!r} timed out after {self.timeout_s:g}s", False
        if "error" in result:
            e = result["error"]
            if isinstance(e, ToolError):
                return f"error: {e}", False
            return f"error: tool {call.name!r} raised {type(e).__name__}: {e}", False
        content = result.get("content")
        content = content if isinstance(content, str) else json.dumps(content, default=str)
        return content, not content.startswith("error:")

    def _cap(self, content: str) -> str:
        if len(content) <= self.max_output_chars:
            return content
        cut = len(content) - self.max_output_chars
        return f"{content[: self.max_output_chars]}\n... [output truncated: {cut} more characters]"

    def metrics(self, prefix: str = "tools") -> dict[str, float]:
        """Slash-namespaced counters since the last ``reset_metrics``, and the error rate."""
        out = {f"{prefix}/{k}": float(v) for k, v in sorted(self.counts.items())}
        for k in ("calls", "malformed", "invalid", "failed", "timeouts", "refused", "errors"):
            out.setdefault(f"{prefix}/{k}", 0.0)
        out[f"{prefix}/error_rate"] = out[f"{prefix}/errors"] / max(out[f"{prefix}/calls"], 1.0)
        return out

    def reset_metrics(self) -> None:
        with self._lock:
            self.counts.clear()
