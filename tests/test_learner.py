"""The learner on the tiny model: real PEFT adapters, real AdamW, real checkpoints on disk."""

import json
import math

import numpy as np
import pytest
import ray
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rl import losses, models
from rl.learner import PROBE_LENGTH, Learner, probe_tokens
from rl.learner.batch import micro_batches, pack_rows, prepare_batch, row_datums, row_width, target_logprobs
from rl.types import AdamParams, Datum, EncodedTextChunk, ForwardBackwardInput, LoraConfig, ModelInput
from rl.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_content_hash

LORA = LoraConfig(rank=4, seed=0)
ADAM = AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def learner(tiny_model_dir, tmp_path_factory):
    return Learner(str(tiny_model_dir), storage=tmp_path_factory.mktemp("storage"))


def sft_datum(tokens: list[int], prompt_length: int = 1) -> Datum:
    return Datum.next_token(tokens, weights=[0.0] * (prompt_length + 1) + [1.0] * (len(tokens) - 1 - prompt_length))


PATTERN_TOKENS = [5, 17, 33, 17, 33, 17, 33, 17, 33, 9]
PATTERN = [sft_datum(PATTERN_TOKENS), sft_datum([8, 40, 41, 42, 40, 41, 42, 40])]


def sft(data=PATTERN) -> ForwardBackwardInput:
    return ForwardBackwardInput(data=data, loss_fn="cross_entropy")


def train(learner: Learner, model_id: str, steps: int, data=PATTERN) -> list[float]:
    losses_seen = []
    for _ in range(steps):
        losses_seen.append(learner.forward_backward(model_id, sft(data)).metrics["loss:sum"])
        learner.optim_step(model_id, ADAM)
    return losses_seen


def adapter_state(learner: Learner, model_id: str) -> list[torch.Tensor]:
    return [param.detach().clone() for param in learner._runs[model_id].params]


def grads(learner: Learner, model_id: str) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in learner._runs[model_id].params]


