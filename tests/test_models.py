"""Base models by name: the tiny test model, the offline SmolLM2, local folders, and the cache."""

import hashlib
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rl import models
from rl.engine import start_vllm_engine


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


def test_tiny_model_is_a_small_qwen2_with_a_chatml_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert 2_000_000 < sum(parameter.numel() for parameter in model.parameters()) < 2_500_000
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
    AutoModelForCausalLM.from_pretrained(folder)

    from vllm import SamplingParams

    llm = start_vllm_engine(folder, max_model_len=256)
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    assert "Paris" in output.text
