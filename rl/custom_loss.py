"""Server-side custom losses: a loss the SDK traced with torch.fx on the client, sent as data, run here.

`ServiceClient.create_custom_loss(fn, input_ranks)` sends the traced graph's nodes (`CustomLossGraph`). Nothing
in it is imported, evaluated or looked up by a name the client chose: each node is rebuilt from the tables
below (tensor functions of torch and torch.nn.functional, math, operator; tensor methods; a few attributes),
and a node that names anything else (a module attribute, a builtin such as eval or open, a dunder, a captured
tensor, a module call) is refused with its name before the loss is stored. A datum's loss is the graph run on
its target logprobs and the `loss_fn_inputs` the loss reads; the batch's loss is their sum, and its metrics
(`custom/<name>:sum` or `:mean`) add up or average over the datums, as the SDK's client-side path does.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rl.losses import LossSpec, Metrics
from rl.types import CustomLossGraph, CustomLossInput


def _qualified(function: Callable) -> str:
    """The name torch.fx records for `function`, as the SDK sends it (operator, not CPython's _operator)."""
    from torch.fx.node import _get_qualified_name

    name = _get_qualified_name(function)
    return "operator." + name.removeprefix("_operator.") if name.startswith("_operator.") else name


_TORCH = ("abs", "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "square", "pow", "sigmoid", "tanh", "clamp",
          "clip", "minimum", "maximum", "where", "sum", "mean", "amax", "amin", "max", "min", "logsumexp",
          "softmax", "log_softmax", "cumsum", "stack", "cat", "ones_like", "zeros_like", "full_like", "sign",
          "exp2", "neg", "mul", "add", "sub", "div", "gather", "masked_fill", "isfinite", "numel", "tensor",
          "logaddexp", "lt", "gt", "le", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "relu")
_FUNCTIONAL = ("logsigmoid", "softplus", "relu", "log_softmax", "softmax", "mse_loss", "smooth_l1_loss")
_OPERATOR = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "getitem",
             "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "invert")
_MATH = ("exp", "log", "sqrt", "log1p", "expm1", "tanh", "isfinite")

ALLOWED_FUNCTIONS: dict[str, Callable] = {
    **{_qualified(getattr(torch, name)): getattr(torch, name) for name in _TORCH},
    **{_qualified(getattr(F, name)): getattr(F, name) for name in _FUNCTIONAL},
    **{_qualified(getattr(operator, name)): getattr(operator, name) for name in _OPERATOR},
    **{_qualified(getattr(math, name)): getattr(math, name) for name in _MATH},
}
"""What a call_function node may call, by the name torch.fx records (`torch.exp`, `operator.mul`, ...)."""

ALLOWED_METHODS = frozenset({
    "abs", "exp", "log", "log1p", "sqrt", "square", "pow", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max",
    "clip", "minimum", "maximum", "where", "sum", "mean", "amax", "amin", "max", "min", "logsumexp", "softmax",
    "log_softmax", "cumsum", "neg", "mul", "add", "sub", "div", "gather", "masked_fill", "detach", "float",
    "double", "unsqueeze", "squeeze", "reshape", "view", "flatten", "expand", "expand_as", "size", "dim",
    "numel", "sign", "isfinite", "relu", "lt", "gt", "le", "ge", "eq", "ne", "logical_and", "logical_or",
    "logical_not", "to", "type_as", "contiguous", "t", "transpose",
})
"""Tensor methods a call_method node may call: no in-place ones, none that leave torch (item, numpy, tolist)."""

ALLOWED_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "T"})
"""What `getattr(tensor, name)` (fx's record of `tensor.shape` and the like) may read."""

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                     "bool")}
_CONSTANTS = {("memory_format", "contiguous_format"): torch.contiguous_format, ("layout", "strided"): torch.strided}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_GETATTR = "getattr"  # how torch.fx names the builtin (tensor.shape and the like)

