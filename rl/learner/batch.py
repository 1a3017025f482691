"""From a batch of datums to checked tensors, micro-batches, and the target-token logprobs a loss reads.

Checking comes first and is complete: a bad datum is reported (by index and field) before any model work, so
a rejected batch never leaves a half-accumulated gradient behind.

Consecutive datums that start alike (a DPO pair, an RL group) share a row laid out as a prefix tree: every token
they have in common is computed once and each datum attends along its own path (`pack_rows`, `row_attention`),
which is exact under causal attention. On a CPU, attention computes only the pairs that path lets through, in
blocks of the row's queries (`attention_blocks`): the groups laid side by side in a row do not attend to each
other at all.

Logprobs never materialise the full-vocabulary logits of the whole batch: the decoder's hidden states of the
real (unpadded) row tokens, a shared prefix once, go through the output layer a chunk of tokens at a time, and
under autograd each chunk is recomputed in the backward pass instead of being kept (activation checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from rl.learner.fused import ATTENTION, TargetLogprobs
from rl.losses import LossSpec
from rl.types import Datum

Tensor = torch.Tensor


@dataclass
class PreparedDatum:
    index: int
    """Position in the caller's batch: outputs are returned in this order."""
    tokens: Tensor  # (T,) int64
    inputs: dict[str, Tensor]  # target_tokens (T,) or (T, K) int64; the rest float32, first dim T


def prepare_batch(data: list[Datum], spec: LossSpec, loss_fn: str, vocab_size: int,
                  context: int | None = None) -> list[PreparedDatum]:
    """Converts and checks every datum for loss `spec`; a ValueError names the datum index and the field.
    `context`: the base model's (its max_position_embeddings), which no datum may be longer than: positions past
    it are ones the model never learnt."""
    if not data:
        raise ValueError("data is empty: forward_backward needs at least one datum")
    if len(data) % spec.datums_per_group:
        raise ValueError(f"{loss_fn} reads datums in groups of {spec.datums_per_group} (chosen, then rejected); "
                         f"got {len(data)} datums")
    prepared = [_prepare(index, datum, spec, loss_fn, vocab_size, context) for index, datum in enumerate(data)]
    # One target shape per token for the whole batch: a micro-batch reads every datum's targets as one tensor.
    shapes = [list(datum.inputs["target_tokens"].shape) for datum in prepared]
    for index, shape in enumerate(shapes):
        if shape[1:] != shapes[0][1:]:
            raise ValueError(f"data[{index}].loss_fn_inputs['target_tokens'] has shape {shape}, data[0]'s "
                             f"{shapes[0]}: every datum of a batch has as many targets per token")
    return prepared


def _prepare(index: int, datum: Datum, spec: LossSpec, loss_fn: str, vocab_size: int,
             context: int | None) -> PreparedDatum:
    where = f"data[{index}]"
    try:
        token_list = datum.model_input.to_ints()
    except ValueError as error:
        raise ValueError(f"{where}.model_input: {error}; this learner reads text tokens only") from None
    if not token_list:
        raise ValueError(f"{where}.model_input is empty")
    if context is not None and len(token_list) > context:
        raise ValueError(f"{where}.model_input has {len(token_list)} tokens, more than the base model's context "
                         f"({context})")
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


def micro_batches(parts: list[tuple[list[PreparedDatum], int]], token_budget: int) -> list[list[PackedRow]]:
    """Splits batches into micro-batches of whole groups, each its rows, that fill at most `token_budget` tokens,
    padding included; a unit wider than the budget forms a micro-batch of its own.

    `parts`: one or more batches (several runs' calls in one pass), each with its group size. Each batch is packed
    in its own order first, so datums that share a prefix (an RL group, a DPO pair) share a row (`pack_rows`), and
    each row holds datums of one batch (`PackedRow.part`); each batch's units of rows that hold whole groups are
    then sorted by width, widest first, and a micro-batch's rows are laid side by side in rows of up to
    PACKED_ROW_MAX tokens (first fit), so a micro-batch pads little: in the main job, a row of several groups
    beside one group's row had padded a fifth of the tokens of its learner-bound steps. Batches follow each
    other: a micro-batch holds rows of several only where one batch ends with room to spare, or where the budget
    holds several whole batches (a micro-batch mixing runs costs each LoRA layer a product per run). The budget
    bounds what a micro-batch keeps alive for backward (about 1.3 MB a token for SmolLM2-135M in bf16).
    """
    units: list[list[PackedRow]] = []
    for part, (batch, group_size) in enumerate(parts):
        unit: list[PackedRow] = []
        taken = 0
        for row in pack_rows(batch):
            row.part = part
            unit.append(row)
            taken += len(row.datums)
            if taken % group_size == 0:
                units.append(unit)
                unit = []
    units.sort(key=lambda unit: (unit[0].part, -row_width(unit)))
    result: list[list[list[PackedRow]]] = []
    lanes: list[list[PackedRow]] = []  # the micro-batch's rows, each the rows laid side by side in it
    for unit in units:
        grown = _laid_side_by_side(lanes, unit)
        if lanes and len(grown) * max(map(_lane_width, grown)) > token_budget:
            result.append(lanes)
            grown = _laid_side_by_side([], unit)
        lanes = grown
    return [[_joined(lane) for lane in lanes] for lanes in result + [lanes] if lanes]