def test_same_seed_same_adapter_and_targets_follow_the_config(learner, tiny_model_dir):
    first, again, other = (learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=seed)) for seed in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(learner, first), adapter_state(learner, again),
                                                  strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(adapter_state(learner, first), adapter_state(learner, other),
                                                      strict=True))
    attention_only = learner.create(str(tiny_model_dir), LoraConfig(rank=2, seed=0, train_mlp=False,
                                                                     train_unembed=False))
    adapter = learner._runs[attention_only].adapter
    names = [name for name, _ in learner._peft.named_parameters() if f".{adapter}." in name]
    assert names and all(any(f"{m}.lora_" in name for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for name in names)
    assert len(names) == 2 * 4 * 2, "A and B for 4 attention projections in 2 layers"
    with pytest.raises(ValueError, match="trains nothing"):
        learner.create(str(tiny_model_dir), LoraConfig(rank=2, train_mlp=False, train_attn=False, train_unembed=False))
    with pytest.raises(ValueError, match="this learner holds"):
        learner.create("SmolLM2-135M-Instruct", LORA)


@pytest.mark.parametrize("rank", [4, 32])
def test_an_update_is_scaled_as_tinker_scales_it(learner, tiny_model_dir, rank):
    # Tinker's LoRA: W = W0 + (32 / rank) * B @ A at every rank. B starts at 0, so A gets no gradient on the first
    # step and Adam moves each entry of B by exactly the learning rate, against its gradient's sign. The learner's
    # logprobs after that step must be those of the plain model with that update merged by hand (lm_head untied,
    # as the LoRA of the output layer leaves the input embedding alone); the scale of the old definition
    # (alpha = 2 * rank) must not fit.
    model_id = learner.create(str(tiny_model_dir), LoraConfig(rank=rank, seed=0))
    learner.forward_backward(model_id, sft())
    gradients = {name: param.grad.clone() for name, param in learner._peft.named_parameters() if param.grad is not None}
    learner.optim_step(model_id, AdamParams(learning_rate=1e-3, weight_decay=0.0))
    adapter = learner._runs[model_id].adapter
    weights = {name.replace(f".{adapter}", ""): param.detach().cpu() for name, param in learner._peft.named_parameters()
               if f".{adapter}." in name}
    for name, b in weights.items():
        if ".lora_B." in name:
            moved = gradients[name.replace(".lora_B.", ".lora_B." + adapter + ".")].cpu() != 0
            assert torch.allclose(b[moved].abs(), torch.full_like(b[moved], 1e-3), rtol=1e-4) and moved.any()
    learned = torch.tensor(learner.logprobs(model_id, [PATTERN_TOKENS])[0])

    def merged_logprobs(scale: float) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        modules = dict(model.named_modules())
        for name, a in weights.items():
            if ".lora_A." in name:
                module = name.split(".lora_A.")[0].removeprefix("base_model.model.")
                b = weights[name.replace(".lora_A.", ".lora_B.")]
                modules[module].weight.data += scale * b @ a
        with torch.no_grad():
            logits = model(torch.tensor([PATTERN_TOKENS[:-1]])).logits[0]
        return logits.log_softmax(-1).gather(-1, torch.tensor(PATTERN_TOKENS[1:])[:, None])[:, 0]

    assert learner._runs[model_id].lora.rank == rank
    assert torch.allclose(learned, merged_logprobs(32 / rank), atol=1e-5)
    assert (learned - merged_logprobs(2.0)).abs().max() > 1e-3, "the old scale gives other logprobs"


def test_unknown_architecture_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' model; LoRA targets are known for llama, qwen2"):
        Learner(str(tmp_path), storage=tmp_path / "storage")


def test_sft_halves_the_loss_on_a_fixed_pattern(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    seen = train(learner, model_id, 8)
    final = learner.forward(model_id, sft()).metrics["loss:sum"]
    assert final < seen[0] / 2, seen + [final]
    assert learner.step(model_id) == 8


def test_logprobs_match_a_plain_forward_pass(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 2)
    output = learner.forward(model_id, sft())
    learner._peft.set_adapter(learner._runs[model_id].adapter)
    for datum, record in zip(PATTERN, output.loss_fn_outputs, strict=True):
        tokens = torch.tensor([datum.model_input.to_ints()], device=learner.device)
        with torch.no_grad():
            logits = learner._peft(input_ids=tokens).logits[0].float().cpu()  # (T, V): the full-vocabulary way
        targets = datum.loss_fn_inputs["target_tokens"].to_torch()
        expected = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        assert torch.allclose(record["logprobs"].to_torch(), expected, atol=1e-5)


def test_importance_sampling_raises_the_logprob_of_rewarded_tokens(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    tokens = [3, 50, 60, 70, 80, 90]
    probe = sft([sft_datum(tokens)])  # the same input and targets, read with cross_entropy
    before = learner.forward(model_id, probe).loss_fn_outputs[0]["logprobs"].to_torch()
    datum = Datum.next_token(tokens, logprobs=[0.0] + before.tolist(), advantages=[0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    for _ in range(3):
        learner.forward_backward(model_id, ForwardBackwardInput(data=[datum], loss_fn="importance_sampling"))
        learner.optim_step(model_id, AdamParams(learning_rate=5e-3))
    after = learner.forward(model_id, probe).loss_fn_outputs[0]["logprobs"].to_torch()
    assert (after[1:] > before[1:] + 0.1).all(), (before, after)


def test_micro_batches_give_the_gradient_of_one_pass(learner, tiny_model_dir):
    data = [sft_datum(list(range(10 + i, 10 + i + n))) for i, n in enumerate([12, 5, 30, 7, 18, 9])]
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)  # a non-zero B matrix, so every parameter gets a gradient
    learner.micro_batch_tokens = 10_000
    one_pass = learner.forward_backward(model_id, sft(data))
    expected = grads(learner, model_id)
    learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
    learner.micro_batch_tokens, learner.logits_chunk_tokens = 40, 7  # six micro-batches, many logit chunks
    try:
        split = learner.forward_backward(model_id, sft(data))
    finally:
        learner.micro_batch_tokens, learner.logits_chunk_tokens = 512, 1024
    assert split.metrics["loss:sum"] == pytest.approx(one_pass.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(one_pass.loss_fn_outputs, split.loss_fn_outputs, strict=True):
        assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-5)
    for a, b in zip(expected, grads(learner, model_id), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_ppo_clip_fraction_is_over_the_trained_tokens_however_the_batch_is_split(learner, tiny_model_dir):
    # A long datum sampled by the current weights (ratio 1: nothing clipped) and a short one whose 2 tokens were
    # 1.5x less likely under the sampler (ratio 1.5 > 1.2 with a positive advantage: clipped): 2 of 14 tokens.
    # Weighted by datums, micro-batches of one datum each would make it (0 + 1) / 2.
    model_id = learner.create(str(tiny_model_dir), LORA)
    long, short = list(range(10, 23)), [40, 41, 42]
    current = [learner.forward(model_id, sft([sft_datum(tokens, prompt_length=0)])).loss_fn_outputs[0]["logprobs"]
               .to_torch() for tokens in (long, short)]
    data = [Datum.next_token(long, logprobs=[0.0] + current[0].tolist(), advantages=[1.0] * len(long)),
            Datum.next_token(short, logprobs=[0.0] + (current[1] - math.log(1.5)).tolist(), advantages=[1.0] * 3)]
    batch = ForwardBackwardInput(data=data, loss_fn="ppo")
    fractions = []
    for micro_batch_tokens in (10_000, 8):  # one micro-batch; one a datum
        learner.micro_batch_tokens = micro_batch_tokens
        try:
            fractions.append(learner.forward(model_id, batch).metrics["clip_fraction:mean"])
        finally:
            learner.micro_batch_tokens = 512
    assert fractions == [pytest.approx(2 / 14), pytest.approx(2 / 14)]


def test_a_datum_over_the_token_budget_keeps_less_for_backward_and_gets_the_same_gradient(learner, tiny_model_dir):
    data = [sft_datum(list(range(10, 70))), sft_datum(list(range(20, 45)))]
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)

    def kept_for_backward(micro_batch_tokens: int) -> tuple[int, list, list]:
        learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
        kept = []
        learner.micro_batch_tokens = micro_batch_tokens
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
                output = learner.forward_backward(model_id, sft(data))
        finally:
            learner.micro_batch_tokens = 512
        return sum(kept), output.loss_fn_outputs, grads(learner, model_id)

    model = learner._peft.get_base_model()
    attention = model.config._attn_implementation  # eager on CPU, sdpa on CUDA
    within, logprobs, expected = kept_for_backward(10_000)
    over, logprobs_over, saved = kept_for_backward(8)  # both datums wider than the budget
    assert model.config._attn_implementation == attention and not model.training  # restored after the call
    # Layer activations are recomputed in backward (the hook sees each layer's input, not its insides).
    assert over < within / 2, (over, within)
    for a, b in zip(logprobs, logprobs_over, strict=True):
        assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-5)
    for a, b in zip(expected, saved, strict=True):  # CUDA's SDPA kernels tile by width: ~1e-6 of scale
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-4), ((a - b).abs().max(), a.shape)


def test_datums_that_share_a_prefix_share_a_row_with_the_same_logprobs_and_gradients(learner, tiny_model_dir):
    prompt, other = list(range(40, 60)), list(range(100, 110))
    data = [sft_datum(prompt + [7, 8, 9]), sft_datum(prompt + [11, 12]),  # a pair: one row, the prompt once
            sft_datum(prompt + [7, 30, 31]),  # branches off the first datum after its 21st token: a deeper fork
            sft_datum(prompt[:8] + list(range(200, 222))),  # shares 8 of its 29 tokens: too little, a row alone
            sft_datum(other + [5] * 6), sft_datum(other + [6] * 3), sft_datum(other),
            sft_datum([3, 4, 5, 6])]  # unrelated: a row of its own
    prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    rows = pack_rows(prepared)
    assert [len(row.members) for row in rows] == [3, 1, 3, 1]
    # Inputs drop the last token; a row holds each token once however many datums begin with it. The first row:
    # 22 tokens, then 1 after the shared prompt, then 1 after the first datum's 21; the group: 15, then 2 after
    # `other`, then nothing (the third is a prefix of the first).
    assert [len(row.tokens) for row in rows] == [22 + 1 + 1, 29, 15 + 2 + 0, 3]
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)  # a non-zero B matrix, so every parameter gets a gradient
    together = learner.forward_backward(model_id, sft(data))
    packed = grads(learner, model_id)
    learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
    alone = [learner.forward_backward(model_id, sft([datum])) for datum in data]  # one datum per row; grads add up
    for output, single in zip(together.loss_fn_outputs, alone, strict=True):
        assert torch.allclose(output["logprobs"].to_torch(), single.loss_fn_outputs[0]["logprobs"].to_torch(),
                              atol=1e-5)
    for a, b in zip(packed, grads(learner, model_id), strict=True):  # float32 sums in another order: ~1e-6 of scale
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-4), ((a - b).abs().max(), a.shape)
    learner._runs[model_id].optimizer.zero_grad(set_to_none=True)


def random_rows(rng) -> list:
    """Groups that share a prompt, some replies forking off early, as pack_rows lays them out."""
    data = []
    for _ in range(rng.randint(1, 5)):
        prompt = [rng.randrange(50) for _ in range(rng.randint(8, 40))]
        for _ in range(rng.randint(1, 5)):
            start = prompt[: rng.randint(0, len(prompt))] if rng.random() < 0.3 else prompt
            data.append(sft_datum(start + [rng.randrange(50) for _ in range(rng.randint(2, 20))]))
    return pack_rows(prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048))


def test_row_attention_lets_each_token_see_exactly_its_own_datums_earlier_tokens():
    import random

    from rl.learner.batch import row_attention

    rng = random.Random(0)
    for _ in range(20):
        rows = random_rows(rng)
        width = row_width(rows) + 2
        expected = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees only itself
        for index, row in enumerate(rows):
            for path in row.members:  # along a datum's path, each token sees itself and those before it
                for later, token in enumerate(path):
                    expected[index, token, path[: later + 1]] = True
        mask = row_attention(rows, width, torch.float32, torch.device("cpu"))
        assert mask.shape == (len(rows), 1, width, width)
        assert torch.equal(mask[:, 0] == 0, expected)
        assert (mask[:, 0][~expected] == torch.finfo(torch.float32).min).all()


