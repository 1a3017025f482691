"""The learner: one base model, many LoRA training runs on it, each with its own adapter, optimizer and step.

`Learner` is a plain class (tested in-process); `LearnerActor = ray.remote(Learner)` is the same class as a Ray
actor. The learner does not know which loss it runs: `rl.losses` names them, says what each reads, and
computes them; the learner checks the batch against that, computes target logprobs, and backpropagates.

Every call either succeeds or leaves the run exactly as it was: a batch is checked completely before any model
work, gradients of a call are accumulated aside and added only when the whole call succeeded, and checkpoints
are written atomically by the checkpoint store.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import secrets
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path

import ray
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from rl import losses
from rl.checkpoints import CheckpointStore
from rl.custom_loss import custom_loss_spec
from rl.learner.batch import (
    PackedRow,
    PreparedDatum,
    micro_batches,
    prepare_batch,
    row_datums,
    row_width,
    target_logprobs,
)
from rl.learner.fused import ATTENTION, fuse_lora_layers
from rl.memory import release_large_blocks, resident_memory
from rl.models import native_bf16, resolve_dtype, resolve_model
from rl.types import (
    AdamParams,
    CheckpointsListResponse,
    CreateCustomLossRequest,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoadWeightsResponse,
    LoraConfig,
    OptimStepResponse,
    SaveWeightsExternalResponse,
    SaveWeightsResponse,
    TensorData,
    WeightsInfoResponse,
)
from rl.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SamplerWeights, adapter_content_hash, lora_scale

# Which modules LoRA adapts, per architecture family.
_TARGET_MODULES = {
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "unembed": ["lm_head"],
}
LORA_ALPHA = 32
KNOWN_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_LENGTH = 24


def probe_tokens(vocab_size: int) -> list[int]:
    """The fixed token sequence on which a sampler replica must reproduce the learner's logprobs."""
    rng = random.Random(0)
    return [rng.randrange(vocab_size) for _ in range(PROBE_LENGTH)]


def _spans(names: list[str]) -> list[tuple[str, int, int]]:
    """(name, start, end) of each run of equal consecutive names."""
    spans, start = [], 0
    for name, run in groupby(names):
        end = start + sum(1 for _ in run)
        spans.append((name, start, end))
        start = end
    return spans


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _LoraRun:
    adapter: str  # the PEFT adapter name (model ids may hold characters PEFT does not allow)
    lora: LoraConfig
    optimizer: torch.optim.AdamW
    params: list[torch.nn.Parameter]
    step: int = 0


@dataclass
class _Call:
    """One run's part of a pass: its batch, checked, and the loss that reads it."""
    run: _LoraRun
    spec: losses.LossSpec
    config: dict
    prepared: list[PreparedDatum]


