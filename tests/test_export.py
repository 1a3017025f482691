"""rl-export: an adapter merged into its base model gives the adapter's logprobs, with the input embedding as it was,
and the tokenizer with the run's chat template."""

import json

import pytest
import torch
from peft import PeftModel
from test_learner import PATTERN_TOKENS, train
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.chat import CHAT_TEMPLATES
from rl.driver.state import write_state
from rl.export import PROBE, export, main
from rl.learner.learner import Learner
from rl.models import build_tiny_model
from rl.types import LoraConfig


def logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A run folder as rl-train leaves it (config.json naming a chat template, state.json naming a checkpoint and a
    best), whose adapter (lm_head included) trained three steps, and that adapter's logprobs of PATTERN_TOKENS."""
    run = tmp_path_factory.mktemp("run")
    learner = Learner(str(tiny_model_dir), storage=run / "checkpoints")
    model_id = learner.create(str(tiny_model_dir), LoraConfig(rank=4, seed=0))
    train(learner, model_id, 3)
    best = learner.save_weights_for_sampler(model_id, "step-000003")
    expected = torch.tensor(learner.logprobs(model_id, [PATTERN_TOKENS])[0])
    train(learner, model_id, 1)
    latest = learner.save_weights(model_id, "step-4")
    (run / "config.json").write_text(json.dumps({"model": {"name": str(tiny_model_dir), "chat_template":
                                                           "role_colon"}}))
    write_state(run, {"step": 4, "checkpoint": latest.path, "best": {"step": 3, "checkpoint": best.tinker_path}})
    return run, learner.store.folder(best.tinker_path), expected


def test_the_merged_model_is_the_adapters_with_the_embedding_untouched(tiny_model_dir, trained_run, tmp_path):
    _, adapter, expected = trained_run
    difference, rounded = export(adapter, tmp_path / "merged", base=tiny_model_dir)
    assert difference == rounded < 1e-4, "float32: nothing rounded"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert (logprobs(merged, PATTERN_TOKENS) - expected).abs().max() < 1e-4, "the learner's logprobs, without PEFT"
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not merged.config.tie_word_embeddings
    # What export is for: PEFT's merge into the tied weight changes the embedding, and so the model.
    naive = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    assert (logprobs(naive, PATTERN_TOKENS) - expected).abs().max() > 1e-2, "rounding alone is ~1e-6"


def test_a_16_bit_export_says_what_its_rounding_costs(tiny_model_dir, trained_run, tmp_path):
    _, adapter, _ = trained_run
    difference, rounded = export(adapter, tmp_path / "bf16", base=tiny_model_dir, dtype="bfloat16")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert saved.dtype == torch.bfloat16 and difference < 1e-4 < rounded
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          adapter)
    probe = AutoTokenizer.from_pretrained(tiny_model_dir)(PROBE)["input_ids"]
    assert float((logprobs(saved.float(), probe) - logprobs(reference, probe)).abs().max()) == pytest.approx(
        rounded, rel=1e-4), "what it reports is what the saved model does"


def test_rl_export_takes_a_runs_best_or_latest_with_its_chat_template(tiny_model_dir, trained_run, tmp_path,
                                                                      capsys):
    run, adapter, expected = trained_run
    main([str(run), str(tmp_path / "best"), "--best"])
    assert f"{adapter} merged into {tiny_model_dir}" in capsys.readouterr().out
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "best", dtype=torch.float32)
    assert (logprobs(best, PATTERN_TOKENS) - expected).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "best").chat_template == CHAT_TEMPLATES["role_colon"]
    main([str(run), str(tmp_path / "latest")])  # the checkpoint state.json names: one more step
    latest = AutoModelForCausalLM.from_pretrained(tmp_path / "latest", dtype=torch.float32)
    assert (logprobs(latest, PATTERN_TOKENS) - expected).abs().max() > 1e-3


def test_what_cannot_be_exported_is_refused_and_nothing_is_written(tiny_model_dir, trained_run, tmp_path, capsys):
    run, adapter, _ = trained_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    other = tmp_path / "other-base"
    build_tiny_model(other, seed=0, intermediate_size=256)
    for argv, message in (([str(run), str(tmp_path / "taken")], "taken exists: give another folder, or --overwrite"),
                          ([str(adapter), str(tmp_path / "out"), "--best"], "is not a run folder"),
                          ([str(adapter), str(tmp_path / "out"), "--base", str(other)], "does not fit the base model"),
                          ([str(tmp_path), str(tmp_path / "out")], "not a PEFT adapter folder"),
                          ([str(adapter), str(tmp_path / "out"), "--base", "nowhere"], "unknown base model 'nowhere'")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other-base", "taken"], "no folder half-written"
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_a_folder_whole(trained_run, tmp_path):
    run, _, expected = trained_run
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("old")
    main([str(run), str(tmp_path / "merged"), "--best", "--overwrite"])
    assert not (tmp_path / "merged" / "old.txt").exists() and [path.name for path in tmp_path.iterdir()] == ["merged"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logprobs(merged, PATTERN_TOKENS) - expected).abs().max() < 1e-4
