"""Fused forms of what the learner computes most beside its base model's matrix products: a LoRA layer, the
target tokens' logprobs from the output layer's logits, and (on a CPU) attention. Each computes what PEFT's,
torch's and transformers' own code compute, in fewer passes over the activations; tests/test_fused.py checks each
against that code, values and gradients.

Measured on the main job's 28 learner batches (SmolLM2-135M in bf16, one thread of a 2-core AMD EPYC, each batch's
best of 3, the variants alternated batch by batch): 28.54 s with PEFT's layers and transformers' eager attention,
26.74 s with `FusedLoraLinear`, 27.36 s with `attention`, 26.01 s with both (1.10x), and `TargetLogprobs` 1.02x
on top (docs/benchmarks.md, "The learner's layers"). Attention in blocks (`rl.learner.batch.attention_blocks`):
the same 28 batches 25.33 -> 24.48 s, the four largest (356-571 tokens) 8.61 -> 7.74 s (1.11x).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

Tensor = torch.Tensor


class LoraProduct(torch.autograd.Function):
    """x W^T + bias + scaling * (x A^T) B^T, with W and the bias frozen: gradients for x, A and B only.

    PEFT computes the update as lora_B(lora_A(x)) * scaling, added to the base layer's output: two passes over
    the layer's output besides the products, and as many again in backward. Here the update is added by the
    second product itself (addmm into the base output), and the scaling is applied to B (r columns) instead of to
    the output. Products run in the base weight's dtype (bf16 under the learner's autocast, as PEFT's do there);
    A's and B's gradients come back in their own dtype (float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        dtype = weight.dtype
        rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)  # (r, in), (out, r)
        hidden = rows @ a.T  # (N, r)
        out = rows @ weight.T if bias is None else torch.addmm(bias.to(dtype), rows, weight.T)
        out.addmm_(hidden, b.T)
        ctx.save_for_backward(rows, hidden, a, b, weight)
        ctx.scaling, ctx.x_shape, ctx.dtypes = scaling, x.shape, (x.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, hidden, a, b, weight = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)  # (N, out)
        grad_hidden = grad @ b  # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:  # the first layer's input needs none
            grad_x = (grad @ weight).addmm_(grad_hidden, a).view(ctx.x_shape).to(x_dtype)
        grad_a = (grad_hidden.T @ rows).to(a_dtype)
        grad_b = (grad.T @ hidden).to(b_dtype).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear layer whose forward pass, with one plain adapter active, is `LoraProduct`. Anything else
    (adapters off, several active, per-row adapter names, a variant such as DoRA, dropout, a bias on B, a merged
    adapter) goes to PEFT's own."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                or name in self.lora_variant or self.lora_B[name].bias is not None
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)):
            return super().forward(x, *args, **kwargs)
        return LoraProduct.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name])


def fuse_lora_layers(model: torch.nn.Module) -> None:
    """Makes every PEFT LoRA linear layer of `model` a `FusedLoraLinear` (the same module and parameters, so its
    adapters save, load and switch as before). Call again after PEFT wraps more layers."""
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear


class TargetLogprobs(torch.autograd.Function):
    """log_softmax(logits)[reads, targets] in float32 (at least), for `logits` (u, V), `reads` (n,) and `targets`
    (n, K): the logprob of each datum token's targets, read at its row token.

    `log_softmax(logits.float())` and a gather compute the same, through vocabulary-wide float32 tensors: a copy of
    the logits, their log-softmax (kept for backward), and in backward a zero-filled gradient, its log-softmax
    gradient and its cast back, five passes over (u, V) at 4 bytes. Here only each row's log-sum-exp is kept
    (with the logits, which are half the size), float32 work is done a few rows at a time, and backward computes
    the rows that receive a gradient: a prompt's tokens, whose targets no loss weighs, get none."""

    @staticmethod
    def forward(ctx, logits: Tensor, reads: Tensor, targets: Tensor) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        step = _rows_at_a_time(logits)
        for start in range(0, logits.shape[0], step):
            lse[start:start + step] = torch.logsumexp(logits[start:start + step].to(dtype), dim=-1)
        ctx.save_for_backward(logits, reads, targets, lse)
        return logits[reads[:, None], targets].to(dtype) - lse[reads, None]

    @staticmethod
    def backward(ctx, grad: Tensor):
        # d logp[i, k] / d logits[r] = onehot(targets[i, k]) - softmax(logits[r]) for r = reads[i]
        logits, reads, targets, lse = ctx.saved_tensors
        grad = grad.to(lse.dtype)
        rows, vocab = logits.shape
        total = torch.zeros(rows, dtype=lse.dtype, device=grad.device).index_add_(0, reads, grad.sum(-1))
        grad_logits = torch.zeros_like(logits)
        graded_rows = torch.unique(reads[(grad != 0).any(-1)])  # sorted
        slot = torch.full((rows,), -1, dtype=torch.int64, device=grad.device)  # a graded row's place in its chunk
        step = _rows_at_a_time(logits)
        for start in range(0, len(graded_rows), step):
            chunk = graded_rows[start:start + step]
            part = (logits[chunk].to(lse.dtype) - lse[chunk, None]).exp_().mul_(-total[chunk, None])
            slot[chunk] = torch.arange(len(chunk), device=grad.device)
            mine = slot[reads] >= 0
            part.view(-1).index_add_(0, (slot[reads[mine], None] * vocab + targets[mine]).flatten(),
                                     grad[mine].flatten())
            slot[chunk] = -1
            grad_logits[chunk] = part.to(logits.dtype)
        return grad_logits, None, None