def test_attention_in_blocks_computes_what_attention_through_the_row_mask_computes():
    import random
    from types import SimpleNamespace

    from rl.learner.batch import attention_blocks, row_attention
    from rl.learner.fused import attention

    rng = random.Random(1)
    cpu, dtype = torch.device("cpu"), torch.float64
    module = SimpleNamespace(training=False)
    for case in range(20):
        rows = random_rows(rng)
        width = row_width(rows) + 2
        torch.manual_seed(case)
        query = torch.randn(len(rows), 6, width, 8, dtype=dtype, requires_grad=True)
        key, value = (torch.randn(len(rows), 2, width, 8, dtype=dtype, requires_grad=True) for _ in range(2))
        real = torch.zeros(len(rows), width, 1, 1, dtype=dtype)  # (R, W, heads, head_dim) like the output
        for index, row in enumerate(rows):
            real[index, : len(row.tokens)] = 1.0
        weights = torch.randn(len(rows), width, 6, 8, dtype=dtype) * real  # padding's outputs are never read
        results = []
        row_mask = row_attention(rows, width, dtype, cpu)
        for blocks in (None, attention_blocks(rows, row_mask)):
            mask = row_mask if blocks is None else None
            output = attention(module, query, key, value, mask, scaling=0.35, attention_blocks=blocks)[0]
            (output * weights).sum().backward()
            results.append((output.detach() * real, [t.grad.clone() for t in (query, key, value)]))
            for tensor in (query, key, value):
                tensor.grad = None
        (expected, expected_grads), (actual, actual_grads) = results
        assert torch.allclose(actual, expected, atol=1e-12)
        for grad, reference in zip(actual_grads, expected_grads, strict=True):
            assert torch.allclose(grad, reference, atol=1e-12)


def test_attention_blocks_hold_an_rl_group_each():
    from rl.learner.batch import attention_blocks, row_attention

    template = [1, 2, 3, 4, 5, 6]  # the chat template every prompt begins with
    data = [sft_datum(template + [100 + 40 * g + i for i in range(30)] + [10 + g * 5 + r] * 16)  # 15 inputs
            for g in range(3) for r in range(4)]
    prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    [rows] = micro_batches([(prepared, 4)], 512)
    assert len(rows) == 1 and len(rows[0].tokens) == 6 + 3 * (30 + 4 * 15), "one row, the template once"
    [row] = attention_blocks(rows, row_attention(rows, row_width(rows), torch.float32, torch.device("cpu")))
    blocks = row.blocks
    assert [(block.start, block.end) for block in blocks] == [(0, 96), (96, 186), (186, 276)]
    assert row.bounds == [0, 6, 96, 186, 276]  # the template, then each group's tokens
    assert [block.pieces for block in blocks] == [[0, 1], [0, 2], [0, 3]], "the template and the group's own"
    assert [block.mask.shape for block in blocks] == [(1, 1, 96, 96), (1, 1, 90, 96), (1, 1, 90, 96)]
    allowed = sum(int((block.mask == 0).sum()) for block in blocks)
    # A token at position p of its datum sees p + 1 tokens: the template's, each group's prompt and four replies
    assert allowed == sum(range(1, 7)) + 3 * (sum(range(7, 37)) + 4 * sum(range(37, 52)))


def test_the_learner_on_a_cpu_attends_in_blocks(tiny_model_dir, tmp_path, monkeypatch):
    # The blocks reach rl's attention through transformers' keyword arguments, which a model could stop passing on
    from transformers import AttentionInterface

    from rl.learner import fused

    seen = []

    def spy(*args, attention_blocks=None, **kwargs):
        seen.append(attention_blocks)
        return fused.attention(*args, attention_blocks=attention_blocks, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, fused.ATTENTION, spy)
    learner = Learner(str(tiny_model_dir), storage=tmp_path, device="cpu")  # a GPU learner attends through SDPA
    model_id = learner.create(learner.base_model, LORA)
    learner.forward(model_id, sft())
    assert seen and all(blocks is not None and blocks[0].blocks for blocks in seen)


def test_packed_rows_stay_within_their_width_limit():
    from rl.learner.batch import PACKED_ROW_MAX

    data = [sft_datum(list(range(40)) + [100 + i] * 30) for i in range(20)]  # one prompt, 20 replies
    prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    rows = pack_rows(prepared)
    assert len(rows) > 1 and all(len(row.tokens) <= PACKED_ROW_MAX for row in rows)
    assert sum(len(row.members) for row in rows) == 20
    assert len(rows[0].tokens) == 40 + 16 * 29, "as many replies as fit: the shared prompt, then 29 tokens each"


def test_micro_batches_hold_whole_groups_within_the_token_budget():
    # Six RL-like groups: a prompt of 10-30 tokens, four replies of 2-20 tokens each.
    data = [sft_datum(list(range(100 * g, 100 * g + 10 + 4 * g)) + [7 + r] * (2 + 3 * ((g + r) % 7)))
            for g in range(6) for r in range(4)]
    prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    budget = 120
    micro = micro_batches([(prepared, 4)], budget)
    assert len(micro) > 1
    indices = [datum.index for rows in micro for datum in row_datums(rows)]
    assert sorted(indices) == list(range(len(data))), "every datum exactly once"
    for rows in micro:
        groups = [datum.index // 4 for datum in row_datums(rows)]
        assert all(groups.count(group) == 4 for group in groups), "groups stay whole"
        one_group = len(set(groups)) == 1
        assert one_group or len(rows) * row_width(rows) <= budget, "within the budget, padding included"
    assert sum(len(row.tokens) for rows in micro for row in rows) < sum(len(d.tokens) for d in prepared), \
        "a group's prompt is computed once"


def test_micro_batches_lay_narrow_rows_side_by_side_instead_of_padding_them():
    # Rows of 60, 25, 20 and 20 tokens (the last two begin with the same 8 tokens, too few of their 20 to share a
    # row in pack_rows). Padded to the widest row, 2 rows a micro-batch, they took 2 x 60 + 2 x 20 = 160 tokens for
    # 125; side by side in one row they take 117, the common 8 once. (The learner computes such a row exactly:
    # test_datums_that_share_a_prefix_share_a_row_with_the_same_logprobs_and_gradients lays its rows side by side.)
    system = list(range(300, 308))
    data = [sft_datum(list(range(10, 71))), sft_datum(list(range(100, 126))),
            sft_datum(system + list(range(200, 213))), sft_datum(system + list(range(400, 413)))]
    prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    assert [len(row.tokens) for row in pack_rows(prepared)] == [60, 25, 20, 20]
    (rows,) = micro_batches([(prepared, 1)], 125)
    assert len(rows) == 1 and len(rows[0].tokens) == 125 - 8
    assert sorted(datum.index for datum in row_datums(rows)) == [0, 1, 2, 3]
    # A smaller budget closes a micro-batch when the next row would not fit beside the others.
    micro = micro_batches([(prepared, 1)], 100)
    assert [[len(row.tokens) for row in rows] for rows in micro] == [[85], [32]]


def test_runs_batched_in_one_pass_get_what_each_gets_alone(learner, tiny_model_dir):
    # Three runs with different adapters (one without the output layer's LoRA), losses and group sizes (a DPO pair
    # and its reference), in micro-batches that mix their rows and micro-batches of one run's rows; a fourth call
    # is refused and fails alone.
    runs = [learner.create(str(tiny_model_dir), LORA),
            learner.create(str(tiny_model_dir), LoraConfig(rank=8, seed=3)),
            learner.create(str(tiny_model_dir), LoraConfig(rank=2, seed=5, train_unembed=False)),
            learner.create(str(tiny_model_dir), LORA)]
    for model_id in runs:
        train(learner, model_id, 1)  # non-zero B matrices, so every parameter gets a gradient
    rewarded = Datum.next_token([3, 50, 60, 70, 80, 90], logprobs=[0.0, -1.0, -2.0, -0.5, -1.5, -3.0],
                                advantages=[0.0, 0.0, 1.0, -1.0, 1.0, 0.5])
    pairs = [sft_datum([4, 5, 6, 7, 8], prompt_length=2), sft_datum([4, 5, 9, 10, 11], prompt_length=2)]
    oov = Datum(model_input=ModelInput.from_ints([1, 2048, 3]), loss_fn_inputs={"target_tokens": [1, 2, 3],
                                                                                "weights": [1.0, 1.0, 1.0]})
    batches = [sft(), ForwardBackwardInput(data=[rewarded, rewarded], loss_fn="importance_sampling"),
               ForwardBackwardInput(data=pairs, loss_fn="dpo", loss_fn_config={"beta": 0.5}),
               sft([PATTERN[0], oov])]
    learner.micro_batch_tokens = 24  # micro-batches that hold rows of two runs
    try:
        alone = []
        for model_id, batch in zip(runs[:3], batches, strict=False):
            alone.append((learner.forward_backward(model_id, batch), grads(learner, model_id)))
            learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
        mixed = micro_batches([(prepare_batch(batch.data, losses.LOSSES[batch.loss_fn], batch.loss_fn, 2048),
                                losses.LOSSES[batch.loss_fn].datums_per_group) for batch in batches[:3]], 24)
        runs_per_micro_batch = [len({row.part for row in rows}) for rows in mixed]
        assert max(runs_per_micro_batch) > 1 and min(runs_per_micro_batch) == 1, runs_per_micro_batch
        together = learner.forward_backward_many([(model_id, batch, None) for model_id, batch in zip(runs, batches,
                                                                                                     strict=True)])
    finally:
        learner.micro_batch_tokens = 512
    for model_id, (output, expected), result in zip(runs, alone, together, strict=False):
        assert result.metrics == pytest.approx(output.metrics, rel=1e-5, abs=1e-6)
        for a, b in zip(output.loss_fn_outputs, result.loss_fn_outputs, strict=True):
            assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-5)
        for a, b in zip(expected, grads(learner, model_id), strict=True):
            assert torch.allclose(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-4), ((a - b).abs().max(), a.shape)
        learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
    assert isinstance(together[3], ValueError)
    assert "data[1].model_input holds token id 2048" in str(together[3])
    assert all(grad is None for grad in grads(learner, runs[3])), "the refused call left its run as it was"
    with pytest.raises(ValueError, match="one call per run"):
        learner.forward_backward_many([(runs[0], sft(), None), (runs[0], sft(), None)])
    for model_id in runs:
        learner.delete(model_id)