def _laid_side_by_side(lanes: list[list[PackedRow]], unit: list[PackedRow]) -> list[list[PackedRow]]:
    """`lanes` with each of the unit's rows added to the first lane of its batch with room for it (up to
    PACKED_ROW_MAX tokens, or the widest row's width), or to a lane of its own."""
    lanes = [list(lane) for lane in lanes]
    limit = max(PACKED_ROW_MAX, *(len(row.tokens) for row in unit), *map(_lane_width, lanes))
    for row in unit:
        lane = next((lane for lane in lanes if lane[0].part == row.part
                     and _lane_width(lane) + len(row.tokens) <= limit), None)
        if lane is None:
            lanes.append([row])
        else:
            lane.append(row)
    return lanes


def _lane_width(lane: list[PackedRow]) -> int:
    return sum(len(row.tokens) for row in lane)


def _joined(lane: list[PackedRow]) -> PackedRow:
    """One row holding the lane's datums: their trees side by side (exact: each token attends only along its own
    datum's path), prefixes the rows have in common (a system prompt) computed once."""
    if len(lane) == 1:
        return lane[0]
    joined = PackedRow(part=lane[0].part)
    for row in lane:
        for datum in row.datums:
            joined.add(datum, datum.tokens.tolist())
    return joined


def row_width(rows: list[PackedRow]) -> int:
    return max(len(row.tokens) for row in rows)


def row_datums(rows: list[PackedRow]) -> list[PreparedDatum]:
    """The datums of `rows`, in the order `target_logprobs` returns their logprobs."""
    return [datum for row in rows for datum in row.datums]


SHARED_PREFIX_MIN = 8
PACKED_ROW_MAX = 512
"""A datum joins the row before it when it shares at least half its tokens (and SHARED_PREFIX_MIN) with a datum
already there and the row stays within PACKED_ROW_MAX tokens, and a micro-batch lays rows side by side up to the
same width (`micro_batches`): attention over a row grows with its width squared, so rows that grow long train
slower packed than apart (measured: 8 GSM conversations sharing a 30-token system prompt, 3.5 s apart, 7.6 s as
one 1372-token row; the main job's batches, replayed on one thread, 28.6-28.8 s with rows of up to 512 tokens
side by side, 29.5-29.9 s up to 768, 28.8-30.7 s up to 384, against 33.4-36.6 s padded)."""


@dataclass
class PackedRow:
    """Datums laid out in one row as a prefix tree: a token that several datums begin with is there once."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    """Each token's position within the datums that hold it."""
    datums: list[PreparedDatum] = field(default_factory=list, repr=False)
    members: list[list[int]] = field(default_factory=list)
    """For each datum of the row, the row indices of its tokens in order: its path down the tree."""
    children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)
    """(a token's row index, or -1 for the root; the next token id) -> the next token's row index."""
    part: int = 0
    """Which of the batches given to `micro_batches` the row's datums come from."""

    def shared(self, tokens: list[int]) -> list[int]:
        """The row indices of the longest prefix of `tokens` that the row holds already."""
        path: list[int] = []
        for token in tokens:
            index = self.children.get((path[-1] if path else -1, token))
            if index is None:
                break
            path.append(index)
        return path

    def add(self, datum: PreparedDatum, tokens: list[int]) -> None:
        self.datums.append(datum)
        path = self.shared(tokens)
        for position in range(len(path), len(tokens)):
            self.children[(path[-1] if path else -1, tokens[position])] = len(self.tokens)
            path.append(len(self.tokens))
            self.tokens.append(tokens[position])
            self.positions.append(position)
        self.members.append(path)


def pack_rows(batch: list[PreparedDatum]) -> list[PackedRow]:
    """Rows of consecutive datums that share prefixes (an RL group's prompt, a DPO pair's; see PACKED_ROW_MAX for
    when): each shared token is computed once for all the datums that hold it, exact because attention is causal
    and each token sees only its own datum's earlier tokens (`row_attention`)."""
    rows: list[PackedRow] = []
    for datum in batch:
        tokens = datum.tokens.tolist()
        if rows:
            shared = len(rows[-1].shared(tokens))
            if (shared >= max(SHARED_PREFIX_MIN, len(tokens) / 2)
                    and len(rows[-1].tokens) + len(tokens) - shared <= PACKED_ROW_MAX):
                rows[-1].add(datum, tokens)
                continue
        rows.append(PackedRow())
        rows[-1].add(datum, tokens)
    return rows


