"""Tools an environment offers the model: a Python function with a JSON schema for its arguments.

The model calls one by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its reply (the
Hermes / Qwen format, which SmolLM2's instruct data uses too); the environment answers with a tool message. A
call that does not parse, names no known tool, has arguments its schema refuses, or whose function raises is
answered with an error message as the observation, never an exception: the model learns from it like any other
answer.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import jsonschema

TOOL_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    """JSON schema of the arguments object."""
    function: Callable[..., object]

    def schema(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolCall:
    valid: bool
    """The call parsed, named a tool, its arguments fit the schema and the function returned."""
    content: str
    """The function's result, or the error the model is shown."""


def tools_prompt(tools: list[Tool]) -> str:
    """How to call the tools, for the model's instructions."""
    listed = "\n".join(json.dumps(tool.schema()) for tool in tools)
    return ("You can call these tools:\n" + listed + "\nTo call one, reply with <tool_call>{\"name\": NAME, "
            "\"arguments\": {...}}</tool_call> and wait for its result.")


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as the model writes it (for examples in a prompt)."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def call_tool(tools: list[Tool], text: str) -> ToolCall | None:
    """Runs the first tool call in `text`; None if it has none."""
    match = TOOL_CALL.search(text)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1).strip())
    except json.JSONDecodeError as error:
        return ToolCall(False, f"error: the tool call is not JSON ({error.msg})")
    by_name = {tool.name: tool for tool in tools}
    if not isinstance(call, dict) or call.get("name") not in by_name:
        name = call.get("name") if isinstance(call, dict) else None
        return ToolCall(False, f"error: unknown tool {name!r}; the tools are {', '.join(by_name)}")
    tool, arguments = by_name[call["name"]], call.get("arguments", {})
    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as error:
        return ToolCall(False, f"error: bad arguments for {tool.name}: {error.message}")
    try:
        return ToolCall(True, str(tool.function(**arguments)))
    except Exception as error:
        return ToolCall(False, f"error: {tool.name} failed: {error}")


# ---- a calculator ---------------------------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """An arithmetic expression of numbers, + - * / and parentheses; nothing else is evaluated."""
    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an expression: {expression!r}") from None
    result = value(tree.body)
    return int(result) if isinstance(result, float) and result.is_integer() else result


CALCULATOR = Tool("calculator", "Evaluates an arithmetic expression (numbers, + - * / and parentheses).",
                  {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"],
                   "additionalProperties": False}, calculate)