def test_runs_called_in_turn_train_as_alone_and_runs_deleted_after_a_shared_pass_leave_the_rest_working(
        learner, tiny_model_dir):
    # rl-serve's users: calls of different runs alternate on one learner, each switching the active adapter (set on
    # the LoRA layers directly, `Learner._activate`), and runs are deleted while others stay.
    alone = []
    for seed in (7, 8):
        model_id = learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=seed))
        alone.append(train(learner, model_id, 3))
        learner.delete(model_id)
    assert all(seen[-1] < seen[0] for seen in alone), alone
    runs = [learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=seed)) for seed in (7, 8)]
    in_turn = [[], []]
    for _ in range(3):
        for index, model_id in enumerate(runs):
            in_turn[index] += train(learner, model_id, 1)
    for seen, expected in zip(in_turn, alone, strict=True):
        assert seen == pytest.approx(expected, rel=1e-5)
    runs.append(learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=9)))
    learner.forward_backward_many([(model_id, sft(), None) for model_id in runs])  # three adapters active
    learner.delete(runs[0])  # two stay active
    pair = [sft_datum([4, 5, 6, 7, 8], prompt_length=2), sft_datum([4, 5, 9, 10, 11], prompt_length=2)]
    dpo = learner.forward(runs[1], ForwardBackwardInput(data=pair, loss_fn="dpo"))  # its reference: adapters off
    assert dpo.metrics["loss:sum"] > 0, "the other runs still answer"
    learner.delete(runs[1])
    learner.delete(runs[2])
    again = learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=7))
    # PEFT still names the last deleted adapter active: the next run's reference (adapters off) is computed anyway.
    assert learner.forward(again, ForwardBackwardInput(data=pair, loss_fn="dpo")).metrics["loss:sum"] > 0
    assert train(learner, again, 3) == pytest.approx(alone[0], rel=1e-5)
    learner.delete(again)


def test_gradients_accumulate_until_optim_step(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)
    learner.forward_backward(model_id, sft(PATTERN[:1]))
    learner.forward_backward(model_id, sft(PATTERN[1:]))
    accumulated = grads(learner, model_id)
    learner._runs[model_id].optimizer.zero_grad(set_to_none=True)
    learner.forward_backward(model_id, sft())
    one_pass = grads(learner, model_id)
    for a, b in zip(accumulated, one_pass, strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # float32 sums in another order, on gradients up to ~5
    learner.forward(model_id, sft())
    for a, b in zip(one_pass, grads(learner, model_id), strict=True):
        assert torch.equal(a, b), "forward adds no gradient"
    metrics = learner.optim_step(model_id, AdamParams(learning_rate=1e-3, grad_clip_norm=1e-3)).metrics
    expected_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in accumulated))
    assert metrics["grad_norm:mean"] == pytest.approx(float(expected_norm), rel=1e-5), "norm before clipping"
    assert metrics["learning_rate:mean"] == 1e-3 and metrics["step:max"] == 2.0
    assert all(g is None for g in grads(learner, model_id))
    with pytest.raises(ValueError, match="no gradients"):
        learner.optim_step(model_id, ADAM)


@pytest.mark.parametrize("loss_fn", ["cispo", "dro"])
def test_policy_losses_through_the_learner_match_their_formulas(learner, tiny_model_dir, loss_fn):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 2)
    tokens = PATTERN_TOKENS
    current = np.array(learner.logprobs(model_id, [tokens])[0])
    sampler = current + np.linspace(-0.5, 0.5, len(current))  # the sampler saw somewhat other weights
    advantages = np.linspace(-1.0, 1.0, len(current))
    datum = Datum.next_token(tokens, logprobs=[0.0, *sampler], advantages=[0.0, *advantages])
    output = learner.forward(model_id, ForwardBackwardInput(data=[datum], loss_fn=loss_fn))
    if loss_fn == "cispo":  # -sum sg[clip(r, 0, 4)] * logp * A, default thresholds
        expected = -(np.clip(np.exp(current - sampler), 0.0, 4.0) * current * advantages).sum()
    else:  # dro: -sum (logp * A - beta/2 * (logp - q)^2), default beta 0.1
        expected = -(current * advantages - 0.05 * (current - sampler) ** 2).sum()
    assert output.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)


def test_gradient_clipping_clips_what_adam_sees(learner, tiny_model_dir):
    # AdamW's first moment after one step is (1 - beta1) * the gradient it was given: its norm shows the clipping.
    for clip in (1e-3, 0.0):
        model_id = learner.create(str(tiny_model_dir), LORA)
        learner.forward_backward(model_id, sft())
        raw = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads(learner, model_id))))
        reported = learner.optim_step(model_id, AdamParams(learning_rate=1e-3, beta1=0.9,
                                                           grad_clip_norm=clip)).metrics["grad_norm:mean"]
        optimizer = learner._runs[model_id].optimizer
        given = float(torch.sqrt(sum(((state["exp_avg"] / 0.1).double() ** 2).sum()
                                     for state in optimizer.state.values())))
        assert reported == pytest.approx(raw, rel=1e-5), "the norm reported is the one before clipping"
        assert given == pytest.approx(clip if clip else raw, rel=1e-4), (clip, raw, given)
        assert raw > 100 * 1e-3, "the clip bound is well below the raw norm"


