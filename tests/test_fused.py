"""The learner's fused LoRA layer, target logprobs and attention against PEFT's, torch's and transformers' own
code, values and gradients, and LoraProduct's and TargetLogprobs' gradients against finite differences."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import eager_attention_forward

from rl.learner.fused import ATTENTION, FusedLoraLinear, LoraProduct, TargetLogprobs, attention, fuse_lora_layers


class TwoLayers(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(12, 20, bias=bias)
        self.down = torch.nn.Linear(20, 12, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_model(bias: bool, dtype: torch.dtype, adapters: int = 1):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(bias).to(dtype), LoraConfig(r=4, lora_alpha=32, target_modules=["up", "down"]),
                           adapter_name="a0")
    for index in range(1, adapters):
        model.add_adapter(f"a{index}", LoraConfig(r=4, lora_alpha=32, target_modules=["up", "down"]))
    with torch.no_grad():  # B starts at zero, which would hide A's part in the update and B's in A's gradient
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
                param.requires_grad_(True)
    return model


def values_and_gradients(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_computes_what_peft_computes(bias):
    model = peft_model(bias, torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    expected = values_and_gradients(model, x)
    fuse_lora_layers(model)
    assert [type(module) for module in model.modules() if isinstance(module, PeftLoraLinear)] == [FusedLoraLinear] * 2
    actual = values_and_gradients(model, x)
    assert torch.allclose(actual[0], expected[0], atol=1e-12)
    assert torch.allclose(actual[1], expected[1], atol=1e-12)
    assert actual[2].keys() == expected[2].keys() and len(actual[2]) == 4  # A and B of both layers, nothing else
    for name, grad in expected[2].items():
        assert torch.allclose(actual[2][name], grad, atol=1e-12), name


def test_lora_product_gradients_match_finite_differences():
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraProduct.apply(x, weight, bias, a, b, 2.5), (x, a, b))
    expected = x @ weight.T + bias + 2.5 * (x @ a.T) @ b.T
    assert torch.allclose(LoraProduct.apply(x, weight, bias, a, b, 2.5), expected, atol=1e-12)


def test_fused_lora_layer_in_bfloat16_under_autocast_matches_peft_within_rounding():
    # The learner's bf16 set-up: a bf16 base, float32 adapters, autocast to bf16, PEFT's input cast turned off.
    model = peft_model(False, torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = values_and_gradients(model, x)
        fuse_lora_layers(model)
        actual = values_and_gradients(model, x)
    assert actual[0].dtype == torch.bfloat16 and all(grad.dtype == torch.float32 for grad in actual[2].values())
    assert (actual[0].float() - expected[0].float()).abs().max() <= 0.05 * expected[0].float().abs().max()
    for name, grad in expected[2].items():
        assert (actual[2][name] - grad).norm() <= 0.02 * grad.norm(), name


def test_fused_lora_layer_leaves_other_cases_to_peft():
    model = peft_model(False, torch.float64, adapters=2)
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(x)
        model.base_model.set_adapter(["a0", "a1"])  # both adapters at once: PEFT adds both updates
        both = model(x)
        fuse_lora_layers(model)
        assert torch.allclose(model(x), both, atol=1e-12)
        with model.disable_adapter():
            assert torch.allclose(model(x), plain, atol=1e-12)
        model.base_model.set_adapter("a1")
        one = model(x)
        assert not torch.allclose(one, both) and not torch.allclose(one, plain)



def target_inputs(dtype: torch.dtype, rows: int = 70, vocab: int = 11):
    # 70 rows: more than one chunk of the float32 work; rows 0-9 are read by no datum token with a gradient, two
    # datum tokens read row 12, and each datum token has two targets (soft targets)
    torch.manual_seed(3)
    logits = (torch.randn(rows, vocab, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    reads = torch.cat([torch.arange(rows), torch.tensor([12])])
    targets = torch.randint(0, vocab, (len(reads), 2))
    weights = torch.randn(len(reads), 2, dtype=torch.float64)
    weights[:10] = 0.0
    return logits, reads, targets, weights


def reference_target_logprobs(logits, reads, targets):
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)[reads[:, None],
                                                                                               targets]


@pytest.mark.parametrize("function", [TargetLogprobs.apply, reference_target_logprobs])
def test_target_logprobs_and_their_gradient(function):
    logits, reads, targets, weights = target_inputs(torch.float64)
    logprobs = function(logits, reads, targets)
    (logprobs * weights).sum().backward()
    expected = torch.log_softmax(logits.detach(), dim=-1)
    assert torch.allclose(logprobs.detach(), expected[reads[:, None], targets], atol=1e-12)
    # by hand: d/dlogits[r] of sum_i,k w_ik logp_ik = sum_(i: reads_i = r) sum_k w_ik (onehot(t_ik) - softmax_r)
    by_hand = torch.zeros_like(expected)
    for i, row in enumerate(reads.tolist()):
        for k in range(targets.shape[1]):
            by_hand[row] -= weights[i, k] * expected[row].exp()
            by_hand[row, targets[i, k]] += weights[i, k]
    assert torch.allclose(logits.grad, by_hand, atol=1e-12)
    assert (logits.grad[:10] == 0).all()


def test_target_logprobs_gradients_match_finite_differences():
    logits, reads, targets, _ = target_inputs(torch.float64, rows=5, vocab=4)
    reads = torch.tensor([0, 2, 2, 4])
    assert torch.autograd.gradcheck(lambda x: TargetLogprobs.apply(x, reads, targets[:4]), (logits,))


def test_target_logprobs_of_bfloat16_logits_match_torch_within_rounding():
    grads = []
    for function in (TargetLogprobs.apply, reference_target_logprobs):
        logits, reads, targets, weights = target_inputs(torch.bfloat16)
        logprobs = function(logits, reads, targets)
        assert logprobs.dtype == torch.float32
        (logprobs * weights.float()).sum().backward()
        grads.append((logprobs.detach(), logits.grad.float()))
    (actual, actual_grad), (expected, expected_grad) = grads
    assert torch.allclose(actual, expected, atol=1e-5)  # float32 work on the same bf16 logits
    assert (actual_grad - expected_grad).norm() <= 0.01 * expected_grad.norm()


def attention_inputs(dtype: torch.dtype):
    torch.manual_seed(2)
    batch, heads, groups, width, head_dim = 2, 6, 2, 7, 8
    query = torch.randn(batch, heads, width, head_dim, dtype=dtype, requires_grad=True)
    key = torch.randn(batch, groups, width, head_dim, dtype=dtype, requires_grad=True)
    value = torch.randn(batch, groups, width, head_dim, dtype=dtype, requires_grad=True)
    allowed = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(batch, 1, 1)
    allowed[1, 4:, 1:3] = False  # a second datum in row 1 that does not see tokens 1-2
    mask = torch.zeros(batch, 1, width, width, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=heads // groups, training=False)
    return module, query, key, value, mask


def attention_and_gradients(function, dtype):
    module, query, key, value, mask = attention_inputs(dtype)
    output = function(module, query, key, value, mask, scaling=query.shape[-1] ** -0.5, dropout=0.0)[0]
    output.float().mul(torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    return output.detach().float(), [tensor.grad.float() for tensor in (query, key, value)]


def test_attention_computes_what_transformers_eager_attention_computes():
    # float64 in, but eager attention's softmax computes in float32 whatever the input: agreement to float32's
    expected, expected_grads = attention_and_gradients(eager_attention_forward, torch.float64)
    actual, actual_grads = attention_and_gradients(attention, torch.float64)
    assert torch.allclose(actual, expected, atol=1e-6)
    for grad, reference in zip(actual_grads, expected_grads, strict=True):
        assert torch.allclose(grad, reference, atol=1e-6)
    # the masked pairs take no part: a masked key's value changes nothing a query that may not see it computes
    module, query, key, value, mask = attention_inputs(torch.float64)
    changed = value.detach().clone()
    changed[1, :, 1:3] += 100.0
    before = attention(module, query, key, value, mask, scaling=0.35)[0]
    after = attention(module, query, key, changed, mask, scaling=0.35)[0]
    assert torch.allclose(before[1, 4:], after[1, 4:]) and not torch.allclose(before[1, 1:4], after[1, 1:4])


def test_attention_in_bfloat16_matches_eager_attention_within_rounding():
    expected, expected_grads = attention_and_gradients(eager_attention_forward, torch.bfloat16)
    actual, actual_grads = attention_and_gradients(attention, torch.bfloat16)
    assert (actual - expected).abs().max() < 0.05
    for grad, reference in zip(actual_grads, expected_grads, strict=True):
        assert (grad - reference).norm() <= 0.02 * reference.norm()


def test_attention_builds_the_causal_mask_when_given_none(tiny_model_dir):
    # A model loaded with rl's attention and called without a mask (as a user of the plain model would) is causal.
    tokens = torch.tensor([[5, 9, 2, 7, 3, 8]])
    logits = {}
    for name in ("eager", ATTENTION):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=name)
        with torch.no_grad():
            logits[name] = model(tokens).logits
            changed = model(torch.cat([tokens[:, :3], tokens[:, 3:] + 1], dim=1)).logits
        assert torch.allclose(changed[:, :3], logits[name][:, :3], atol=1e-6), "a token saw a later one"
    assert torch.allclose(logits[ATTENTION], logits["eager"], atol=1e-5)
