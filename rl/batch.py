"""From a batch of datums to checked tensors, micro-batches, and the target-token logprobs a loss reads.

Checking comes first and is complete: a bad datum is reported (by index and field) before any model work, so
a rejected batch never leaves a half-accumulated gradient behind.

Consecutive datums that start alike (a DPO pair, an RL group) share a row: their common prefix is computed once
and each suffix attends to it (`pack_rows`, `row_attention`), which is exact under causal attention.

Logprobs never materialise the full-vocabulary logits of the whole batch: the decoder's hidden states of the
real (unpadded) tokens go through the output layer a chunk of tokens at a time, and under autograd each chunk
is recomputed in the backward pass instead of being kept (activation checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rl.losses import LossSpec
from rl.types import Datum

Tensor = torch.Tensor


@dataclass
class PreparedDatum:
    index: int
    """Position in the caller's batch: outputs are returned in this order."""
    tokens: Tensor  # (T,) int64
    inputs: dict[str, Tensor]  # target_tokens (T,) or (T, K) int64; the rest float32, first dim T


def prepare_batch(data: list[Datum], spec: LossSpec, loss_fn: str, vocab_size: int) -> list[PreparedDatum]:
    """Converts and checks every datum for loss `spec`; a ValueError names the datum index and the field."""
    if not data:
        raise ValueError("data is empty: forward_backward needs at least one datum")
    if len(data) % spec.datums_per_group:
        raise ValueError(f"{loss_fn} reads datums in groups of {spec.datums_per_group} (chosen, then rejected); "
                         f"got {len(data)} datums")
    return [_prepare(index, datum, spec, loss_fn, vocab_size) for index, datum in enumerate(data)]


def _prepare(index: int, datum: Datum, spec: LossSpec, loss_fn: str, vocab_size: int) -> PreparedDatum:
    where = f"data[{index}]"
    try:
        token_list = datum.model_input.to_ints()
    except ValueError as error:
        raise ValueError(f"{where}.model_input: {error}; this learner reads text tokens only") from None
    if not token_list:
        raise ValueError(f"{where}.model_input is empty")
    tokens = torch.tensor(token_list, dtype=torch.int64)
    _check_ids(f"{where}.model_input", tokens, vocab_size)
    given = set(datum.loss_fn_inputs)
    missing = [name for name in spec.inputs if name not in given]
    if missing:
        raise ValueError(f"{where}.loss_fn_inputs lacks {', '.join(missing)} ({loss_fn} needs "
                         f"{', '.join(spec.inputs)})")
    unknown = sorted(given - set(spec.inputs) - set(spec.optional_inputs))
    if unknown:
        allowed = ", ".join(spec.inputs + spec.optional_inputs)
        raise ValueError(f"{where}.loss_fn_inputs[{unknown[0]!r}] is not read by {loss_fn} (it reads {allowed})")
    inputs = {name: datum.loss_fn_inputs[name].to_torch() for name in sorted(given)}
    targets = inputs["target_tokens"]
    if targets.dtype != torch.int64:
        raise ValueError(f"{where}.loss_fn_inputs['target_tokens'] must be integers")
    soft = loss_fn == "cross_entropy" and targets.dim() == 2
    if targets.dim() != 1 and not soft:
        raise ValueError(f"{where}.loss_fn_inputs['target_tokens'] must have shape [{len(tokens)}]"
                         + (" or [T, K]" if loss_fn == "cross_entropy" else "") + f", got {list(targets.shape)}")
    _check_ids(f"{where}.loss_fn_inputs['target_tokens']", targets, vocab_size)
    for name, value in inputs.items():
        if value.shape[:1] != tokens.shape and not (name.startswith("clip_") and value.numel() == 1):
            raise ValueError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(value.shape)}; its first dimension "
                             f"must be the model_input length {len(tokens)}")
        if name != "target_tokens":
            if value.dtype != torch.float32:
                inputs[name] = value = value.to(torch.float32)
            if not torch.isfinite(value).all():
                raise ValueError(f"{where}.loss_fn_inputs[{name!r}] contains NaN or inf")
            if name in ("weights", "ref_logprobs", "logprobs", "advantages") and value.shape != targets.shape:
                raise ValueError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(value.shape)}, target_tokens "
                                 f"{list(targets.shape)}: they must match")
    return PreparedDatum(index=index, tokens=tokens, inputs=inputs)


def _check_ids(where: str, ids: Tensor, vocab_size: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"{where} holds token id {int(bad[0])}, outside the vocabulary [0, {vocab_size})")


def micro_batches(batch: list[PreparedDatum], group_size: int, token_budget: int) -> list[list[PreparedDatum]]:
    """Splits the batch into micro-batches of whole groups whose padded size stays within `token_budget`.

    Groups are sorted by length first, so each micro-batch pads little. A group longer than the budget forms a
    micro-batch of its own.
    """
    groups = [batch[start:start + group_size] for start in range(0, len(batch), group_size)]
    groups.sort(key=lambda group: max(len(datum.tokens) for datum in group), reverse=True)
    result: list[list[PreparedDatum]] = []
    current: list[PreparedDatum] = []
    for group in groups:
        longest = max(len(datum.tokens) for datum in current + group)
        if current and longest * (len(current) + len(group)) > token_budget:
            result.append(current)
            current = []
        current = current + group
    return result + [current] if current else result