def test_weight_decay_is_adamws_decoupled_decay(learner, tiny_model_dir):
    # On the first step B = 0, so A gets no gradient and Adam moves it by nothing: only the decay, A * (1 - lr * wd).
    model_id = learner.create(str(tiny_model_dir), LORA)
    adapter = learner._runs[model_id].adapter
    before = {name: param.detach().clone() for name, param in learner._peft.named_parameters()
              if f".lora_A.{adapter}." in name}
    learner.forward_backward(model_id, sft())
    learner.optim_step(model_id, AdamParams(learning_rate=0.1, weight_decay=0.5))
    after = dict(learner._peft.named_parameters())
    assert before and all(torch.allclose(after[name], a * 0.95, rtol=1e-6, atol=0) and not torch.equal(after[name], a)
                          for name, a in before.items())


def test_a_non_finite_gradient_is_skipped_cleared_and_the_run_trains_on(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)
    optimizer = learner._runs[model_id].optimizer
    moments = [{key: value.clone() for key, value in state.items()} for state in optimizer.state.values()]
    huge = [Datum.next_token(PATTERN_TOKENS, weights=[3e38] * len(PATTERN_TOKENS))]  # the loss overflows float32
    learner.forward_backward(model_id, sft(huge))
    before = {name: value.clone() for name, value in learner._peft.named_parameters() if value.requires_grad}
    metrics = learner.optim_step(model_id, ADAM).metrics
    assert metrics["skipped_steps:sum"] == 1.0 and "grad_norm:mean" not in metrics
    after = {name: value for name, value in learner._peft.named_parameters() if value.requires_grad}
    assert all(torch.equal(before[name], after[name]) for name in before), "no weight moved"
    assert learner.step(model_id) == 1 and metrics["step:max"] == 1.0
    assert all(g is None for g in grads(learner, model_id)), "the gradients were cleared"
    assert all(torch.equal(kept[key], value) for kept, state in zip(moments, optimizer.state.values(), strict=True)
               for key, value in state.items()), "Adam's moments did not see the bad gradient"

    loss_before = learner.forward(model_id, sft()).metrics["loss:sum"]
    learner.forward_backward(model_id, sft())
    metrics = learner.optim_step(model_id, ADAM).metrics
    assert metrics["skipped_steps:sum"] == 0.0 and math.isfinite(metrics["grad_norm:mean"])
    assert learner.step(model_id) == 2
    assert learner.forward(model_id, sft()).metrics["loss:sum"] < loss_before, "the run trains on"


def test_runs_are_isolated(learner, tiny_model_dir):
    trained, untouched = learner.create(str(tiny_model_dir), LORA), learner.create(str(tiny_model_dir), LORA)
    before = learner.forward(untouched, sft()).metrics["loss:sum"]
    train(learner, trained, 3)
    assert learner.forward(untouched, sft()).metrics["loss:sum"] == before
    assert learner.forward(trained, sft()).metrics["loss:sum"] < before