def row_attention(rows: list[PackedRow], width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(R, 1, W, W) additive mask on `device`: a token sees itself and the earlier tokens of its own datum (its
    path down the row's tree); padding sees only itself (a row of nothing would give NaN).

    Token j sees token i when i lies on j's path: i is no deeper than j, and j's ancestor at i's depth is i. Each
    token's path is read off any datum that holds it (datums that share a token share its whole path), so the
    mask costs one indexing operation per datum and a few (W x W) comparisons per row, not a loop over pairs;
    it is built as booleans on the CPU and made additive on the device."""
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    for index, row in enumerate(rows):
        used = len(row.tokens)
        depth = torch.tensor(row.positions)  # (U,): each token's position within its datums
        ancestors = torch.full((used, int(depth.max()) + 1), -1, dtype=torch.int64)  # (U, D): the path to each
        for member in row.members:
            path = torch.tensor(member)
            ancestors[path, : len(path)] = path
        on_path = ancestors[:, depth] == torch.arange(used)  # (U, U): j's ancestor at i's depth is i
        allowed[index, :used, :used] = on_path & (depth[None, :] <= depth[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed.to(device), torch.finfo(dtype).min)[:, None]


@dataclass
class AttentionBlock:
    """A row's tokens start..end as queries, which attend only to the keys in some of the row's pieces."""

    start: int
    end: int
    pieces: list[int]
    """The row's pieces (`BlockedRow.bounds`) that hold the keys, ascending."""
    mask: Tensor
    """(1, 1, end - start, the pieces' tokens) additive."""


@dataclass
class BlockedRow:
    """A row's attention as blocks of consecutive queries that see only some of its tokens."""

    bounds: list[int]
    """The row's tokens cut into pieces at these indices: 0 first, the row's length last; every block's start and
    end, and every end of a run of keys it sees, among them (each block's keys are whole pieces)."""
    blocks: list[AttentionBlock]


BLOCK_COST = 2048
"""What computing a block of a row's queries apart costs beyond its (query, key) pairs, counted in pairs: a
block's attention is a dozen more operations in each layer, forward and backward (tuned on the main job's
learner batches, docs/benchmarks.md)."""


def attention_blocks(rows: list[PackedRow], mask: Tensor) -> list[BlockedRow]:
    """Each row's tokens as consecutive blocks of queries, each with the keys its tokens see, for attention that
    computes only those (query, key) pairs instead of the whole (W, W) square: exact, as every pair left out is
    masked. A datum's new tokens lie together in its row (`PackedRow.add`), and all of them see only its path;
    consecutive datums share a block where that costs fewer pairs than apart (with BLOCK_COST): an RL group's
    replies see its prompt, and the groups laid side by side in a row share only what they begin with. `mask`:
    the rows' `row_attention`, which each block's mask is cut from."""
    result = []
    for index, row in enumerate(rows):
        spans: list[tuple[int, int, set[int]]] = []  # (start, end, the keys they see)
        end = 0
        for path in row.members:
            start, end = end, max(end, path[-1] + 1)
            if start == end:  # a datum that the row held already
                continue
            keys = set(path)
            if spans:
                last_start, last_end, last_keys = spans[-1]
                joined = last_keys | keys
                if ((end - last_start) * len(joined)
                        <= (last_end - last_start) * len(last_keys) + (end - start) * len(keys) + BLOCK_COST):
                    spans[-1] = (last_start, end, joined)
                    continue
            spans.append((start, end, keys))
        ordered = [sorted(keys) for _, _, keys in spans]
        runs = [_runs(keys) for keys in ordered]
        bounds = sorted({0, len(row.tokens), *(end for _, end, _ in spans),
                         *(at for block_runs in runs for run in block_runs for at in run)})
        piece = {at: index for index, at in enumerate(bounds)}
        blocks = []
        for (start, end, _), keys, block_runs in zip(spans, ordered, runs, strict=True):
            pieces = [number for low, high in block_runs for number in range(piece[low], piece[high])]
            columns = torch.tensor(keys, device=mask.device)
            blocks.append(AttentionBlock(start, end, pieces, mask[index:index + 1, :, start:end][..., columns]))
        result.append(BlockedRow(bounds, blocks))
    return result


def _runs(ascending: list[int]) -> list[tuple[int, int]]:
    """[low, high) ranges of consecutive integers that make up `ascending`."""
    runs: list[tuple[int, int]] = []
    for value in ascending:
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0], value + 1)
        else:
            runs.append((value, value + 1))
    return runs


