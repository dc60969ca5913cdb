"""The tool layer for agentic tool-use distillation: tools, tool-call parsing and the environment.

A tool environment is chosen by the ``tools`` config group (``configs/tools/*.yaml``) and instantiated
with ``_target_``; a multi-turn rollout shows ``env.schemas()`` to the chat template (``tools=``), and
answers each turn that ``has_tool_call`` with the tool messages of ``env.execute(turn_text)``.
"""

from src.tools.base import FunctionTool, Tool, ToolArgumentError, ToolError, validate_arguments
from src.tools.calculator import Calculator, CalculatorError, evaluate
from src.tools.calls import ToolCall, ToolCallError, ToolEnvironment, has_tool_call, parse_tool_calls
from src.tools.python_exec import PythonTool
from src.tools.search import BM25, SearchTool

__all__ = [
    "BM25", "Calculator", "CalculatorError", "FunctionTool", "PythonTool", "SearchTool", "Tool",
    "ToolArgumentError", "ToolCall", "ToolCallError", "ToolEnvironment", "ToolError", "evaluate",
    "has_tool_call", "parse_tool_calls", "validate_arguments",
]