def test_resume_is_exact(tiny_model_dir, tmp_path):
    straight = Learner(str(tiny_model_dir), storage=tmp_path)
    model_id = straight.create(str(tiny_model_dir), LORA)
    train(straight, model_id, 2)
    path = straight.save_weights(model_id, "half").path
    assert path == f"tinker://{model_id}/weights/half"
    train(straight, model_id, 2)
    saved = straight.store.folder(path) / "optimizer.pt"  # as a learner wrote it before the fused AdamW
    state = torch.load(saved, weights_only=True)
    for group in state["param_groups"]:
        group["fused"] = None
    torch.save(state, saved)

    resumed = Learner(str(tiny_model_dir), storage=tmp_path)
    resumed_id = resumed.load_weights(path, optimizer=True).model_id
    assert resumed.step(resumed_id) == 2
    assert all(group["fused"] for group in resumed._runs[resumed_id].optimizer.param_groups)
    train(resumed, resumed_id, 2)
    for a, b in zip(adapter_state(straight, model_id), adapter_state(resumed, resumed_id), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert resumed.forward(resumed_id, sft()).metrics["loss:sum"] == pytest.approx(
        straight.forward(model_id, sft()).metrics["loss:sum"], abs=1e-6)

    weights_only = resumed.load_weights(path, optimizer=False).model_id
    assert resumed.step(weights_only) == 0 and not resumed._runs[weights_only].optimizer.state


def test_bfloat16_logprobs_match_float32_within_rounding(tiny_model_dir, tmp_path):
    # bf16 is the recipes' dtype: the same base model and adapter must give the float32 logprobs, rounded.
    full = Learner(str(tiny_model_dir), storage=tmp_path)
    model_id = full.create(str(tiny_model_dir), LORA)
    train(full, model_id, 4)  # B != 0: the adapter takes part
    base_id = full.create(str(tiny_model_dir), LORA)
    half = Learner(str(tiny_model_dir), storage=tmp_path, dtype="bfloat16")
    half_id = half.load_weights(full.save_weights(model_id, "trained").path, optimizer=False).model_id
    assert half._hf.dtype == torch.bfloat16
    expected_D, actual_D, base_D = ([r["logprobs"].to_torch() for r in owner.forward(run, sft()).loss_fn_outputs]
                                    for owner, run in ((full, model_id), (half, half_id), (full, base_id)))
    for expected, actual, base in zip(expected_D, actual_D, base_D, strict=True):
        difference = (actual - expected).abs()
        assert difference.mean() < 0.05 and difference.max() < 0.2  # measured: 0.007 and 0.02
        assert difference.max() > 0, "bf16 rounds: identical logprobs would mean float32 ran"
        assert (expected - base).abs().mean() > 0.5, "the check tells the trained adapter from the base model"


def test_bfloat16_training_halves_the_loss(tiny_model_dir, tmp_path):
    half = Learner(str(tiny_model_dir), storage=tmp_path, dtype="bfloat16")
    model_id = half.create(str(tiny_model_dir), LORA)
    seen = train(half, model_id, 8)
    final = half.forward(model_id, sft()).metrics["loss:sum"]
    assert final < seen[0] / 2, seen + [final]


def read_adapter(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


def test_sampler_weights_are_a_peft_folder_with_a_content_hash_and_a_probe(ray_local, learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 2)
    saved = learner.save_weights_for_sampler(model_id, "for-sampling")
    path = saved.tinker_path
    assert path == f"tinker://{model_id}/sampler_weights/for-sampling" and saved.step == 2
    folder = learner.store.folder(path)
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= {p.name for p in folder.iterdir()}
    assert ray.get(saved.files) == read_adapter(folder), "the bytes written are the bytes published"
    assert learner.store.metadata(path)["content_hash"] == saved.content_hash == adapter_content_hash(
        read_adapter(folder))
    assert json.loads(read_adapter(folder)[ADAPTER_CONFIG])["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    # The probe: the learner's logprobs of a fixed sequence under these weights, recorded with the checkpoint.
    assert saved.probe_tokens == probe_tokens(learner.vocab_size) and len(saved.probe_tokens) == PROBE_LENGTH
    probe = Datum.next_token(saved.probe_tokens, weights=[0.0] * PROBE_LENGTH)
    expected = learner.forward(model_id, ForwardBackwardInput(data=[probe], loss_fn="cross_entropy"))
    assert saved.probe_logprobs == pytest.approx(expected.loss_fn_outputs[0]["logprobs"].data, abs=1e-6)
    exported = learner.sampler_weights(path)
    assert ray.get(exported.files) == read_adapter(folder)
    assert (exported.content_hash, exported.probe_logprobs, exported.step) == (saved.content_hash,
                                                                               saved.probe_logprobs, 2)
    assert (folder / ADAPTER_WEIGHTS).stat().st_size < 500_000, "LoRA matrices only, not the output layer"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, folder).eval()
    model = plain.get_base_model()
    from rl.learner.batch import prepare_batch

    prepared = prepare_batch(PATTERN, losses.LOSSES["cross_entropy"], "cross_entropy", 2048)
    with torch.no_grad():
        expected = target_logprobs(model.get_decoder(), model.get_output_embeddings(), pack_rows(prepared), pad_id=0,
                                   chunk_tokens=1024, device=torch.device("cpu"))
    output = learner.forward(model_id, sft())
    for record, logprobs in zip(output.loss_fn_outputs, expected, strict=True):
        assert torch.allclose(record["logprobs"].to_torch(), logprobs, atol=1e-5)

    listed = learner.list_checkpoints(model_id).checkpoints
    assert [(c.checkpoint_type, c.checkpoint_id) for c in listed] == [("sampler", "sampler_weights/for-sampling")]
    assert listed[0].size_bytes == sum(map(len, read_adapter(folder).values())), "the files, checkpoint.json aside"
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        learner.save_weights_for_sampler(model_id, "for-sampling")
    train(learner, model_id, 1)
    learner.save_weights_for_sampler(model_id, "for-sampling", overwrite=True)
    assert learner.store.metadata(path)["step"] == 3
    (folder / ADAPTER_WEIGHTS).write_bytes((folder / ADAPTER_WEIGHTS).read_bytes()[:-4] + b"\0" * 4)
    with pytest.raises(ValueError, match="no longer matches the content hash"):
        learner.sampler_weights(path)


def test_logprobs_of_given_tokens_with_the_adapter_or_without(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 3)
    sequences = [[5, 17, 33, 17, 33, 9], [8, 40, 41]]
    with_adapter = learner.logprobs(model_id, sequences)
    assert [len(logprobs) for logprobs in with_adapter] == [5, 2]
    batch = ForwardBackwardInput(data=[Datum.next_token(tokens, weights=[0.0] * len(tokens)) for tokens in sequences],
                                 loss_fn="cross_entropy")
    trained = learner.forward(model_id, batch).loss_fn_outputs
    for logprobs, output in zip(with_adapter, trained, strict=True):
        assert logprobs == pytest.approx(output["logprobs"].data, abs=1e-6)
    fresh = learner.create(str(tiny_model_dir), LORA.model_copy(update={"seed": 7}))  # B = 0: the base model
    base = learner.forward(fresh, batch).loss_fn_outputs
    without = learner.logprobs(model_id, sequences, adapter=False)
    for logprobs, output, tuned in zip(without, base, with_adapter, strict=True):
        assert logprobs == pytest.approx(output["logprobs"].data, abs=1e-6)
        assert max(abs(a - b) for a, b in zip(logprobs, tuned, strict=True)) > 1e-3, "the adapter was on before"
    assert learner.logprobs(model_id, sequences) == with_adapter, "the adapter is on again"
    # A judge's verdict: the last tokens' alone (the output layer on the rows they read: a shared prefix once).
    shared = [[5, 17, 33, 17, 33, 9], [5, 17, 33, 18], [8, 40, 41]]
    everything = learner.logprobs(model_id, shared)
    for last in (1, 2, 5):
        tails = learner.logprobs(model_id, shared, last=last)
        assert [len(tail) for tail in tails] == [min(last, len(logprobs)) for logprobs in everything]
        for tail, logprobs in zip(tails, everything, strict=True):
            assert tail == pytest.approx(logprobs[-last:], rel=1e-5, abs=1e-5)  # fewer rows: other rounding
    with pytest.raises(ValueError, match=r"data\[1\].model_input holds token id 4096"):
        learner.logprobs(model_id, [[1, 2], [4096, 3]])
    for last in (0, -1):
        with pytest.raises(ValueError, match=f"last must be at least 1 .*got {last}"):
            learner.logprobs(model_id, shared, last=last)


def test_dpo_reference_defaults_to_the_base_model(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    pairs = [sft_datum([4, 5, 6, 7, 8], prompt_length=2), sft_datum([4, 5, 9, 10, 11], prompt_length=2),
             sft_datum([12, 13, 14, 15], prompt_length=1), sft_datum([12, 13, 16, 17], prompt_length=1)]
    dpo = ForwardBackwardInput(data=pairs, loss_fn="dpo", loss_fn_config={"beta": 0.5})
    fresh = learner.forward(model_id, dpo).metrics
    assert fresh["loss:sum"] == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-6), \
        "a fresh adapter is the reference: every margin is 0"
    train(learner, model_id, 2, data=[pairs[0], pairs[2]])  # SFT on the chosen answers
    implicit = learner.forward(model_id, dpo)
    reference = learner.forward(learner.create(str(tiny_model_dir), LORA), sft(pairs))
    explicit_pairs = [Datum(model_input=d.model_input, loss_fn_inputs={**d.loss_fn_inputs,
                                                                       "ref_logprobs": r["logprobs"]})
                      for d, r in zip(pairs, reference.loss_fn_outputs, strict=True)]
    explicit = learner.forward(model_id, ForwardBackwardInput(data=explicit_pairs, loss_fn="dpo",
                                                              loss_fn_config={"beta": 0.5}))
    assert implicit.metrics == pytest.approx(explicit.metrics, abs=1e-6)
    assert implicit.metrics["dpo_accuracy:mean"] == 1.0 and implicit.metrics["dpo_margin:mean"] > 0
    # IPO reads the same reference (beta 0.5: a target margin of 1, so a fresh adapter's loss is 1 a pair).
    def ipo(data: list[Datum]) -> ForwardBackwardInput:
        return ForwardBackwardInput(data=data, loss_fn="ipo", loss_fn_config={"beta": 0.5})

    assert learner.forward(learner.create(str(tiny_model_dir), LORA), ipo(pairs)).metrics["loss:sum"] == \
        pytest.approx(2.0, abs=1e-6)
    assert learner.forward(model_id, ipo(pairs)).metrics == pytest.approx(
        learner.forward(model_id, ipo(explicit_pairs)).metrics, abs=1e-6)
    # SimPO reads none: a datum that brings one is refused, naming it.
    with pytest.raises(ValueError, match=r"data\[0\].loss_fn_inputs\['ref_logprobs'\] is not read by simpo"):
        learner.forward(model_id, ForwardBackwardInput(data=explicit_pairs, loss_fn="simpo"))
    assert learner.forward(model_id, ForwardBackwardInput(data=pairs, loss_fn="simpo")).metrics[
        "dpo_accuracy:mean"] == 1.0, "the chosen answers were trained on"


def _bad_batches(good: Datum) -> list[tuple[ForwardBackwardInput, str]]:
    inputs = good.loss_fn_inputs
    length = good.model_input.length

    def with_inputs(**changes) -> Datum:
        return Datum(model_input=good.model_input, loss_fn_inputs={**inputs, **changes})

    def batch(datum, loss_fn="cross_entropy", config=None):
        return ForwardBackwardInput(data=[good, datum], loss_fn=loss_fn, loss_fn_config=config)

    oov = Datum(model_input=ModelInput.from_ints([1, 2048, 3]), loss_fn_inputs={"target_tokens": [1, 2, 3],
                                                                                "weights": [1.0, 1.0, 1.0]})
    negative = Datum.model_construct(model_input=ModelInput.model_construct(
        chunks=[EncodedTextChunk.model_construct(tokens=[1, -4, 3])]), loss_fn_inputs=oov.loss_fn_inputs)
    long = Datum.next_token([5] * 1026, weights=[1.0] * 1026)  # the tiny model's context is 1,024 tokens
    return [
        (batch(long), r"data\[1\]\.model_input has 1025 tokens, more than the base model's context \(1024\)"),
        (batch(oov), r"data\[1\]\.model_input holds token id 2048, outside the vocabulary \[0, 2048\)"),
        (batch(negative), r"data\[1\]\.model_input holds token id -4"),
        (batch(with_inputs(target_tokens=[-1] * length)), r"data\[1\]\.loss_fn_inputs\['target_tokens'\] holds"),
        (batch(Datum(model_input=good.model_input, loss_fn_inputs={"target_tokens": inputs["target_tokens"]})),
         r"data\[1\]\.loss_fn_inputs lacks weights"),
        (batch(with_inputs(weights=[1.0] * (length + 1))), r"data\[1\]\.loss_fn_inputs\['weights'\] has shape"),
        (batch(with_inputs(weights=[float("nan")] * length)), r"data\[1\]\.loss_fn_inputs\['weights'\] contains NaN"),
        (batch(with_inputs(weights=[float("inf")] * length)), r"data\[1\]\.loss_fn_inputs\['weights'\] contains NaN"),
        (batch(with_inputs(advantages=[1.0] * length)), r"data\[1\]\.loss_fn_inputs\['advantages'\] is not read"),
        (batch(good, loss_fn="importance_sampling"), r"data\[0\]\.loss_fn_inputs lacks logprobs, advantages"),
        (ForwardBackwardInput.model_construct(data=[good], loss_fn="mse", loss_fn_config=None),
         "loss_fn 'mse' is unknown"),
        (batch(good, config={"beta": 1.0}), r"loss_fn_config\['beta'\] is not used by cross_entropy"),
        (ForwardBackwardInput(data=[], loss_fn="cross_entropy"), "data is empty"),
        (ForwardBackwardInput(data=[good] * 3, loss_fn="dpo"), "groups of 2"),
    ]


def test_bad_input_is_refused_and_changes_nothing(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)
    learner.forward_backward(model_id, sft())  # gradients waiting for the next step
    before = (grads(learner, model_id), adapter_state(learner, model_id), learner.step(model_id),
              {k: v.clone() for k, v in learner._runs[model_id].optimizer.state_dict()["state"][0].items()})
    for bad, message in _bad_batches(PATTERN[0]):
        for call in (learner.forward_backward, learner.forward):
            with pytest.raises(ValueError, match=message):
                call(model_id, bad)
    with pytest.raises(ValueError, match="unknown model_id 'nobody'"):
        learner.forward_backward("nobody", sft())

    # A failure in the middle of the work (here: in the loss of the second micro-batch) is undone too.
    calls = []

    def failing_loss(logprobs_D, inputs_D, config):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return losses.cross_entropy(logprobs_D, inputs_D, config)

    original = losses.LOSSES["cross_entropy"]
    learner.micro_batch_tokens = 12
    losses.LOSSES["cross_entropy"] = losses.LossSpec(failing_loss, inputs=original.inputs)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            learner.forward_backward(model_id, sft())
    finally:
        losses.LOSSES["cross_entropy"] = original
        learner.micro_batch_tokens = 512
    assert len(calls) == 2, "the first micro-batch had already added its gradient"

    after = (grads(learner, model_id), adapter_state(learner, model_id), learner.step(model_id),
             learner._runs[model_id].optimizer.state_dict()["state"][0])
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert before[2] == after[2]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


def test_checkpoint_errors(ray_local, learner, tiny_model_dir, tmp_path):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)
    sampler_path = learner.save_weights_for_sampler(model_id, "s").tinker_path
    with pytest.raises(ValueError, match="is a sampler checkpoint"):
        learner.load_weights(sampler_path, optimizer=True)  # a sampler checkpoint holds no optimizer state
    adapter_only = learner.load_weights(sampler_path, optimizer=False).model_id  # its adapter loads
    assert learner.forward(adapter_only, sft()).metrics == learner.forward(model_id, sft()).metrics
    learner.delete(adapter_only)
    with pytest.raises(ValueError, match="unknown model_id"):
        learner.forward(adapter_only, sft())
    with pytest.raises(ValueError, match="no checkpoint at"):
        learner.load_weights(f"tinker://{model_id}/weights/missing", optimizer=True)
    other = learner.create(str(tiny_model_dir), LoraConfig(rank=8, seed=0))
    path = learner.save_weights(model_id, "r4").path
    with pytest.raises(ValueError, match="adapter; run"):
        learner.load_weights(path, optimizer=True, model_id=other)
    metadata = json.loads((learner.store.folder(path) / "checkpoint.json").read_text())
    assert metadata["step"] == 1 and metadata["lora_config"]["rank"] == 4


def test_a_checkpoint_that_fails_half_way_through_loading_leaves_the_run_as_it_was(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    train(learner, model_id, 1)
    path = learner.save_weights(model_id, "broken").path
    saved = learner.store.folder(path) / "optimizer.pt"
    state = torch.load(saved, weights_only=True)
    state["param_groups"].append(dict(state["param_groups"][0]))  # found wrong after the adapter has loaded
    torch.save(state, saved)
    train(learner, model_id, 2)
    learner.forward_backward(model_id, sft())  # gradients not yet applied
    params, pending, step = adapter_state(learner, model_id), grads(learner, model_id), learner.step(model_id)
    moments = [value["exp_avg"].clone() for value in learner._runs[model_id].optimizer.state.values()]
    with pytest.raises(ValueError, match="zip"):
        learner.load_weights(path, optimizer=True, model_id=model_id)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(learner, model_id), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads(learner, model_id), pending, strict=True))
    assert learner.step(model_id) == step
    assert all(torch.equal(value["exp_avg"], moment) for value, moment in zip(
        learner._runs[model_id].optimizer.state.values(), moments, strict=True))
    runs = set(learner._runs)
    with pytest.raises(ValueError, match="zip"):
        learner.load_weights(path, optimizer=True)  # into a new run: none is left behind
    assert set(learner._runs) == runs
    learner.optim_step(model_id, ADAM)
    assert learner.step(model_id) == step + 1


