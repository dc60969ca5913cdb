"""The tool contract: a named callable with a JSON-Schema signature, in the OpenAI/Qwen function format.

``Tool.schema()`` is exactly what ``tokenizer.apply_chat_template(messages, tools=[...])`` accepts, so the
student sees the same signature the environment validates against. ``Tool.__call__`` validates the
arguments (required keys, JSON types, no unknown keys) and then calls ``run``, which returns text.

A tool signals a failure it expects (bad expression, empty index) by raising ``ToolError``; the
environment (``src.tools.calls.ToolEnvironment``) turns that, and every other exception, into an
``"error: ..."`` tool message, so nothing a policy writes can crash a rollout.
"""

from __future__ import annotations

import json
from typing import Any, Callable


class ToolError(Exception):
    """An expected failure of a tool call; its message is shown to the model after ``error:``."""


class ToolArgumentError(ToolError):
    """Arguments that do not match the tool's JSON Schema."""


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def _json_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    for name in ("string", "integer", "number", "array", "object", "null"):
        if isinstance(value, _JSON_TYPES[name]):
            return name
    return type(value).__name__


def _check_type(value: Any, expected: str) -> Any:
    """``value`` if it has JSON type ``expected`` (an integral float becomes an int); else ``TypeError``."""
    if expected not in _JSON_TYPES:
        return value  # a type this validator does not know is not its business
    if isinstance(value, bool) and expected in ("number", "integer"):
        raise TypeError  # True is an int in Python but not a number in JSON
    if expected == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)  # models write 3.0 for 3; the value is unambiguous
    if isinstance(value, _JSON_TYPES[expected]):
        return value
    raise TypeError


def validate_arguments(tool_name: str, parameters: dict, arguments: Any) -> dict:
    """Check ``arguments`` against an object schema; return them (integral floats made ints).

    Supported: ``properties`` with ``type`` (a name or a list of names) and ``enum``, ``required``, and
    ``additionalProperties`` (default false: an unknown key is an error, it is usually a typo).
    """
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"arguments for '{tool_name}' must be a JSON object, "
                                f"got {_json_type_name(arguments)}")
    props: dict = parameters.get("properties", {})
    expected = ", ".join(props) or "none"
    problems = []
    unknown = [k for k in arguments if k not in props]
    if unknown and not parameters.get("additionalProperties", False):
        problems.append(f"got unknown argument(s) {unknown}")
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        problems.append(f"is missing required argument(s) {missing}")
    if problems:  # both at once name the typo: unknown ['expr'] and missing ['expression']
        raise ToolArgumentError(f"'{tool_name}' {' and '.join(problems)}; expected: {expected}")
    out = dict(arguments)
    for key, spec in props.items():
        if key not in arguments:
            continue
        value = arguments[key]
        types = spec.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else list(types)
            for t in types:
                try:
                    out[key] = _check_type(value, t)
                    break
                except TypeError:
                    continue
            else:
                raise ToolArgumentError(f"argument '{key}' of '{tool_name}' must be {' or '.join(types)}, "
                                        f"got {_json_type_name(value)} {json.dumps(value)[:40]}")
        if "enum" in spec and out[key] not in spec["enum"]:
            raise ToolArgumentError(f"argument '{key}' of '{tool_name}' must be one of {spec['enum']}, "
                                    f"got {value!r}")
    return out


class Tool:
    """Base class: set ``name``, ``description`` and ``parameters`` (JSON Schema of ``type: object``),
    implement ``run``.

    Any object with ``name``, ``schema()`` and ``__call__(**arguments) -> str`` works with the environment;
    subclassing gives validation for free.
    """

    name: str = ""
    description: str = ""
    parameters: dict = {"type": "object", "properties": {}, "required": []}

    def schema(self) -> dict:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}

    def validate(self, arguments: Any) -> dict:
        return validate_arguments(self.name, self.parameters, arguments)

    def run(self, **arguments) -> str:
        raise NotImplementedError

    def __call__(self, **arguments) -> str:
        return self.run(**self.validate(arguments))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionTool(Tool):
    """Wraps a plain function: ``FunctionTool(fn, name, description, parameters)``."""

    def __init__(self, fn: Callable[..., Any], name: str, description: str = "",
                 parameters: dict | None = None):
        self.fn, self.name, self.description = fn, name, description
        self.parameters = parameters or {"type": "object", "properties": {}, "required": []}

    def run(self, **arguments) -> str:
        return str(self.fn(**arguments))
