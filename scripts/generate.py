"""Prepare a base model and let vLLM answer one-digit additions: a first real job on a fresh machine.

    .venv/bin/python scripts/generate.py [--model SmolLM2-135M-Instruct] [--prompts 16] [--temperature 0]

Prints a few answers and the strict accuracy (the text after the last 'Answer:' starts with the right
integer). The base SmolLM2 scores near zero: that is the gap the RL recipe closes.
"""

from __future__ import annotations

import argparse
import time

from rl.engine import start_vllm_engine
from rl.models import resolve_model
from rl.tasks import Addition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from vllm import SamplingParams

    folder = resolve_model(args.model)
    started = time.perf_counter()
    llm = start_vllm_engine(folder, max_model_len=512)
    print(f"vLLM engine up in {time.perf_counter() - started:.1f} s on {folder}")
    tokenizer = llm.get_tokenizer()
    task = Addition()
    problems = task.problems(args.prompts, seed=0, split="eval")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                             add_generation_prompt=True) for problem in problems]
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                                   seed=0))
    seconds = time.perf_counter() - started
    texts = [output.outputs[0].text for output in outputs]
    scores = [task.accuracy(problem, text) for problem, text in zip(problems, texts, strict=True)]
    for problem, text in list(zip(problems, texts, strict=True))[:4]:
        print(f"  {problem.prompt.split('?')[0]}? -> {text.strip()!r}")
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"strict accuracy {sum(scores) / len(scores):.3f} on {len(scores)} prompts; "
          f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)")


if __name__ == "__main__":
    main()
