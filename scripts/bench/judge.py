"""A judge's pass: the learner's logprobs of every judged sequence, against those of its verdict alone, in one process.

    .venv/bin/python scripts/bench/judge.py [--model SmolLM2-135M-Instruct] [--groups 12] [--group-size 4]
                                            [--repeats 3] [--dtype auto]

The sequences have the shape of an RL step's judged replies at the main job's size (rl/judge.py): per group a
prompt of 48 tokens and `--group-size` replies of 16, each followed by a 32-token question (pointwise), or by one
question per rival quoting that rival's 16 tokens (pairwise: G x (G - 1) sequences, those of one reply sharing its
prompt and reply), then a one-token verdict. `Learner.logprobs` is timed over them with the output layer on every
position (`last=None`, as before 882a759) and on the verdict's alone (`last=1`, what the judge asks for), the two
alternated `--repeats` times; the median of each and their ratio are reported. Random tokens: the time of a pass
does not depend on what the tokens say. The machine is noisy: only the ratio, measured in one invocation, means
anything.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

from rl.learner.learner import Learner
from rl.models import resolve_model
from rl.types import LoraConfig

PROMPT, REPLY, QUESTION = 48, 16, 32


def judged_sequences(groups: int, group_size: int, pairwise: bool, rng: random.Random) -> list[list[int]]:
    def tokens(count: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(count)]

    sequences = []
    for _ in range(groups):
        prompt, replies = tokens(PROMPT), [tokens(REPLY) for _ in range(group_size)]
        for index, reply in enumerate(replies):
            rivals = [other for j, other in enumerate(replies) if j != index] if pairwise else [[]]
            sequences += [prompt + reply + tokens(QUESTION) + other + tokens(1) for other in rivals]
    return sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    learner = Learner(str(resolve_model(args.model)), storage=tempfile.mkdtemp(), dtype=args.dtype)
    model_id = learner.create(learner.base_model, LoraConfig(rank=16, seed=1))
    rng = random.Random(0)
    report = {"model": args.model, "dtype": learner.dtype}
    for pairwise in (False, True):
        sequences = judged_sequences(args.groups, args.group_size, pairwise, rng)
        learner.logprobs(model_id, sequences[:8], last=1)  # warm-up
        seconds: dict[str, list[float]] = {"every position": [], "the verdict alone": []}
        for _ in range(args.repeats):
            for name, last in (("every position", None), ("the verdict alone", 1)):
                started = time.perf_counter()
                learner.logprobs(model_id, sequences, last=last)
                seconds[name].append(time.perf_counter() - started)
        every, verdict = (statistics.median(times) for times in seconds.values())
        report["pairwise" if pairwise else "pointwise"] = {
            "sequences": len(sequences), "tokens": sum(map(len, sequences)), "every position s": round(every, 2),
            "the verdict alone s": round(verdict, 2), "time ratio, verdict alone / every position": round(
                verdict / every, 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
