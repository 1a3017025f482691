"""Base models by name: the tiny test model, the offline SmolLM2, local folders, and the cache."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rl import models
from rl.sampler.engine import start_vllm_engine


def _file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_tiny_model_is_identical_across_builds_with_the_same_seed(tiny_model_dir, tmp_path):
    models.build_tiny_model(tmp_path / "again", seed=0)
    models.build_tiny_model(tmp_path / "other", seed=1)
    first, again, other = (_file_hashes(folder) for folder in (tiny_model_dir, tmp_path / "again",
                                                               tmp_path / "other"))
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= first.keys()
    assert first == again
    assert other["model.safetensors"] != first["model.safetensors"], "the seed must change the weights"
    assert other["tokenizer.json"] == first["tokenizer.json"], "the tokenizer does not depend on the seed"


def test_tiny_model_is_a_small_tied_llama_with_a_chatml_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings, "shaped like SmolLM2"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 1_500_000 < sum(parameter.numel() for parameter in model.parameters()) < 2_000_000
    assert len(tokenizer) == model.config.vocab_size == 2048, "the BPE vocabulary fills the model's"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id == model.config.eos_token_id
    assert len(ids) < len(text) / 2, "a trained BPE merges characters into longer tokens"


def test_unknown_name_lists_the_known_models():
    with pytest.raises(ValueError, match=r"unknown base model 'gpt-5'.*SmolLM2-135M-Instruct, tiny"):
        models.resolve_model("gpt-5")


def test_a_local_folder_is_used_as_it_is(tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_cache_builds_once_and_never_leaves_a_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    calls = []

    def failing_build(folder: Path) -> None:
        (folder / "half-written").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._cached("broken", failing_build)
    assert list((tmp_path / "models").iterdir()) == [], "a failed build leaves nothing behind"

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    first = models._cached("good", build)
    second = models._cached("good", build)
    assert first == second == tmp_path / "models" / "good" and len(calls) == 1
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["good"]


@pytest.mark.slow
def test_smollm2_is_prepared_offline_and_served_by_transformers_and_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    folder = models.resolve_model("SmolLM2-135M-Instruct")
    assert folder == tmp_path / "models" / f"SmolLM2-135M-Instruct-{models._FORMAT_VERSION}"
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == folder, "the second use is the cache"

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    # Both engines score the same answers, teacher-forced: greedy text would hang on near-ties that kernels break
    # differently (a Xeon with AMX answered "L'Étoile..."), logprobs of given tokens do not.
    context = tokenizer(prompt + "The capital of France is", add_special_tokens=False)["input_ids"]
    answers = {word: context + tokenizer(word, add_special_tokens=False)["input_ids"]
               for word in (" Paris", " Berlin", " banana")}
    assert all(len(tokens) == len(context) + 1 for tokens in answers.values()), "each answer is one token"

    # transformers in float32 on the bf16 weights: the reference, without rounding of its own.
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = {word: hf(torch.tensor([tokens])).logits[0, :-1].log_softmax(-1).gather(
                        -1, torch.tensor(tokens[1:])[:, None])[:, 0] for word, tokens in answers.items()}

    from vllm import SamplingParams, TokensPrompt

    llm = start_vllm_engine(folder, max_model_len=256)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16, "dtype auto serves the folder's bf16"
    outputs = llm.generate([TokensPrompt(prompt_token_ids=tokens) for tokens in answers.values()],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    served = {word: torch.tensor([step[token].logprob for step, token in zip(output.prompt_logprobs[1:], tokens[1:],
                                                                            strict=True)])
              for (word, tokens), output in zip(answers.items(), outputs, strict=True)}
    for word in answers:
        # vLLM computes in bf16: measured 0.045 mean |difference| over these 42 tokens (mean |logprob| 3.8).
        assert (served[word] - expected[word]).abs().mean() < 0.15, word
    for logprobs in (expected, served):  # measured in both: Paris -0.05, Berlin -9.6, banana -22.8
        paris = logprobs[" Paris"][-1]
        assert paris > -1.0 and paris > logprobs[" Berlin"][-1] + 4 and paris > logprobs[" banana"][-1] + 4


XEON_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(XEON_AMX, True), (EPYC_AVX2, False), (GRAVITON3, True), ("", False)])
def test_auto_dtype_is_bfloat16_only_on_cpus_that_compute_in_it(cpuinfo, native, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "cpuinfo")
    models.CPUINFO.write_text(cpuinfo)
    assert models.resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    for explicit in ("float32", "bfloat16", "float16"):
        assert models.resolve_dtype(explicit, "cpu") == explicit, "an explicit dtype is kept, whatever the CPU"
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto, float32, bfloat16, float16"):
        models.resolve_dtype("fp8", "cpu")


def test_auto_dtype_makes_no_claim_where_cpu_flags_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "absent")
    assert models.resolve_dtype("auto", "cpu") == "float32"