SHARED_PREFIX_MIN = 8
PACKED_ROW_MAX = 512
"""A datum joins the row before it when they share at least half its tokens (and SHARED_PREFIX_MIN) and the row
stays within PACKED_ROW_MAX tokens: attention over a row grows with its width squared, so rows that share little
(conversations that share only a system prompt) or grow long train slower packed than apart (measured: 8 GSM
conversations sharing a 30-token system prompt, 3.5 s apart, 7.6 s as one 1372-token row)."""


@dataclass
class PackedRow:
    """Datums that share a prefix, laid out in one row: the prefix once, then each datum's own suffix."""

    tokens: list[int]
    positions: list[int]
    """Each token's position within its own datum."""
    segments: list[int]
    """0 for the shared prefix, k for the k-th datum's suffix."""
    members: list[list[int]]
    """For each datum of the row, the row indices of its tokens in order."""


def pack_rows(batch: list[PreparedDatum]) -> list[PackedRow]:
    """Rows of consecutive datums that share a prefix (a DPO pair's prompt, an RL group's prompt; see
    PACKED_ROW_MAX for when): the prefix is computed once for all of them, exact because attention is causal."""
    groups: list[tuple[int, list[list[int]]]] = []  # (the prefix all members share, their tokens)
    for datum in batch:
        tokens = datum.tokens.tolist()
        if groups:
            prefix, members = groups[-1]
            shared = min(prefix, _shared(members[0], tokens))
            width = sum(map(len, members)) + len(tokens) - len(members) * shared
            if shared >= max(SHARED_PREFIX_MIN, len(tokens) / 2) and width <= PACKED_ROW_MAX:
                groups[-1] = (shared, members + [tokens])
                continue
        groups.append((len(tokens), [tokens]))
    rows = []
    for prefix, members in groups:
        row = PackedRow(tokens=members[0][:prefix], positions=list(range(prefix)), segments=[0] * prefix,
                        members=[])
        for segment, tokens in enumerate(members, start=1):
            start = len(row.tokens)
            row.tokens += tokens[prefix:]
            row.positions += list(range(prefix, len(tokens)))
            row.segments += [segment] * (len(tokens) - prefix)
            row.members.append(list(range(prefix)) + list(range(start, len(row.tokens))))
        rows.append(row)
    return rows


def _shared(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def row_attention(rows: list[PackedRow], width: int, dtype: torch.dtype) -> Tensor:
    """(R, 1, W, W) additive mask: a token sees the earlier tokens of the prefix and of its own suffix; padding
    sees only itself (a row of nothing would give NaN)."""
    segments = torch.full((len(rows), width), -1, dtype=torch.int64)
    for index, row in enumerate(rows):
        segments[index, : len(row.tokens)] = torch.tensor(row.segments)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def target_logprobs(decoder: torch.nn.Module, output_layer: torch.nn.Module, batch: list[PreparedDatum], *,
                    pad_id: int, chunk_tokens: int, device: torch.device) -> list[Tensor]:
    """log p(target | prefix) for every target of every datum, shaped like each datum's `target_tokens`."""
    rows = pack_rows(batch)
    width = max(len(row.tokens) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)  # (R, W), right-padded
    positions = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row.tokens)] = torch.tensor(row.tokens)
        positions[index, : len(row.tokens)] = torch.tensor(row.positions)
    dtype = next(decoder.parameters()).dtype
    hidden_R = decoder(input_ids=ids.to(device), position_ids=positions.to(device),
                       attention_mask=row_attention(rows, width, dtype).to(device)).last_hidden_state  # (R, W, H)
    gather = torch.tensor([row_index * width + position for row_index, row in enumerate(rows)
                           for member in row.members for position in member])
    hidden = hidden_R.flatten(0, 1)[gather.to(device)]  # (N, H): every datum's tokens, datum after datum
    lengths = [len(datum.tokens) for datum in batch]
    targets = torch.cat([datum.inputs["target_tokens"].reshape(len(datum.tokens), -1) for datum in batch])
    targets = targets.to(device)  # (N, K)
    chunks = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        piece = (hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        # With several chunks, each chunk's logits are recomputed in backward rather than all kept at once; a
        # single chunk would only be computed twice for the same peak.
        if torch.is_grad_enabled() and hidden.shape[0] > chunk_tokens:
            chunks.append(checkpoint(_logprobs_of_targets, output_layer, *piece, use_reentrant=False))
        else:
            chunks.append(_logprobs_of_targets(output_layer, *piece))
    flat = torch.cat(chunks)  # (N, K)
    return [part.reshape(datum.inputs["target_tokens"].shape)
            for part, datum in zip(flat.split(lengths), batch, strict=True)]


def _logprobs_of_targets(output_layer: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    # log_softmax is one fused kernel forward and backward; logsumexp + subtraction is several, and slower.
    return torch.log_softmax(output_layer(hidden).float(), dim=-1).gather(-1, targets)  # (n, K)