def test_an_adapter_from_elsewhere_loads_with_a_fresh_optimizer_or_is_refused_changing_nothing(learner,
                                                                                                tiny_model_dir):
    source = learner.create(str(tiny_model_dir), LORA)
    train(learner, source, 2)
    folder = learner.store.folder(learner.save_weights(source, "to-share").path)
    files = {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    target = learner.create(str(tiny_model_dir), LORA.model_copy(update={"seed": 7}))
    train(learner, target, 1)
    learner.load_adapter(target, files)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(learner, target), adapter_state(learner, source),
                                                 strict=True))
    assert learner.step(target) == 0 and not learner._runs[target].optimizer.state, "a fresh optimizer"
    tokens = [PATTERN_TOKENS]
    assert learner.logprobs(target, tokens) == learner.logprobs(source, tokens)
    # Another alpha means another scale: the same update as B doubled at alpha halved.
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    config, tensors = json.loads(files[ADAPTER_CONFIG]), load_tensors(files[ADAPTER_WEIGHTS])
    doubled = {name: tensor * 2 if ".lora_B." in name else tensor for name, tensor in tensors.items()}
    learner.load_adapter(target, {ADAPTER_CONFIG: json.dumps({**config, "lora_alpha": config["lora_alpha"] / 2}
                                                             ).encode(), ADAPTER_WEIGHTS: save_tensors(doubled)})
    assert learner.logprobs(target, tokens)[0] == pytest.approx(learner.logprobs(source, tokens)[0], abs=1e-6)
    train(learner, target, 1)
    before, step = adapter_state(learner, target), learner.step(target)
    with pytest.raises(ValueError, match="the adapter's r is 8; this run's is 4"):
        learner.load_adapter(target, {**files, ADAPTER_CONFIG: json.dumps({**config, "r": 8}).encode()})
    with pytest.raises(ValueError, match=r"the adapter's target_modules is \['q_proj'\]; this run's is \["):
        learner.load_adapter(target, {**files, ADAPTER_CONFIG: json.dumps({**config, "target_modules": ["q_proj"]
                                                                           }).encode()})
    tensors.pop(sorted(tensors)[0])
    with pytest.raises(ValueError, match=r"the adapter's tensors do not match the run's: 1 missing"):
        learner.load_adapter(target, {**files, ADAPTER_WEIGHTS: save_tensors(tensors)})
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(learner, target), before, strict=True))
    assert learner.step(target) == step and learner._runs[target].optimizer.state, "its optimizer as it was"