KNOWN_INPUTS = ("weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold",
                "sequence_ratio_mask")
"""Inputs the SDK knows: a datum may carry those its custom loss does not read (the SDK sends the data as is)."""


class CustomLossProgram:
    """A validated graph, runnable on one datum: `program(logprobs, *inputs) -> (loss, metrics)`."""

    def __init__(self, name: str, inputs: list[CustomLossInput], graph: CustomLossGraph):
        self.name, self.inputs, self.nodes = name, inputs, graph.nodes
        self._check()

    def _check(self) -> None:
        if not self.inputs or self.inputs[0].name != "logprobs" or self.inputs[0].rank != 1:
            raise ValueError(f"custom loss {self.name!r}: its first input must be logprobs of rank 1")
        for loss_input in self.inputs[1:]:
            if loss_input.rank == 0 or loss_input.name == "target_tokens":
                raise ValueError(f"custom loss {self.name!r}: input {loss_input.name!r} of rank {loss_input.rank} "
                                 "is not served (inputs are per-token tensors, [T] or [T, K])")
        seen: set[str] = set()
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        if [node.target for node in placeholders] != [loss_input.name for loss_input in self.inputs]:
            raise ValueError(f"custom loss {self.name!r}: the graph's parameters "
                             f"{[node.target for node in placeholders]} are not its inputs "
                             f"{[loss_input.name for loss_input in self.inputs]}")
        for node in self.nodes:
            where = f"custom loss {self.name!r} node {node.name!r}"
            if node.name in seen:
                raise ValueError(f"{where} repeats a name")
            if node.op == "call_function" and node.target not in ALLOWED_FUNCTIONS and node.target != _GETATTR:
                raise ValueError(f"{where} calls {node.target!r}, which is not an allowed operation (tensor "
                                 "functions of torch, math and operator: rl/custom_loss.py lists them)")
            if node.op == "call_function" and node.target == _GETATTR and (
                    len(node.args) != 2 or node.args[1] not in ALLOWED_ATTRIBUTES):
                raise ValueError(f"{where} reads attribute {node.args[1:]!r}; only "
                                 f"{', '.join(sorted(ALLOWED_ATTRIBUTES))} may be read")
            if node.op == "call_method" and node.target not in ALLOWED_METHODS:
                raise ValueError(f"{where} calls method {node.target!r}, which is not an allowed tensor method")
            if node.op in ("get_attr", "call_module"):
                raise ValueError(f"{where} is a {node.op} ({node.target!r}): a custom loss reads only its inputs "
                                 "and calls only functions")
            for value in (*node.args, *node.kwargs.values()):
                self._check_value(where, value, seen)
            seen.add(node.name)
        outputs = [node for node in self.nodes if node.op == "output"]
        if len(outputs) != 1 or outputs[0] is not self.nodes[-1]:
            raise ValueError(f"custom loss {self.name!r}: the graph must end in one output node")
        returned = outputs[0].args[0] if outputs[0].args else None
        pair = returned.get("tuple") if isinstance(returned, dict) else returned
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict) and "dict" in pair[1]):
            raise ValueError(f"custom loss {self.name!r} must return (loss, metrics)")
        for key in pair[1]["dict"]:
            if not _METRIC_KEY.fullmatch(key):
                raise ValueError(f"custom loss {self.name!r}: metric {key!r} must be named custom/<name>:sum or "
                                 "custom/<name>:mean")

    def _check_value(self, where: str, value: Any, seen: set[str]) -> None:
        if isinstance(value, list):
            for item in value:
                self._check_value(where, item, seen)
        elif isinstance(value, dict):
            if len(value) != 1:
                raise ValueError(f"{where}: an encoded argument has one key, got {sorted(value)}")
            (kind, payload), = value.items()
            if kind == "ref" and payload not in seen:
                raise ValueError(f"{where} refers to {payload!r}, which no earlier node defines")
            elif kind in ("tuple", "slice"):
                self._check_value(where, payload, seen)
            elif kind == "dict":
                self._check_value(where, list(payload.values()), seen)
            elif kind == "float" and payload not in _FLOATS:
                raise ValueError(f"{where}: float {payload!r} is not inf, -inf or nan")
            elif kind == "dtype" and payload not in _DTYPES:
                raise ValueError(f"{where}: dtype {payload!r} is not one of {', '.join(_DTYPES)}")
            elif kind in ("memory_format", "layout") and (kind, payload) not in _CONSTANTS:
                raise ValueError(f"{where}: {kind} {payload!r} is not served")
            elif kind not in ("ref", "tuple", "slice", "dict", "float", "dtype", "memory_format", "layout",
                              "ellipsis"):
                raise ValueError(f"{where}: an argument of kind {kind!r} is not served")
        elif not (value is None or isinstance(value, bool | int | float | str)):
            raise ValueError(f"{where}: an argument {value!r} is not plain data")

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env: dict[str, Any] = {}
        arguments = iter(values)
        for node in self.nodes:
            args = [self._decode(value, env) for value in node.args]
            kwargs = {key: self._decode(value, env) for key, value in node.kwargs.items()}
            if node.op == "placeholder":
                env[node.name] = next(arguments)
            elif node.op == "call_function" and node.target == _GETATTR:
                env[node.name] = getattr(_tensor(node.name, args[0]), args[1])  # a name from ALLOWED_ATTRIBUTES
            elif node.op == "call_function":
                env[node.name] = ALLOWED_FUNCTIONS[node.target](*args, **kwargs)
            elif node.op == "call_method":  # a name from ALLOWED_METHODS, on a tensor
                env[node.name] = getattr(_tensor(node.name, args[0]), node.target)(*args[1:], **kwargs)
            else:
                loss, metrics = args[0]
                return loss, metrics
        raise AssertionError("checked: the graph ends in an output node")

    def _decode(self, value: Any, env: dict[str, Any]) -> Any:
        if isinstance(value, list):
            return [self._decode(item, env) for item in value]
        if not isinstance(value, dict):
            return value
        (kind, payload), = value.items()
        if kind == "ref":
            return env[payload]
        if kind == "tuple":
            return tuple(self._decode(item, env) for item in payload)
        if kind == "dict":
            return {key: self._decode(item, env) for key, item in payload.items()}
        if kind == "slice":
            return slice(*(self._decode(item, env) for item in payload))
        if kind == "ellipsis":
            return Ellipsis
        if kind == "float":
            return _FLOATS[payload]
        if kind == "dtype":
            return _DTYPES[payload]
        return _CONSTANTS[(kind, payload)]


def _tensor(node: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"custom loss node {node!r} calls a tensor method on a {type(value).__name__}")
    return value


def custom_loss_spec(name: str, inputs: list[CustomLossInput], graph: CustomLossGraph) -> LossSpec:
    """The loss a forward_backward with loss_fn="custom" runs: the graph on each datum, summed."""
    program = CustomLossProgram(name, inputs, graph)
    read = tuple(loss_input.name for loss_input in inputs[1:])

    def loss_fn(logprobs_D, inputs_D, config) -> tuple[torch.Tensor, Metrics]:
        total, metrics = 0.0, {}
        for logprobs, datum_inputs in zip(logprobs_D, inputs_D, strict=True):
            loss, datum_metrics = program(logprobs, *(datum_inputs[key] for key in read))
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError(f"custom loss {name!r} must return a scalar tensor as its loss")
            total = total + loss
            for key, value in datum_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        count = len(logprobs_D)
        metrics = {key: value / count if key.endswith(":mean") else value for key, value in metrics.items()}
        return total, {"loss:sum": float(total), **metrics}

    optional = tuple(key for key in KNOWN_INPUTS if key not in read)
    return LossSpec(loss_fn, inputs=("target_tokens", *read), optional_inputs=optional)