def target_logprobs(decoder: torch.nn.Module, output_layer: torch.nn.Module, rows: list[PackedRow], *,
                    pad_id: int, chunk_tokens: int, device: torch.device,
                    output_adapters: list[str] | None = None, last: int | None = None) -> list[Tensor]:
    """log p(target | prefix) for every target of every datum of `rows`, in `row_datums` order, each shaped like
    its datum's `target_tokens`. `output_adapters`: when rows of several runs share the pass and LoRA adapts the
    output layer, each row's PEFT adapter, which the output layer applies to that row's tokens. `last`: only each
    datum's last `last` targets (a judge's verdict), and the output layer runs only on the row tokens they read."""
    batch = row_datums(rows)
    width = row_width(rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)  # (R, W), right-padded
    positions = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row.tokens)] = torch.tensor(row.tokens)
        positions[index, : len(row.tokens)] = torch.tensor(row.positions)
    dtype = next(decoder.parameters()).dtype
    # rl's attention (on a CPU) computes only the (query, key) pairs that the mask lets through. The mask goes too:
    # a model that did not hand its attention the keyword arguments it is given would still attend exactly.
    mask = row_attention(rows, width, dtype, device)
    blocks = ({"attention_blocks": attention_blocks(rows, mask)}
              if decoder.config._attn_implementation == ATTENTION else {})
    hidden_R = decoder(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False,
                       attention_mask=mask, **blocks).last_hidden_state  # (R, W, H)
    real = torch.tensor([row_index * width + position for row_index, row in enumerate(rows)
                         for position in range(len(row.tokens))])
    hidden = hidden_R.flatten(0, 1)[real.to(device)]  # (U, H): each row's tokens once, a shared prefix once
    # The row token each datum token reads; the output layer runs once per row token, not once per datum token
    # (a prefix shared by G datums would otherwise go through the full-vocabulary softmax G times).
    starts = [0]
    for row in rows:
        starts.append(starts[-1] + len(row.tokens))
    source = torch.tensor([start + position for start, row in zip(starts, rows, strict=False)
                           for member in row.members for position in member])  # (N,)
    targets = torch.cat([datum.inputs["target_tokens"].reshape(len(datum.tokens), -1) for datum in batch])  # (N, K)
    # The output layer sees tokens, not rows: each token gets its row's adapter.
    token_adapters = None if output_adapters is None else [
        output_adapters[index] for index, row in enumerate(rows) for _ in row.tokens]
    shapes = [datum.inputs["target_tokens"].shape for datum in batch]
    if last is not None:  # the output layer only where a kept target reads
        kept = torch.cat([torch.arange(len(datum.tokens)) >= len(datum.tokens) - last for datum in batch])
        source, targets = source[kept], targets[kept]
        read = torch.unique(source)  # ascending
        hidden, source = hidden[read.to(device)], torch.searchsorted(read, source)
        token_adapters = None if token_adapters is None else [token_adapters[index] for index in read.tolist()]
        shapes = [(min(shape[0], last), *shape[1:]) for shape in shapes]
    order = torch.argsort(source, stable=True)  # datum tokens by row token, so each chunk reads a contiguous run
    source_sorted = source[order]
    chunks = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        low, high = torch.searchsorted(source_sorted, torch.tensor([start, start + chunk_tokens])).tolist()
        piece = (hidden[start:start + chunk_tokens], (source_sorted[low:high] - start).to(device),
                 targets[order[low:high]].to(device),
                 None if token_adapters is None else token_adapters[start:start + chunk_tokens])
        # With several chunks, each chunk's logits are recomputed in backward rather than all kept at once; a
        # single chunk would only be computed twice for the same peak.
        if torch.is_grad_enabled() and hidden.shape[0] > chunk_tokens:
            chunks.append(checkpoint(_logprobs_of_targets, output_layer, *piece, use_reentrant=False))
        else:
            chunks.append(_logprobs_of_targets(output_layer, *piece))
    flat = torch.cat(chunks)[torch.argsort(order).to(device)]  # (N, K), datum after datum
    return [part.reshape(shape) for part, shape in zip(flat.split([shape[0] for shape in shapes]), shapes,
                                                         strict=True)]


def _logprobs_of_targets(output_layer: torch.nn.Module, hidden: Tensor, reads: Tensor, targets: Tensor,
                         adapters: list[str] | None) -> Tensor:
    """(n, K) logprobs of `targets` at the row tokens `reads` indexes in `hidden` (u, H); `adapters`: each row
    token's PEFT adapter (PEFT's mixed-adapter batch), or None for the active one."""
    logits = output_layer(hidden) if adapters is None else output_layer(hidden, adapter_names=adapters)  # (u, V)
    return TargetLogprobs.apply(logits, reads, targets)
