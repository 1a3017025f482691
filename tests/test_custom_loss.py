"""Server-side custom losses (rl.custom_loss): graphs traced by the SDK itself run as the traced function does,
and graphs that name anything outside the allow-list are refused with the node's name."""

import math

import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from rl.custom_loss import CustomLossProgram, custom_loss_spec
from rl.types import CustomLossGraph, CustomLossInput, CustomLossNode


def clipped_policy_loss(logprobs, advantages, sampled):
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/tokens:sum": (advantages != 0).float().sum()}


def shaped_loss(logprobs, weights):
    tail = torch.nn.functional.logsigmoid(logprobs[1:]).mean(dim=-1) * logprobs.shape[0]
    bonus = logprobs.detach().abs().max() + math.pi
    return -(tail * weights.sum()) + 0.0 * bonus, {"custom/bonus:mean": bonus}


def traced(fn, ranks):
    handle = trace_loss(fn, ranks, session_id="s")
    inputs = [CustomLossInput(name=i.name, rank=i.rank) for i in handle.inputs]
    graph = CustomLossGraph.model_validate(encode_graph(handle).model_dump(mode="json"))
    return inputs, graph


@pytest.mark.parametrize(("fn", "names"), [(clipped_policy_loss, ("advantages", "sampled")),
                                           (shaped_loss, ("weights",))])
def test_a_traced_loss_runs_as_the_function_does(fn, names):
    inputs, graph = traced(fn, {"logprobs": 1, **dict.fromkeys(names, 1)})
    program = CustomLossProgram(fn.__name__, inputs, graph)
    generator = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(7, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    others = [torch.randn(7, generator=generator, dtype=torch.float64) for _ in names]
    expected_loss, expected_metrics = fn(logprobs, *others)
    (expected_grad,) = torch.autograd.grad(expected_loss, logprobs)
    loss, metrics = program(logprobs, *others)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-12)
    assert {key: float(value) for key, value in metrics.items()} == pytest.approx(
        {key: float(value) for key, value in expected_metrics.items()}, rel=1e-12)

    # As a loss of the learner: summed over datums, :sum metrics add, :mean metrics average.
    spec = custom_loss_spec(fn.__name__, inputs, graph)
    assert spec.inputs == ("target_tokens", *names)
    datums = [dict(zip(names, others, strict=True)), {name: value * 2 for name, value in zip(names, others,
                                                                                           strict=True)}]
    total, batch_metrics = spec.fn([logprobs, logprobs], datums, {})
    second, second_metrics = fn(logprobs, *datums[1].values())
    assert total.item() == pytest.approx(expected_loss.item() + second.item(), rel=1e-12)
    for key, value in batch_metrics.items():
        if key.endswith(":mean"):
            assert value == pytest.approx((float(expected_metrics[key]) + float(second_metrics[key])) / 2)
        elif key.startswith("custom/"):
            assert value == pytest.approx(float(expected_metrics[key]) + float(second_metrics[key]))


def graph_with(node: CustomLossNode) -> CustomLossGraph:
    """logprobs -> `node` -> loss = sum of logprobs; the node under test sits in an otherwise valid graph."""
    return CustomLossGraph(nodes=[
        CustomLossNode(op="placeholder", name="logprobs", target="logprobs"),
        node,
        CustomLossNode(op="call_method", name="total", target="sum", args=[{"ref": "logprobs"}]),
        CustomLossNode(op="output", name="output", target="output", args=[{"tuple": [{"ref": "total"}, {"dict": {}}]}]),
    ])


@pytest.mark.parametrize(("node", "refusal"), [
    (CustomLossNode(op="call_function", name="evil", target="builtins.eval", args=["__import__('os')"]),
     r"node 'evil' calls 'builtins.eval', which is not an allowed operation"),
    (CustomLossNode(op="call_function", name="opened", target="builtins.open", args=["/etc/passwd"]),
     r"node 'opened' calls 'builtins.open'"),
    (CustomLossNode(op="call_function", name="shell", target="os.system", args=["true"]),
     r"node 'shell' calls 'os.system'"),
    (CustomLossNode(op="call_function", name="loader", target="torch.load", args=["x.pt"]),
     r"node 'loader' calls 'torch.load'"),
    (CustomLossNode(op="call_method", name="klass", target="__class__", args=[{"ref": "logprobs"}]),
     r"node 'klass' calls method '__class__', which is not an allowed tensor method"),
    (CustomLossNode(op="call_method", name="inplace", target="exp_", args=[{"ref": "logprobs"}]),
     r"node 'inplace' calls method 'exp_'"),
    (CustomLossNode(op="call_function", name="dunder", target="getattr",
                    args=[{"ref": "logprobs"}, "__globals__"]),
     r"node 'dunder' reads attribute \['__globals__'\]; only T, dtype, ndim, shape may be read"),
    (CustomLossNode(op="get_attr", name="captured", target="_tensor_constant0"),
     r"node 'captured' is a get_attr \('_tensor_constant0'\)"),
    (CustomLossNode(op="call_module", name="layer", target="linear", args=[{"ref": "logprobs"}]),
     r"node 'layer' is a call_module"),
    (CustomLossNode(op="call_function", name="dangling", target="torch.exp", args=[{"ref": "later"}]),
     r"node 'dangling' refers to 'later', which no earlier node defines"),
    (CustomLossNode(op="call_method", name="cast", target="to", args=[{"ref": "logprobs"}, {"dtype": "object"}]),
     r"node 'cast': dtype 'object' is not one of"),
    (CustomLossNode(op="call_method", name="odd", target="sum", args=[{"ref": "logprobs"}, {"code": "x"}]),
     r"node 'odd': an argument of kind 'code' is not served"),
])
def test_graphs_that_name_anything_else_are_refused_by_node(node, refusal):
    with pytest.raises(ValueError, match=refusal):
        CustomLossProgram("probe", [CustomLossInput(name="logprobs", rank=1)], graph_with(node))


def test_a_valid_hand_built_graph_runs():
    node = CustomLossNode(op="call_function", name="exp", target="torch.exp", args=[{"ref": "logprobs"}])
    program = CustomLossProgram("probe", [CustomLossInput(name="logprobs", rank=1)], graph_with(node))
    loss, metrics = program(torch.tensor([-1.0, -2.0]))
    assert loss.item() == pytest.approx(-3.0) and metrics == {}