def _rows_at_a_time(logits: Tensor) -> int:
    """Rows of the vocabulary-wide float32 work at a time: on a CPU 32 (6 MB for a 49k vocabulary, which stays in
    cache); on a GPU all of them, whose memory is fast and whose every kernel launch costs the host time."""
    return 32 if logits.device.type == "cpu" else max(logits.shape[0], 1)


def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              scaling: float, dropout: float = 0.0, attention_blocks: list | None = None,
              **kwargs) -> tuple[Tensor, None]:
    """transformers' eager attention (`eager_attention_forward`) in fewer passes over the (heads, T, T) scores:
    the scale applied to the queries (T x head_dim) rather than to the scores, the mask added in place, and the
    softmax left in the model's dtype (its CPU kernel accumulates in float32 either way; eager computes it into a
    float32 copy and casts that back); the key and value heads that grouped-query attention shares are read in
    place rather than copied once per query head. Returns no attention weights.

    `attention_blocks` (`rl.learner.batch.attention_blocks`, passed through the model's keyword arguments): for
    each row, blocks of consecutive queries, each attending only to its keys through its own mask, used instead of
    `attention_mask`: a row that holds many datums side by side computes the pairs its mask lets through, not the
    whole square. The row's tokens after its last block (padding) come out as zeros."""
    if attention_blocks is None:
        return _attend(module, query, key, value, attention_mask, scaling, dropout).transpose(1, 2).contiguous(), None
    width, rows = query.shape[2], []
    # Cut by `split` (one operation, whose backward is one concatenation), not sliced block by block: each slice's
    # backward would fill a zero tensor the size of the row
    for row, row_query, row_key, row_value in zip(attention_blocks, query.split(1), key.split(1), value.split(1),
                                                  strict=True):
        used = row.bounds[-1]
        sizes = [high - low for low, high in zip(row.bounds, row.bounds[1:], strict=False)] + [width - used]
        keys, values = row_key.split(sizes, dim=2), row_value.split(sizes, dim=2)
        queries = row_query.split([block.end - block.start for block in row.blocks] + [width - used], dim=2)
        parts = [_attend(module, block_query, _pieces(keys, block.pieces), _pieces(values, block.pieces), block.mask,
                         scaling, dropout) for block_query, block in zip(queries, row.blocks, strict=False)]
        if width > used:
            parts.append(query.new_zeros(1, query.shape[1], width - used, query.shape[3]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _pieces(pieces: tuple[Tensor, ...], indices: list[int]) -> Tensor:
    return pieces[indices[0]] if len(indices) == 1 else torch.cat([pieces[index] for index in indices], dim=2)


def _attend(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float,
            dropout: float) -> Tensor:
    """(B, heads, T, head_dim) attention of `query` (B, heads, T, head_dim) to `key` and `value` (B, groups, S,
    head_dim) through the additive `mask` (B, 1, T, S)."""
    batch, heads, width, head_dim = query.shape
    groups = key.shape[1]
    per_group = heads // groups  # query heads per key/value head, laid consecutively as repeat_kv expects
    queries = (query * scaling).reshape(batch, groups, per_group * width, head_dim)
    scores = torch.matmul(queries, key.transpose(2, 3)).view(batch, groups, per_group, width, key.shape[2])
    if mask is not None:
        scores.add_(mask[:, :, None])  # (B, 1, T, S) -> (B, 1, 1, T, S)
    weights = torch.softmax(scores, dim=-1).view(batch, groups, per_group * width, key.shape[2])
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).view(batch, heads, width, head_dim)


ATTENTION = "rl_eager"
"""The name `attention` is registered under, for `attn_implementation`; transformers builds its masks (when given
none, or a 2-D padding mask) as it does for eager attention."""
AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)