def test_a_teachers_adapter_loads_in_its_own_shape_and_computes_as_peft_does(learner, tiny_model_dir, tmp_path):
    # An adapter PEFT itself wrote, of another rank, targets and alpha than any run here: a distillation teacher.
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), PeftLoraConfig(
        r=6, lora_alpha=9, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    runs = set(learner._runs)
    teacher = learner.create_from_adapter(files)
    assert learner._runs[teacher].lora.rank == 6 and not learner._runs[teacher].lora.train_mlp
    tokens = torch.tensor([PATTERN_TOKENS])
    with torch.no_grad():
        expected = torch.log_softmax(peft.eval()(input_ids=tokens).logits[0, :-1].float(), -1).gather(
            -1, tokens[0, 1:, None])[:, 0]
    base = learner.logprobs(teacher, [PATTERN_TOKENS], adapter=False)[0]
    assert float((expected - torch.tensor(base)).abs().max()) > 0.05, "the adapter changes the logprobs"
    assert learner.logprobs(teacher, [PATTERN_TOKENS])[0] == pytest.approx(expected.tolist(), abs=1e-5)
    learner.delete(teacher)
    config = json.loads(files[ADAPTER_CONFIG])
    with pytest.raises(ValueError, match=r"the adapter's target_modules are \['k_proj', 'q_proj'\]; a run adapts "
                                         r"attn \(q_proj k_proj v_proj o_proj\), mlp"):
        learner.create_from_adapter({**files, ADAPTER_CONFIG: json.dumps(
            {**config, "target_modules": ["q_proj", "k_proj"]}).encode()})
    with pytest.raises(ValueError, match="the adapter's tensors do not match the run's"):
        learner.create_from_adapter({**files, ADAPTER_CONFIG: json.dumps(
            {**config, "target_modules": [*config["target_modules"], "up_proj", "gate_proj", "down_proj"]}).encode()})
    assert set(learner._runs) == runs, "nothing left behind"


def test_the_learner_runs_as_a_ray_actor(tiny_model_dir, tmp_path, learner, ray_local):
    from rl.learner import LearnerActor

    actor = LearnerActor.options(num_cpus=1).remote(str(tiny_model_dir), storage=str(tmp_path))
    model_id = ray_local.get(actor.create.remote(str(tiny_model_dir), LORA))
    remote_losses = []
    for _ in range(2):
        remote_losses.append(ray_local.get(actor.forward_backward.remote(model_id, sft())).metrics["loss:sum"])
        ray_local.get(actor.optim_step.remote(model_id, ADAM))
    path = ray_local.get(actor.save_weights.remote(model_id, "remote")).path
    with pytest.raises(ValueError, match="unknown model_id"):
        ray_local.get(actor.forward.remote("nobody", sft()))
    assert ray_local.get(actor.step.remote(model_id)) == 2, "the actor survives a bad call"
    ray_local.kill(actor)
    local_id = learner.create(str(tiny_model_dir), LORA)
    assert train(learner, local_id, 2) == pytest.approx(remote_losses, abs=1e-5)
    assert (tmp_path / model_id / "weights" / "remote" / ADAPTER_WEIGHTS).is_file() and path.endswith("/remote")


def test_soft_targets_reduce_to_hard_targets_when_one_column_carries_the_weight(learner, tiny_model_dir):
    model_id = learner.create(str(tiny_model_dir), LORA)
    hard = PATTERN[0]
    targets = hard.loss_fn_inputs["target_tokens"].to_torch()
    weights = hard.loss_fn_inputs["weights"].to_torch()
    soft = Datum(model_input=hard.model_input, loss_fn_inputs={
        "target_tokens": torch.stack([targets, (targets + 1) % 2048], dim=1),
        "weights": torch.stack([weights, torch.zeros_like(weights)], dim=1)})
    hard_out, soft_out = (learner.forward(model_id, sft([datum])) for datum in (hard, soft))
    assert soft_out.metrics["loss:sum"] == pytest.approx(hard_out.metrics["loss:sum"], rel=1e-6)
    soft_logprobs = soft_out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert soft_logprobs.shape == (len(targets), 2)
    assert torch.allclose(soft_logprobs[:, 0], hard_out.loss_fn_outputs[0]["logprobs"].to_torch(), atol=1e-6)
    # Hard and soft targets in one batch: refused before any work, naming the datum (not a failed concatenation).
    with pytest.raises(ValueError, match=r"data\[1\].loss_fn_inputs\['target_tokens'\] has shape \[\d+, 2\], "
                                         r"data\[0\]'s \[\d+\]: every datum of a batch has as many targets"):
        learner.forward_backward(model_id, sft([hard, soft]))
    assert all(param.grad is None or not param.grad.any() for param in learner._runs[model_id].params)


@pytest.mark.parametrize(("flags", "expected"), [("avx2 amx_bf16", torch.bfloat16), ("avx2 fma", torch.float32)])
def test_auto_dtype_is_resolved_for_the_learners_device_and_recorded(flags, expected, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "cpuinfo")
    models.CPUINFO.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    learner = Learner(str(tiny_model_dir), storage=tmp_path / "storage", dtype="auto", device="cpu")
    assert learner._hf.dtype == expected and learner.dtype == str(expected).removeprefix("torch.")
    assert learner.describe() == {"dtype": learner.dtype, "device": "cpu", "native_bf16": expected == torch.bfloat16}
    model_id = learner.create(str(tiny_model_dir), LORA)
    assert learner._run_metadata(learner._runs[model_id])["dtype"] == learner.dtype, "checkpoints say what ran"
