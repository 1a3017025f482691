"""`rl-export`: a LoRA adapter merged into its base model, a plain Hugging Face model folder that transformers,
vLLM and any other tool load without PEFT or rl.

    rl-export outputs/arithmetic_rl/DATE_TIME smollm2-addition           # the run's latest checkpoint
    rl-export outputs/arithmetic_rl/DATE_TIME smollm2-addition --best    # the weights that scored best held out
    rl-export path/to/peft_adapter_folder merged --base path/to/base_model

Why not PEFT's merge_and_unload alone: SmolLM2, like most small models, ties its output layer to its input
embedding, and rl's LoRA adapts the output layer (as Tinker's does by default); merged into the tied weight, the
update changes the input embedding too, and the merged model is another model (on the tiny test model its logprobs
were 0.05-1.5 nats off, against ~1e-6 for a correct merge). So the export unties them first, merges in float32,
checks that the merged model gives the adapter's own logprobs (unmerged, through PEFT) on a probe, and only then
saves, with its tokenizer and the run's chat template (model.chat_template), into a folder written whole or not at
all. In float32 by default: in bfloat16, W0 + BA is rounded to W0's 8 bits of precision where BA is small against
it, and part of the update goes (on the main job's adapter, logprobs moved 0.09 nats a token on average, against
1e-5 in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from rl.chat import with_chat_template
from rl.driver.state import adapter_folder, checkpoint_folder, read_state
from rl.models import resolve_model
from rl.weights import ADAPTER_CONFIG

PROBE = "What is 1 + 7? Answer: 8. The quick brown fox jumps over the lazy dog."
"""Text whose tokens the merged model must score as the adapter does."""
TOLERANCE = 1e-3
"""Largest difference allowed between the merged model's and the adapter's logprobs of the probe, both float32 (a
correct merge differs by rounding, ~1e-6; a tied output layer merged into the embedding, by 0.1-1.5)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source(path: str, *, best: bool = False) -> tuple[Path, dict | None]:
    """The adapter folder that `path` names (a PEFT adapter folder, or a run folder: its latest checkpoint, or with
    `best` the weights it kept as its best held-out), and the run's configuration where it is a run folder."""
    folder = Path(path)
    state = read_state(folder) if folder.is_dir() else None
    config_file = folder / "config.json"
    run_config = json.loads(config_file.read_text()) if state is not None and config_file.is_file() else None
    if not best:
        return adapter_folder(path), run_config
    if state is None:
        raise ValueError(f"--best: {path} is not a run folder (it has no state.json)")
    if not state.get("best"):
        raise ValueError(f"--best: the run in {path} kept no best weights (it evaluated nothing, or not yet)")
    return checkpoint_folder(folder, state["best"]["checkpoint"]), run_config


def base_model(adapter: Path, run_config: dict | None, base: str | None) -> Path:
    """The base model's folder: `base` where given, else the run's model.name, else the adapter's
    base_model_name_or_path (a name rl knows, or a model folder: rl.models.resolve_model)."""
    name = base or (run_config or {}).get("model", {}).get("name") or json.loads(
        (adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    try:
        return resolve_model(str(name))
    except ValueError as error:
        raise ValueError(f"{error}: give the base model as --base FOLDER") from None


def export(adapter: Path, out: Path, *, base: Path, dtype: str = "float32", chat_template: str | None = None,
           overwrite: bool = False) -> tuple[float, float]:
    """Merges `adapter` into `base` and saves the merged model in `dtype` with its tokenizer in `out`; returns the
    largest difference between the adapter's logprobs of PROBE and the merged model's, in float32 and as saved (a
    16-bit dtype rounds away part of the update: W0 + BA is rounded where BA alone is not). A ValueError (and no
    `out`) where the adapter does not fit the base, the merge does not reproduce it, or `out` exists (unless
    `overwrite`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: give another folder, or --overwrite")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if chat_template is not None or tokenizer.chat_template:
        tokenizer = with_chat_template(tokenizer, chat_template, model=str(base))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("target_modules") or []
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if "lm_head" in targets and output.weight.data_ptr() == embedding.weight.data_ptr():
        output.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False
    try:
        adapted = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or modules of another model
        raise ValueError(f"{adapter} does not fit the base model {base}: {str(error).splitlines()[0]}") from None
    probe = torch.tensor([tokenizer(PROBE)["input_ids"]])
    expected = _logprobs(adapted, probe)
    merged = adapted.merge_and_unload()
    difference = float((_logprobs(merged, probe) - expected).abs().max())
    if not difference <= TOLERANCE:
        raise ValueError(f"the merged model's logprobs differ from the adapter's by {difference:.3g} (at most "
                         f"{TOLERANCE} expected): not saved")
    for parameter in merged.parameters():  # rounded as saved (buffers such as rotary frequencies are not saved)
        parameter.data = parameter.data.to(DTYPES[dtype]).float()
    rounded = float((_logprobs(merged, probe) - expected).abs().max())
    staging, replaced = (out.parent / f".{out.name}.{what}-{os.getpid()}" for what in ("tmp", "replaced"))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.to(DTYPES[dtype]).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():  # moved aside, not removed, until its successor is in place
            out.rename(replaced)
        staging.rename(out)
    except BaseException:
        if replaced.exists() and not out.exists():
            replaced.rename(out)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return difference, rounded


def _logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    """Each next token's logprob under `model`."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[0, 1:, None])[:, 0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="a run folder (its latest checkpoint) or a PEFT adapter folder")
    parser.add_argument("out", type=Path, help="the folder to write the merged model to")
    parser.add_argument("--best", action="store_true", help="a run's kept best weights instead of its latest")
    parser.add_argument("--base", help="the base model's folder (default: the run's model.name, else the adapter's "
                                       "base_model_name_or_path)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the saved weights' dtype (default float32: bfloat16 halves the folder but rounds away "
                             "part of the update, which the command then reports)")
    parser.add_argument("--chat-template", help="plain, role_colon or a Jinja file (default: the run's "
                                                "model.chat_template, else the tokenizer's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace `out` if it exists")
    args = parser.parse_args(argv)
    try:
        adapter, run_config = source(args.adapter, best=args.best)
        base = base_model(adapter, run_config, args.base)
        template = args.chat_template or (run_config or {}).get("model", {}).get("chat_template")
        difference, rounded = export(adapter, args.out, base=base, dtype=args.dtype, chat_template=template,
                                     overwrite=args.overwrite)
    except ValueError as error:
        parser.exit(2, f"rl-export: {error}\n")
    saved = f", {rounded:.2g} once saved in {args.dtype}" if args.dtype != "float32" else ""
    print(f"{args.out}: {adapter} merged into {base}, in {args.dtype} (a probe's logprobs within {difference:.2g} of "
          f"the adapter's{saved}); load it as any HF model folder: AutoModelForCausalLM.from_pretrained, "
          "vllm.LLM(model=...)")