class Learner:
    """LoRA training runs on one base model. See the module docstring for the guarantees."""

    def __init__(self, base_model: str, *, storage: Path | str, storage_uri: str | None = None,
                 dtype: str = "float32", device: str | None = None, micro_batch_tokens: int = 512,
                 logits_chunk_tokens: int = 1024, threads: int | None = None):
        """`threads`: torch's CPU threads; None: every core this process may run on. (Ray sets a CPU actor's
        threads to its num_cpus, 1 by default, which would leave cores idle while the learner works.)"""
        release_large_blocks()
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device.type)
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.base_model = base_model
        self.micro_batch_tokens = micro_batch_tokens
        self.logits_chunk_tokens = logits_chunk_tokens
        self.store = CheckpointStore(storage, storage_uri=storage_uri)
        # On CPU, eager attention trains 13% faster than SDPA (whose CPU flash-attention backward is slow),
        # measured on SmolLM2 with 50- and 400-token sequences, and rl's leaner form of it 4% faster again.
        attention = ATTENTION if self.device.type == "cpu" else "sdpa"
        self._hf = AutoModelForCausalLM.from_pretrained(resolve_model(base_model), dtype=_DTYPES[self.dtype],
                                                        attn_implementation=attention)
        self._hf.to(self.device)
        config = self._hf.config
        if config.model_type not in KNOWN_ARCHITECTURES:
            raise ValueError(f"base model {base_model!r} is a {config.model_type!r} model; LoRA targets are known "
                             f"for {', '.join(KNOWN_ARCHITECTURES)}")
        self.vocab_size = config.vocab_size
        self.context = config.max_position_embeddings
        self._pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self._peft: PeftModel | None = None
        self._runs: dict[str, _LoraRun] = {}
        self._lora_layers: list[LoraLayer] | None = None
        """The model's LoRA layers, found again after an adapter is added or deleted (`_layers`)."""

    # ---- runs ------------------------------------------------------------------------------------------------

    def create(self, base_model: str, lora: LoraConfig, *, model_id: str | None = None,
               storage: str | None = None) -> str:
        """Adds a LoRA run on the base model; returns its model id. The same seed gives the same adapter.
        `storage`: a folder whose MODEL_ID/ holds this run's checkpoints, instead of the learner's own storage."""
        if base_model != self.base_model:
            raise ValueError(f"base_model {base_model!r}: this learner holds {self.base_model!r}")
        model_id = model_id or f"run-{secrets.token_hex(4)}"
        if model_id in self._runs:
            raise ValueError(f"model_id {model_id!r} exists already")
        modules = [name for part, enabled in (("attn", lora.train_attn), ("mlp", lora.train_mlp),
                                              ("unembed", lora.train_unembed)) if enabled
                   for name in _TARGET_MODULES[part]]
        if not modules:
            raise ValueError("lora_config trains nothing: set train_attn, train_mlp or train_unembed")
        lora = lora.model_copy(update={"seed": lora.seed if lora.seed is not None else secrets.randbits(31)})
        adapter = f"run{len(self._runs)}_{secrets.token_hex(2)}"
        # Tinker's scaling: the update is (LORA_ALPHA / rank) * B @ A, alpha fixed whatever the rank (as in LoRA
        # Without Regret and tinker-cookbook's hyperparameter helpers), so a learning rate tuned there means the
        # same step here, and the best learning rate hardly moves with the rank.
        peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=modules,
                                     bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            if self._peft is None:
                self._peft = get_peft_model(self._hf, peft_config, adapter_name=adapter)
            else:
                self._peft.add_adapter(adapter, peft_config)
        fuse_lora_layers(self._peft)
        # Adapters keep float32 weights (PEFT's default, so AdamW's small updates are not rounded away); the
        # forward pass runs them in the base model's dtype under autocast (`_target_logprobs`) instead of letting
        # PEFT cast every adapted layer's input to float32, which doubled the activations kept for backward.
        for module in self._peft.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
        params = [param for name, param in self._peft.named_parameters() if f".{adapter}." in name]
        for param in params:
            param.requires_grad_(True)
        # fused: one kernel over all of a run's tensors (CPU and CUDA), instead of ~6 per tensor launched from
        # Python: 3x faster on a 2-core CPU for 422 tensors of 7.8M values; on a GPU the host is what a step waits on.
        optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, fused=True)
        self._lora_layers = None  # its target modules may have wrapped more layers
        self._runs[model_id] = _LoraRun(adapter=adapter, lora=lora, optimizer=optimizer, params=params)
        if storage is not None:
            self.store.place(model_id, Path(storage) / model_id)
        return model_id

    def delete(self, model_id: str) -> None:
        """Drops a run and its adapter from memory (its checkpoints stay)."""
        self._peft.delete_adapter(self._run(model_id).adapter)
        del self._runs[model_id]
        self._lora_layers = None
        if self._runs and self._peft.active_adapter not in self._peft.peft_config:
            # PEFT keeps the deleted name when several adapters were active; its config lookups would fail.
            self._peft.active_adapter = next(iter(self._runs.values())).adapter

    def step(self, model_id: str) -> int:
        return self._run(model_id).step

    def memory(self, *, reset_peak: bool = False) -> dict[str, float]:
        """This process's resident memory in GiB: now, and its peak since the last reset (rl.memory)."""
        return resident_memory(reset_peak=reset_peak)

    def describe(self) -> dict[str, str | bool]:
        """What it computes in, and where: `dtype` as resolved (never "auto"), `device`, and whether the device
        computes in bf16 natively."""
        return {"dtype": self.dtype, "device": str(self.device), "native_bf16": native_bf16(self.device.type)}

    def _run(self, model_id: str) -> _LoraRun:
        if model_id not in self._runs:
            raise ValueError(f"unknown model_id {model_id!r}")
        return self._runs[model_id]

    # ---- forward and backward --------------------------------------------------------------------------------

    def forward(self, model_id: str, batch: ForwardBackwardInput, *,
                custom_loss: CreateCustomLossRequest | None = None) -> ForwardBackwardOutput:
        """The loss and target logprobs of a batch, without gradients. With loss_fn="custom", `custom_loss` is
        the loss to run (rl.custom_loss)."""
        return self._pass([self._call(model_id, batch, custom_loss)], backward=False)[0]

    def forward_backward(self, model_id: str, batch: ForwardBackwardInput, *,
                         custom_loss: CreateCustomLossRequest | None = None) -> ForwardBackwardOutput:
        """The loss and target logprobs of a batch; its gradients add to the run's until `optim_step`."""
        return self._pass([self._call(model_id, batch, custom_loss)], backward=True)[0]

    def forward_backward_many(self, calls: list[tuple[str, ForwardBackwardInput, CreateCustomLossRequest | None]]
                              ) -> list[ForwardBackwardOutput | Exception]:
        """`forward_backward` of several runs in one pass: (model_id, batch, custom_loss) each, one call per run.
        Their rows share micro-batches, each row through its own run's adapter (`_adapter_per_row`), so a pass
        over many small batches computes like one over a large batch. Exact: rows never attend to each
        other, a run's loss reads only its own rows, and an adapter's gradient comes only from its run's loss, so
        each run gets the result and gradients of its call alone (within rounding: the rows' padding differs).

        Returns each call's output or the error it alone raised: a batch that is refused (checked before any
        model work) is reported in its place and the others run; if the shared pass fails, each call is run
        alone, so a call that fails fails alone."""
        model_ids = [model_id for model_id, _, _ in calls]
        if len(set(model_ids)) != len(model_ids):
            raise ValueError(f"forward_backward_many takes one call per run; got model ids {model_ids}")
        results: list[ForwardBackwardOutput | Exception] = []
        prepared: dict[int, _Call] = {}
        for number, call in enumerate(calls):
            try:
                prepared[number] = self._call(*call)
                results.append(None)
            except ValueError as error:
                results.append(error)
        try:
            outputs = self._pass(list(prepared.values()), backward=True) if prepared else []
        except Exception as error:
            outputs = [error] if len(prepared) == 1 else [self._alone(call) for call in prepared.values()]
        for number, output in zip(prepared, outputs, strict=True):
            results[number] = output
        return results

    def _alone(self, call: _Call) -> ForwardBackwardOutput | Exception:
        try:
            return self._pass([call], backward=True)[0]
        except Exception as error:  # reported as this call's result
            return error

    def _call(self, model_id: str, batch: ForwardBackwardInput,
              custom_loss: CreateCustomLossRequest | None) -> _Call:
        """One run's batch, checked in full against its loss (a ValueError names the datum and field)."""
        run = self._run(model_id)
        if batch.loss_fn == "custom":
            if custom_loss is None:
                raise ValueError("loss_fn='custom' runs a loss stored by create_custom_loss; none was given")
            spec, config = custom_loss_spec(custom_loss.name, custom_loss.inputs, custom_loss.graph), {}
        else:
            config = losses.resolve_config(batch.loss_fn, batch.loss_fn_config)
            spec = losses.LOSSES[batch.loss_fn]
        return _Call(run, spec, config, prepare_batch(batch.data, spec, batch.loss_fn, self.vocab_size,
                                                            self.context))

    def _pass(self, calls: list[_Call], *, backward: bool) -> list[ForwardBackwardOutput]:
        """The calls' losses and target logprobs, with their gradients when `backward`, in one pass over
        micro-batches of their rows. Each run's gradients add to its earlier ones only if the whole pass
        succeeds."""
        for call in calls:
            if call.spec.reference_input is not None:
                self._fill_reference(call.prepared, call.spec.reference_input, call.spec.datums_per_group)
        adapters = [call.run.adapter for call in calls]
        self._activate([call.run for call in calls])
        logprobs_by_index: list[dict[int, torch.Tensor]] = [{} for _ in calls]
        metric_parts: list[list[tuple[losses.Metrics, int]]] = [[] for _ in calls]
        with ExitStack() as stack:
            for call in calls:
                stack.enter_context(self._gradients_set_aside(call.run.params, keep=backward))
            stack.enter_context(torch.set_grad_enabled(backward))
            parts = [(call.prepared, call.spec.datums_per_group) for call in calls]
            layers = self._layers()
            for rows in micro_batches(parts, self.micro_batch_tokens):
                row_adapters = [adapters[row.part] for row in rows]
                if len(set(row_adapters)) > 1:
                    adapter_choice = self._adapter_per_row(layers, row_adapters)
                else:
                    adapter_choice = self._only(layers, row_adapters[0]) if len(calls) > 1 else nullcontext()
                    row_adapters = None
                over_budget = backward and len(rows) * row_width(rows) > self.micro_batch_tokens
                with (self._saving_memory() if over_budget else nullcontext(),  # the backward recomputes in both
                      adapter_choice):
                    logprobs_D = self._target_logprobs(rows, row_adapters)
                    by_part: list[list[tuple[PreparedDatum, torch.Tensor]]] = [[] for _ in calls]
                    for (part, datum), logprobs in zip(((row.part, datum) for row in rows for datum in row.datums),
                                                       logprobs_D, strict=True):
                        by_part[part].append((datum, logprobs))
                    total = 0.0
                    for part, pairs in enumerate(by_part):
                        if not pairs:
                            continue
                        pairs.sort(key=lambda pair: pair[0].index)  # a loss reads a group's datums one after another
                        call = calls[part]
                        inputs_D = [{name: value.to(self.device) for name, value in datum.inputs.items()}
                                    for datum, _ in pairs]
                        loss, metrics = call.spec.fn([logprobs for _, logprobs in pairs], inputs_D, call.config)
                        total = total + loss
                        # What the model computed after prefix sharing: the figure a FLOP count starts from.
                        metrics["computed_tokens:sum"] = float(sum(len(row.tokens) for row in rows
                                                                   if row.part == part))
                        metric_parts[part].append((metrics, len(pairs) // call.spec.datums_per_group))
                        logprobs_by_index[part].update((datum.index, logprobs.detach().cpu())
                                                       for datum, logprobs in pairs)
                    if backward:
                        total.backward()
        return [ForwardBackwardOutput(
            loss_fn_outputs=[{"logprobs": TensorData.from_torch(found[index])} for index in range(len(found))],
            metrics=losses.merge_metrics(parts)) for found, parts in zip(logprobs_by_index, metric_parts, strict=True)]

    def _activate(self, runs: list[_LoraRun]) -> None:
        """Makes the runs' adapters the active, trainable ones. Sets each LoRA layer's active adapters directly:
        PEFT's set_adapter walks every module of the model, which took 96 ms of a 140 ms small step on an H200
        whenever calls of different runs alternated (rl-serve's users)."""
        adapters = [run.adapter for run in runs]
        if self._peft.active_adapters == adapters:
            return
        for layer in self._layers():
            layer._active_adapter = adapters
        self._peft.base_model.active_adapter = adapters[0] if len(adapters) == 1 else adapters
        self._peft.active_adapter = adapters[0]  # what PeftModel reads its config by
        for run in runs:  # PEFT freezes every inactive adapter when it re-enables adapters or deletes one
            for param in run.params:
                param.requires_grad_(True)

    @contextmanager
    def _adapters_off(self):
        """The base model alone for the block. PEFT's disable_adapter reads the config of the adapter it holds
        active, a name it keeps after that adapter is deleted when no other was active with it (the last run of a
        sweep's shared learner that ended, before the next run's first call)."""
        if self._peft.active_adapter not in self._peft.peft_config and self._peft.peft_config:
            self._peft.active_adapter = next(iter(self._peft.peft_config))
        with self._peft.disable_adapter():
            yield

    def _layers(self) -> list[LoraLayer]:
        if self._lora_layers is None:
            self._lora_layers = [module for module in self._peft.modules() if isinstance(module, LoraLayer)]
        return self._lora_layers

    def _target_logprobs(self, rows: list[PackedRow], row_adapters: list[str] | None = None, *,
                         last: int | None = None) -> list[torch.Tensor]:
        model = self._hf  # PEFT puts its LoRA layers into this model itself (get_base_model() is it)
        dtype = _DTYPES[self.dtype]
        output_layer = model.get_output_embeddings()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return target_logprobs(model.get_decoder(), output_layer, rows, pad_id=self._pad_id,
                                   chunk_tokens=self.logits_chunk_tokens, device=self.device,
                                   output_adapters=row_adapters if isinstance(output_layer, LoraLayer) else None,
                                   last=last)

    @contextmanager
    def _only(self, layers: list[LoraLayer], adapter: str):
        """Every LoRA layer applies `adapter` alone, for a micro-batch of one run's rows in a pass over several
        runs. Sets the layers' active adapter directly: PEFT's set_adapter would also switch every other run's
        parameters out of training and walks every module, per micro-batch."""
        active = [layer._active_adapter for layer in layers]
        for layer in layers:
            layer._active_adapter = [adapter]
        try:
            yield
        finally:
            for layer, names in zip(layers, active, strict=True):
                layer._active_adapter = names

    @contextmanager
    def _adapter_per_row(self, layers: list[LoraLayer], row_adapters: list[str]):
        """Every LoRA layer applies each row's own adapter (`row_adapters`: one PEFT adapter per row of the
        micro-batch), through the backward pass too (which recomputes checkpointed layers); the output layer reads
        one adapter per token from its `adapter_names` argument (`target_logprobs`).

        PEFT computes the base layer alone ("__base__"); then each run's update is computed on its rows' slice of
        the input, rows being grouped by run (`micro_batches`), and the updates are added at once. PEFT's own
        mixed-adapter forward gathers and scatters the layer's output once per adapter instead, which made a pass
        of four runs' batches 30% slower than four passes on SmolLM2 (the output layer's vocabulary-wide logits
        most)."""
        spans: dict[torch.nn.Module, list[tuple[str, int, int]]] = {}
        row_spans, base_rows = _spans(row_adapters), ["__base__"] * len(row_adapters)

        def base_only(module, args, kwargs):
            names = kwargs.get("adapter_names")  # the output layer's, one per token
            spans[module] = _spans(names) if names else row_spans
            return args, {**kwargs, "adapter_names": ["__base__"] * len(names) if names else base_rows}

        def add_updates(module, args, kwargs, output):
            hidden, parts = args[0], spans.pop(module)
            if not any(name in module.lora_A for name, _, _ in parts):
                return output
            # One update tensor, added once: an in-place add per slice would make autograd clone the whole
            # output's gradient per slice.
            updates = [module.lora_B[name](module.lora_A[name](hidden[start:end])) * module.scaling[name]
                       if name in module.lora_A else output.new_zeros((end - start, *output.shape[1:]))
                       for name, start, end in parts]
            return output + torch.cat(updates).to(output.dtype)

        hooks = [hook for layer in layers for hook in (
            layer.register_forward_pre_hook(base_only, with_kwargs=True),
            layer.register_forward_hook(add_updates, with_kwargs=True))]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def _saving_memory(self):
        """For a micro-batch wider than the token budget (a single datum or group longer than it): SDPA attention,
        which never forms the (width x width) score matrix, and each decoder layer's activations recomputed in the
        backward pass instead of kept. A datum of the full context then trains in bounded memory, for one more
        forward pass of its tokens."""
        model = self._peft.get_base_model()
        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        attention, training = model.config._attn_implementation, model.training
        model.config._attn_implementation = "sdpa"
        model.train()  # transformers checkpoints a layer only in training mode (dropout is 0 in every adapter)
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = False
            model.train(training)
            model.config._attn_implementation = attention

    def _fill_reference(self, prepared: list[PreparedDatum], name: str, group_size: int) -> None:
        """Computes `name` (the base model's target logprobs, adapter off) for the datums that lack it."""
        lacking = [datum for datum in prepared if name not in datum.inputs]
        if not lacking:
            return
        # Whole groups stay together, so a pair's prompt is computed once (rl.learner.batch.pack_rows).
        with self._adapters_off():
            for datum, logprobs in self._logprobs_without_gradients(
                    lacking, group_size if len(lacking) == len(prepared) else 1):
                datum.inputs[name] = logprobs

    def logprobs(self, model_id: str | None, sequences: list[list[int]], *, adapter: bool = True,
                 last: int | None = None) -> list[list[float]]:
        """Each sequence's logprobs of its tokens after the first (token t given those before it), under the
        run's adapter, or with no adapter (the base model) when `adapter` is False or there is no run (`model_id`
        None: a teacher model held for its own logprobs); `last`: of its last `last` tokens only (a judge's
        verdict: the output layer runs on those positions alone). No gradients."""
        if last is not None and last < 1:
            raise ValueError(f"last must be at least 1 (or None for every token), got {last}")
        data = [Datum.next_token(tokens, weights=[0.0] * len(tokens)) for tokens in sequences]
        prepared = prepare_batch(data, losses.LOSSES["cross_entropy"], "logprobs", self.vocab_size, self.context)
        if model_id is not None:
            self._activate([self._run(model_id)])
        base = (model_id is None or not adapter) and self._peft is not None
        found: dict[int, list[float]] = {}
        with self._adapters_off() if base else nullcontext():
            for datum, logprobs in self._logprobs_without_gradients(prepared, 1, last=last):
                found[datum.index] = logprobs.tolist()
        return [found[index] for index in range(len(sequences))]

    def _logprobs_without_gradients(self, prepared: list[PreparedDatum], group_size: int, *,
                                    last: int | None = None):
        """(datum, its target logprobs, or its last `last`, as float32 on the CPU) for each datum, in micro-batches
        of whole groups."""
        with torch.no_grad():
            for rows in micro_batches([(prepared, group_size)], self.micro_batch_tokens):
                for datum, logprobs in zip(row_datums(rows), self._target_logprobs(rows, last=last), strict=True):
                    yield datum, logprobs.float().cpu()

    @staticmethod
    @contextmanager
    def _gradients_set_aside(params: list[torch.nn.Parameter], *, keep: bool):
        """Runs a call on fresh gradients; adds them to the earlier ones only if the call succeeds."""
        earlier = [param.grad for param in params]
        for param in params:
            param.grad = None
        try:
            yield
        except BaseException:
            for param, grad in zip(params, earlier, strict=True):
                param.grad = grad
            raise
        for param, grad in zip(params, earlier, strict=True):
            if not keep or param.grad is None:
                param.grad = grad
            elif grad is not None:
                param.grad += grad

    # ---- optimizer -------------------------------------------------------------------------------------------

    def optim_step(self, model_id: str, params: AdamParams) -> OptimStepResponse:
        """One AdamW step on the gradients accumulated since the last; clears them.

        Gradients that are not finite are cleared without a step (the weights, the optimizer's moments and the
        step count stay as they were) and reported as `skipped_steps:sum` = 1, with no grad_norm (JSON has no
        inf or NaN), so the run trains on.
        """
        run = self._run(model_id)
        grads = [param.grad for param in run.params if param.grad is not None]
        if not grads:
            raise ValueError(f"optim_step on {model_id!r}: no gradients; call forward_backward first")
        grad_norm = float(torch.nn.utils.get_total_norm(grads))
        metrics = {"learning_rate:mean": params.learning_rate, "step:max": float(run.step)}
        if not math.isfinite(grad_norm):
            run.optimizer.zero_grad(set_to_none=True)
            print(f"optim_step on {model_id}: the gradient norm is {grad_norm}; step skipped, gradients cleared",
                  flush=True)
            return OptimStepResponse(metrics={**metrics, "skipped_steps:sum": 1.0})
        if params.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(run.params, params.grad_clip_norm, torch.tensor(grad_norm))
        for group in run.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return OptimStepResponse(metrics={**metrics, "grad_norm:mean": grad_norm, "skipped_steps:sum": 0.0,
                                          "step:max": float(run.step)})

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_weights(self, model_id: str, name: str | None = None, *, overwrite: bool = False,
                     ttl_seconds: int | None = None,
                     user_metadata: dict[str, str] | None = None) -> SaveWeightsResponse:
        """Saves adapter, optimizer state and step as `tinker://RUN/weights/NAME`, to resume exactly; it expires
        after `ttl_seconds` if given, and keeps `user_metadata` to list with it."""
        run = self._run(model_id)

        def fill(folder: Path) -> dict:
            self._write_adapter(run, folder)
            torch.save(run.optimizer.state_dict(), folder / "optimizer.pt")
            return {}

        checkpoint = self.store.write(model_id, "training", name or f"step-{run.step:06d}", fill,
                                      metadata=self._run_metadata(run), overwrite=overwrite, ttl_seconds=ttl_seconds,
                                      user_metadata=user_metadata)
        return SaveWeightsResponse(path=checkpoint.tinker_path)

    def save_weights_for_sampler(self, model_id: str, name: str | None = None, *, overwrite: bool = False,
                                 ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None) -> SamplerWeights:
        """Publishes the adapter as a PEFT folder at `tinker://RUN/sampler_weights/NAME`, with everything a sampler
        needs (rl.weights): the files (in Ray's object store), their content hash and the probe's logprobs, the
        last two recorded with the checkpoint. `ttl_seconds` and `user_metadata` as in save_weights."""
        run = self._run(model_id)
        probe = probe_tokens(self.vocab_size)
        written: dict[str, bytes] = {}

        def fill(folder: Path) -> dict:
            written.update(self._write_adapter(run, folder))
            return {"content_hash": adapter_content_hash(written), "probe_tokens": probe,
                    "probe_logprobs": self.logprobs(model_id, [probe])[0]}

        checkpoint = self.store.write(model_id, "sampler", name or f"step-{run.step:06d}", fill,
                                      metadata=self._run_metadata(run), overwrite=overwrite, ttl_seconds=ttl_seconds,
                                      user_metadata=user_metadata)
        return self._sampler_weights(checkpoint.tinker_path, self.store.metadata(checkpoint.tinker_path), written)

    def save_weights_external(self, model_id: str, name: str, *,
                              ttl_seconds: int | None = None) -> SaveWeightsExternalResponse:
        """Exports the adapter as a PEFT folder (what transformers + PEFT and vLLM load) at
        `tinker://RUN/external_weights/NAME`, for download (`checkpoint_file`)."""
        run = self._run(model_id)

        def fill(folder: Path) -> dict:
            self._write_adapter(run, folder)
            return {}

        checkpoint = self.store.write(model_id, "external", name, fill, metadata=self._run_metadata(run),
                                      ttl_seconds=ttl_seconds)
        return SaveWeightsExternalResponse(path=checkpoint.tinker_path, size_bytes=checkpoint.size_bytes)

    def checkpoint_files(self, path: str) -> list[str]:
        return list(self.store.files(path))

    def checkpoint_file(self, path: str, name: str) -> bytes:
        """One file of a checkpoint, by its path relative to the checkpoint's folder."""
        files = self.store.files(path)
        if name not in files:
            raise ValueError(f"{path} has no file {name!r}")
        return files[name].read_bytes()

    def sampler_weights(self, path: str) -> SamplerWeights:
        """A `sampler_weights` checkpoint saved earlier (by any run on this base model), ready to publish."""
        files = {name: (self.store.folder(path, kind="sampler") / name).read_bytes()
                 for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        metadata = self.store.metadata(path)
        if adapter_content_hash(files) != metadata["content_hash"]:
            raise ValueError(f"{path} no longer matches the content hash recorded when it was saved")
        if "probe_logprobs" not in metadata:
            raise ValueError(f"{path} was saved without probe logprobs (by an older version of rl); load it with "
                             "load_weights and save it again")
        return self._sampler_weights(path, metadata, files)

    @staticmethod
    def _sampler_weights(path: str, metadata: dict, files: dict[str, bytes]) -> SamplerWeights:
        return SamplerWeights(tinker_path=path, step=metadata["step"], content_hash=metadata["content_hash"],
                              files=ray.put(files), probe_tokens=metadata["probe_tokens"],
                              probe_logprobs=metadata["probe_logprobs"])

    def load_weights(self, path: str, *, optimizer: bool, model_id: str | None = None) -> LoadWeightsResponse:
        """Loads a checkpoint into run `model_id`, or into a new run (named `model_id` if given) when there is none.

        With `optimizer`, the optimizer state and step come back too and training resumes exactly; without,
        only the adapter does, with a fresh optimizer at step 0.
        """
        # Only a training checkpoint holds optimizer state; the adapter alone comes from either kind.
        folder = self.store.folder(path, kind="training" if optimizer else None)
        metadata = self.store.metadata(path)
        if metadata["base_model"] != self.base_model:
            raise ValueError(f"{path} was trained on {metadata['base_model']!r}; this learner holds "
                             f"{self.base_model!r}")
        saved_lora = LoraConfig.model_validate(metadata["lora_config"])
        adapter_state = load_file(folder / ADAPTER_WEIGHTS)
        # map_location: a checkpoint written on another device (a GPU learner's, resumed on a CPU) loads here.
        optimizer_state = (torch.load(folder / "optimizer.pt", weights_only=True, map_location=self.device)
                           if optimizer else None)
        new_run = model_id is None or model_id not in self._runs
        if new_run:
            model_id = self.create(self.base_model, saved_lora, model_id=model_id)
        run = self._run(model_id)
        if run.lora.model_dump(exclude={"seed"}) != saved_lora.model_dump(exclude={"seed"}):
            raise ValueError(f"{path} holds a {saved_lora} adapter; run {model_id!r} has {run.lora}")
        self._set_weights(model_id, adapter_state, optimizer_state, metadata["step"] if optimizer else 0,
                          new_run=new_run)
        return LoadWeightsResponse(path=path, model_id=model_id)

    def load_adapter(self, model_id: str, files: dict[str, bytes]) -> None:
        """Sets run `model_id`'s adapter to a PEFT adapter's weights (its folder's two files, ADAPTER_CONFIG and
        ADAPTER_WEIGHTS, as bytes: the caller's files need not be on this node), with a fresh optimizer at step 0:
        a run that starts from weights trained elsewhere (another run's checkpoint, an adapter from the HF hub).
        Refused, the run left as it was, unless the adapter has the run's rank and target modules; another alpha
        (or rsLoRA) is taken as it is meant: its B is rescaled so that s * B @ A is the adapter's update."""
        run = self._run(model_id)
        theirs, own = json.loads(files[ADAPTER_CONFIG]), self._peft.peft_config[run.adapter]
        for key, value in (("r", own.r), ("target_modules", sorted(own.target_modules))):
            given = theirs.get(key)
            given = sorted(given) if key == "target_modules" and isinstance(given, list) else given
            if given != value:
                raise ValueError(f"the adapter's {key} is {given!r}; this run's is {value!r}")
        rescale = lora_scale(theirs) / lora_scale(own.to_dict())
        tensors = {name: tensor * rescale if ".lora_B." in name else tensor
                   for name, tensor in safetensors_load(files[ADAPTER_WEIGHTS]).items()}
        self._set_weights(model_id, tensors, None, 0, new_run=False)

    def create_from_adapter(self, files: dict[str, bytes]) -> str:
        """A new run holding a PEFT adapter (its two files as bytes, as for `load_adapter`) in the adapter's own
        rank and target modules: a frozen one the loop only reads, such as a distillation teacher; returns its model
        id. Refused, with nothing created, where its target modules are not a union of `_TARGET_MODULES`' groups."""
        theirs = json.loads(files[ADAPTER_CONFIG])
        targets = set(theirs.get("target_modules") or [])
        parts = {part for part, modules in _TARGET_MODULES.items() if targets >= set(modules)}
        if not targets or targets != {module for part in parts for module in _TARGET_MODULES[part]}:
            raise ValueError(f"the adapter's target_modules are {sorted(targets)}; a run adapts "
                             + ", ".join(f"{part} ({' '.join(modules)})" for part, modules in _TARGET_MODULES.items())
                             + " or several of them")
        lora = LoraConfig(rank=theirs["r"], seed=0, train_attn="attn" in parts, train_mlp="mlp" in parts,
                          train_unembed="unembed" in parts)
        model_id = self.create(self.base_model, lora)
        try:
            self.load_adapter(model_id, files)
        except BaseException:
            self.delete(model_id)
            raise
        return model_id

    def _set_weights(self, model_id: str, adapter_state: dict[str, torch.Tensor], optimizer_state: dict | None,
                     step: int, *, new_run: bool) -> None:
        """Puts an adapter's weights, and with `optimizer_state` the optimizer's at `step` (else a fresh optimizer
        at `step`), into run `model_id`. Every tensor of the run's adapter must be given, and none else; weights that
        fail half-way (torch copies the tensors that fit before it raises for those that do not) leave the run as it
        was, and a run made for them (`new_run`) is gone."""
        run = self._run(model_id)
        before = None if new_run else ([param.detach().clone() for param in run.params],
                                       copy.deepcopy(run.optimizer.state_dict()), run.step)
        try:
            loaded = set_peft_model_state_dict(self._peft, adapter_state, adapter_name=run.adapter)
            missing = [key for key in loaded.missing_keys if f".{run.adapter}." in key]
            if loaded.unexpected_keys or missing:
                raise ValueError(f"the adapter's tensors do not match the run's: {len(missing)} missing (first "
                                 f"{missing[:1]}), {len(loaded.unexpected_keys)} unknown (first "
                                 f"{loaded.unexpected_keys[:1]})")
            if optimizer_state is not None:
                # The checkpoint gives the moments and step counts; how the optimizer runs (fused) is this
                # learner's, whatever learner wrote it (its rates and betas are set again by every optim_step).
                for saved, own in zip(optimizer_state["param_groups"], run.optimizer.param_groups, strict=True):
                    saved.update({key: value for key, value in own.items() if key != "params"})
                run.optimizer.load_state_dict(optimizer_state)
            else:
                run.optimizer.state.clear()
            run.step = step
        except BaseException:
            if new_run:
                self.delete(model_id)
            else:
                params, optimizer_before, run.step = before
                with torch.no_grad():
                    for param, value in zip(run.params, params, strict=True):
                        param.copy_(value)
                run.optimizer.load_state_dict(optimizer_before)
            raise
        run.optimizer.zero_grad(set_to_none=True)

    def list_checkpoints(self, model_id: str) -> CheckpointsListResponse:
        return CheckpointsListResponse(checkpoints=self.store.list(model_id))

    def weights_info(self, path: str) -> WeightsInfoResponse:
        """What a checkpoint needs to load: its base model and adapter shape."""
        metadata = self.store.metadata(path)
        lora = LoraConfig.model_validate(metadata["lora_config"])
        return WeightsInfoResponse(base_model=metadata["base_model"], lora_rank=lora.rank,
                                   train_unembed=lora.train_unembed, train_mlp=lora.train_mlp,
                                   train_attn=lora.train_attn)

    def delete_checkpoint(self, path: str) -> None:
        self.store.delete(path)

    def set_checkpoint_ttl(self, path: str, ttl_seconds: int | None) -> None:
        self.store.set_ttl(path, ttl_seconds)

    def _write_adapter(self, run: _LoraRun, folder: Path) -> dict[str, bytes]:
        """Writes a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors); returns the
        bytes written."""
        # The base output layer is frozen: an adapter of lm_head needs only its LoRA matrices.
        state = get_peft_model_state_dict(self._peft, adapter_name=run.adapter, save_embedding_layers=False)
        config = {key: sorted(value) if isinstance(value, set) else value  # JSON has no sets; sorted: one hash
                  for key, value in self._peft.peft_config[run.adapter].to_dict().items()}
        config["base_model_name_or_path"] = str(resolve_model(self.base_model))
        files = {ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
                 ADAPTER_WEIGHTS: safetensors_bytes({name: tensor.detach().cpu().contiguous()
                                                     for name, tensor in state.items()})}
        for name, content in files.items():
            (folder / name).write_bytes(content)
        return files

    def _run_metadata(self, run: _LoraRun) -> dict:
        return {"base_model": self.base_model, "step": run.step, "lora_config": run.lora.model_dump(),
                "dtype": self.dtype}


LearnerActor = ray.remote(Learner)
"""The learner as a Ray actor: `LearnerActor.options(num_gpus=1).remote("tiny", storage=...)`."""

