"""Tasks: where prompts come from and how answers are scored. Offline and deterministic from a seed.

A task hands out `Problem`s (a user message, its reference answer and, where the task has one, a worked
solution) and scores a completion with a reward in [0, 1]. Rewards come from the task's verifier, never from a
model. The same problems feed every algorithm: RL samples and scores them, DPO trains on `preference_pairs`
(a correct and an incorrect answer to one prompt), SFT on `sft_conversations` (the worked solutions). `FileTask`
holds your own problems, read from a file (`data.train`, rl/datasets.py), scored by their reference answers.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from rl.answers import ANSWER_FORMATS, CustomScore, custom_score, final_answer, strict_answer
from rl.config import JUDGE_QUESTION_PAIRWISE_WITH_ANSWER, JUDGE_QUESTION_WITH_ANSWER
from rl.datasets import Messages, PreferencePair, assistant, read_problems, train_and_held_out, user
from rl.judge import judge_question
from rl.reward_workers import TIMED_OUT, RewardWorkers

INSTRUCTION = "Put the final answer after 'Answer:'."


@dataclass(frozen=True)
class Problem:
    prompt: str | Messages = field(hash=False)
    """The user's message, or the conversation the model answers (your own problems may give one: rl.datasets)."""
    answer: str | None
    """The reference answer the verifier compares against; None: your problem gave none (distillation alone:
    `file_task(answers=False)`), and scores 0."""
    solution: str | None = None
    """A worked solution ending in 'Answer: <answer>', for SFT; None where the task has none."""
    entry: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The source data set's own record, for its scorer."""

    @property
    def messages(self) -> Messages:
        """The prompt as messages."""
        return user(self.prompt) if isinstance(self.prompt, str) else self.prompt


class Task(Protocol):
    """Problems and how completions score. A task may also have `metrics(problem, completion) -> dict[str, float]`:
    numbers logged beside the accuracy, as env/NAME in training and eval/NAME in evaluation; and an async
    `score(problem, completion) -> (reward, accuracy, metrics)`, which the RL loop then calls instead of the three
    (`FileTask`'s, whose scorer may run in other processes)."""

    name: str

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> float: ...

    def accuracy(self, problem: Problem, completion: str) -> float:
        """The unshaped score that evaluation reports."""
        ...


_ADDITION_SUMS = [(a, b) for a in range(10) for b in range(10)]
ADDITION_HELD_OUT = sorted(random.Random("addition:held-out").sample(_ADDITION_SUMS, 32))
"""The one-digit sums `Addition` evaluates on and never trains on."""
ADDITION_TRAIN = [pair for pair in _ADDITION_SUMS if pair not in ADDITION_HELD_OUT]


def addition_problem(a: int, b: int) -> Problem:
    """`Addition`'s question about a + b, with its answer and worked solution."""
    return Problem(prompt=f"What is {a} + {b}? {INSTRUCTION}", answer=str(a + b),
                   solution=f"{a} + {b} = {a + b}. Answer: {a + b}")


@dataclass(frozen=True)
class Addition:
    """One-digit addition, scored strictly: the text after the last 'Answer:' must start with the sum.

    `format_reward` (training only) pays part of the reward for the right format ('Answer:' then an integer)
    even when the integer is wrong: with strict scoring alone the base SmolLM2 is almost never right, so groups
    of samples would all score 0 and carry no signal at first.
    """

    name: str = "addition"
    format_reward: float = 0.0

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        """Training problems are drawn (with repeats) from the sums outside `ADDITION_HELD_OUT`; evaluation's
        are those sums themselves, none repeated, in an order `seed` shuffles. There are only 100 one-digit sums:
        drawing each split with its own seed would evaluate on sums the run trained on."""
        rng = random.Random(f"{split}:{seed}")
        if split == "eval":
            if count > len(ADDITION_HELD_OUT):
                raise ValueError(f"task 'addition' holds out {len(ADDITION_HELD_OUT)} sums for evaluation; "
                                 f"{count} held-out prompts asked for (eval_prompts <= {len(ADDITION_HELD_OUT)})")
            pairs = rng.sample(ADDITION_HELD_OUT, count)
        else:
            pairs = [rng.choice(ADDITION_TRAIN) for _ in range(count)]
        return [addition_problem(a, b) for a, b in pairs]

    def reward(self, problem: Problem, completion: str) -> float:
        value = strict_answer(completion)
        if value is None:
            return 0.0
        return 1.0 if str(value) == problem.answer else self.format_reward

    def accuracy(self, problem: Problem, completion: str) -> float:
        """The strict score, without shaping: what evaluation reports."""
        return float(str(strict_answer(completion)) == problem.answer)


ANSWERED_REPLIES = ("{a} + {b} = {stated}\nAnswer: {stated}", "{a} + {b} = {stated}. Answer: {stated}",
                    "Answer: {stated}", "The sum of {a} and {b} is {stated}.\nAnswer: {stated}",
                    "To add them: {a} + {b} = {total}.\nAnswer: {stated}")
"""Replies that `AdditionJudge` shows with the stated answer on an 'Answer:' line: right where it is the sum."""
UNANSWERED_REPLIES = ("{a} + {b} = {stated}", "The answer is {stated}.", "{a} plus {b} equals {stated}.")
"""Replies without an 'Answer:' line: always wrong, as `Addition` scores them."""


def addition_reply(rng: random.Random, a: int, b: int) -> tuple[str, bool]:
    """A reply to `Addition`'s question about a + b, and whether `Addition` scores it right: half are right; the
    others state a wrong sum (off by 1 to 3, or any other up to 18) on an 'Answer:' line, or (three in ten) the sum
    or a wrong one without that line."""
    total = a + b
    near = [value for value in range(total - 3, total + 4) if value >= 0 and value != total]
    wrong = rng.choice(near if rng.random() < 0.5 else [value for value in range(19) if value != total])
    right, answered = rng.random() < 0.5, rng.random() < 0.7
    if right or answered:
        reply, stated = rng.choice(ANSWERED_REPLIES), total if right else wrong
    else:  # the sum without an 'Answer:' line is wrong too
        reply, stated = rng.choice(UNANSWERED_REPLIES), rng.choice([total, wrong])
    reply = reply.format(a=a, b=b, stated=stated, total=total)
    return reply, bool(Addition().accuracy(addition_problem(a, b), reply))


@dataclass(frozen=True)
class AdditionJudge:
    """Judging answers to `Addition`'s questions: a conversation in which the assistant answered one
    (`addition_reply`), then the judge's question quoting the sum (JUDGE_QUESTION_WITH_ANSWER); the right reply is
    "Yes" where `Addition` scores the answer right, else "No". A judge for RL (judge.adapter, rl/judge.py) learns it
    by SFT on its last reply (recipe arithmetic_judge, data.train_on=last). Its sums are `Addition`'s, the same
    held out for evaluation."""

    name: str = "addition_judge"
    format_reward: float = 0.0

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        rng = random.Random(f"{self.name.removeprefix('addition_')}:{split}:{seed}")
        problems = []
        for _ in range(count):
            a, b = rng.choice(ADDITION_HELD_OUT if split == "eval" else ADDITION_TRAIN)
            asked = addition_problem(a, b)
            conversation, verdict = self.judged(rng, asked, a, b)
            problems.append(Problem(prompt=conversation, answer=verdict, solution=verdict))
        return problems

    def judged(self, rng: random.Random, asked: Problem, a: int, b: int) -> tuple[Messages, str]:
        """A reply to `asked`, the judge's question after it, and the verdict."""
        reply, right = addition_reply(rng, a, b)
        question = judge_question(JUDGE_QUESTION_WITH_ANSWER, asked.answer)
        return [*asked.messages, *assistant(reply), *user(question)], "Yes" if right else "No"

    def reward(self, problem: Problem, completion: str) -> float:
        return self.accuracy(problem, completion)

    def accuracy(self, problem: Problem, completion: str) -> float:
        """Whether the reply's first word is the verdict."""
        words = completion.split()
        return float(bool(words) and words[0].strip(".,!:") == problem.answer)


@dataclass(frozen=True)
class AdditionPreference(AdditionJudge):
    """`AdditionJudge` pairwise: the judge's question (JUDGE_QUESTION_PAIRWISE_WITH_ANSWER) also quotes a second
    reply to the same question ({other}), and the verdict is "Yes" only where the assistant's reply is right and the
    other's wrong (half the conversations); "No" where it is wrong and the other right (a quarter), or both are
    right or both wrong (a quarter: it is not better). A pairwise judge for RL (recipe arithmetic_preference): each
    reply is rewarded by how often the judge prefers it to the group's others."""

    name: str = "addition_preference"

    def judged(self, rng: random.Random, asked: Problem, a: int, b: int) -> tuple[Messages, str]:
        better = rng.random() < 0.5
        worse = not better and rng.random() < 0.5
        while True:  # replies drawn until they fit the case drawn
            (reply, right), (other, other_right) = addition_reply(rng, a, b), addition_reply(rng, a, b)
            if (right and not other_right) == better and (other_right and not right) == worse:
                break
        question = judge_question(JUDGE_QUESTION_PAIRWISE_WITH_ANSWER, asked.answer, other)
        return [*asked.messages, *assistant(reply), *user(question)], "Yes" if better else "No"


@dataclass(frozen=True)
class GsmSymbolic:
    """Grade-school word problems (reasoning-gym's gsm_symbolic, GSM8K templates), scored by reasoning-gym.

    The answer is `final_answer`, the first line after the last 'Answer:'; `format_reward` as for `Addition`.
    """

    name: str = "gsm_symbolic"
    format_reward: float = 0.0

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        dataset = _reasoning_gym("gsm_symbolic", count, seed=zlib.crc32(f"{split}:{seed}".encode()))
        return [Problem(prompt=f"{entry['question']} {INSTRUCTION}", answer=entry["answer"],
                        solution=re.sub(r"\n?#### *(\S+)\s*$", r"\nAnswer: \1", entry["metadata"]["answer_cot"]),
                        entry=entry)
                for entry in dataset]

    def reward(self, problem: Problem, completion: str) -> float:
        if self.accuracy(problem, completion):
            return 1.0
        return self.format_reward if strict_answer(completion) is not None else 0.0

    def accuracy(self, problem: Problem, completion: str) -> float:
        answer = final_answer(completion)
        if answer is None:
            return 0.0
        return float(_reasoning_gym("gsm_symbolic", 0, seed=0).score_answer(answer, problem.entry) == 1.0)


@dataclass(frozen=True)
class Digits:
    """Answer with digits: the reward is the share of the completion's visible characters that are digits.

    A task a tiny random model can learn in a few dozen steps (its tokenizer's vocabulary is full of numbers),
    so CI can check that a loop learns at all. Accuracy: every visible character is a digit.
    """

    name: str = "digits"
    format_reward: float = 0.0

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        rng = random.Random(f"{split}:{seed}")
        return [Problem(prompt=f"Write a number like {rng.randrange(10, 1000)}.", answer="") for _ in range(count)]

    def reward(self, problem: Problem, completion: str) -> float:
        visible = [character for character in completion if not character.isspace()]
        return sum(character.isdigit() for character in visible) / len(visible) if visible else 0.0

    def accuracy(self, problem: Problem, completion: str) -> float:
        return float(self.reward(problem, completion) == 1.0)


@dataclass(frozen=True)
class FileTask:
    """Your own problems (`data.train`, `data.eval`: rl.datasets), scored by their reference answers: a completion
    is right when its final answer (found as `answer_format` says: ANSWER_FORMATS) matches the reference's (as that
    format compares them: `answers_match`, or `math_equal`), and earns `format_reward` (training only, as for
    `Addition`) for giving one that is wrong. Ask for the answer's format in your prompts, or in data.instruction."""

    train: tuple[Problem, ...]
    held_out: tuple[Problem, ...]
    name: str = "data"
    format_reward: float = 0.0
    answer_format: str = "answer_line"
    reward_fn: str | None = None
    """data.reward_fn: your function scores each completion instead (`custom_score`): its score is the reward, and
    the accuracy unless it gives one."""
    reward_workers: RewardWorkers | None = field(default=None, compare=False, repr=False)
    """data.reward_workers' processes, which `score` has your function score in; None: it scores in the driver."""

    def problems(self, count: int, *, seed: int, split: str = "train") -> list[Problem]:
        """Training problems drawn (with repeats) by `seed`; evaluation's are the held-out ones, the first `count` of
        each data source (`data_source`)."""
        if split == "eval":
            first, taken = [], Counter()
            for problem in self.held_out:
                if taken[data_source(problem)] < count:
                    first.append(problem)
                    taken[data_source(problem)] += 1
            return first
        rng = random.Random(f"{split}:{seed}")
        return [rng.choice(self.train) for _ in range(count)]

    @functools.cached_property
    def data_sources(self) -> list[str]:
        """The problems' data sources, each once."""
        return sorted({data_source(problem) for problem in self.train + self.held_out})

    def reward(self, problem: Problem, completion: str) -> float:
        return self._scored(problem, completion)[0]

    def accuracy(self, problem: Problem, completion: str) -> float:
        return self._scored(problem, completion)[1]

    def metrics(self, problem: Problem, completion: str) -> dict[str, float]:
        """The other numbers your function gives (data.reward_fn), and where the problems come from several data
        sources, the accuracy again as SOURCE/accuracy."""
        return self._scored(problem, completion)[2]

    async def score(self, problem: Problem, completion: str) -> tuple[float, float, dict[str, float]]:
        """A completion's reward, accuracy and metrics at once (what the RL loop asks): your function is called once,
        in one of data.reward_workers' processes where there are any (then a timeout scores 0, and the metrics say
        so as reward_timeout)."""
        if self.reward_workers is None:
            return self._scored(problem, completion)
        scored = await self.reward_workers.score(completion, problem.answer, problem.entry)
        return scored.score, scored.accuracy, {**self._metrics(problem, scored),
                                               "reward_timeout": float(scored is TIMED_OUT)}

    def _scored(self, problem: Problem, completion: str) -> tuple[float, float, dict[str, float]]:
        if self.reward_fn:
            scored = custom_score(self.reward_fn, completion, problem.answer, problem.entry)
        else:
            found = ANSWER_FORMATS[self.answer_format]
            answer = found.find(completion)
            right = answer is not None and problem.answer is not None and found.match(answer, problem.answer)
            reward = 0.0 if problem.answer is None else 1.0 if right else self.format_reward if answer else 0.0
            scored = CustomScore(reward, float(right), {})
        return scored.score, scored.accuracy, self._metrics(problem, scored)

    def _metrics(self, problem: Problem, scored: CustomScore) -> dict[str, float]:
        metrics = dict(scored.metrics)
        if len(self.data_sources) > 1:
            metrics[f"{data_source(problem)}/accuracy"] = scored.accuracy
        return metrics


def data_source(problem: Problem) -> str:
    """Which data set a problem of your files comes from: its `data_source` field (verl's), "other" without one."""
    source = (problem.entry or {}).get("data_source")
    return source if isinstance(source, str) and source else "other"


def file_task(train: str | None, eval_file: str | None, held_out: int, *, format_reward: float,
              answer_format: str = "answer_line", instruction: str | None = None,
              fields: dict[str, str] | None = None, reward_fn: str | None = None, reward_workers: int = 0,
              reward_timeout: float = 60.0, answers: bool = True) -> FileTask:
    """The problems of `train` (and `eval_file`; else `held_out` of `train`'s held out) as a task, each reference
    answer as `answer_format` finds it where it is a whole solution, `instruction` after each prompt; no `train`:
    held-out problems only (steps=0 evaluates). `fields`: data.fields; `reward_fn`, `reward_workers`,
    `reward_timeout`: data.reward_fn and the processes it scores in. Without `answers` (distillation alone) a
    problem may lack its answer (`read_problems`)."""
    found = ANSWER_FORMATS[answer_format]

    def problem(prompt: str | Messages, reference: str | None, record: dict) -> Problem:
        if instruction:
            prompt = (f"{prompt} {instruction}" if isinstance(prompt, str) else
                      [*prompt[:-1], {**prompt[-1], "content": f"{prompt[-1]['content']} {instruction}"}])
        return Problem(prompt, reference and (found.find(reference) or found.bare(reference)), entry=record)

    train_P, held_out_P = train_and_held_out(functools.partial(read_problems, answers=answers), train, eval_file,
                                             held_out, fields)
    return FileTask(tuple(problem(*example) for example in train_P), tuple(problem(*example) for example in held_out_P),
                    format_reward=format_reward, answer_format=answer_format, reward_fn=reward_fn,
                    reward_workers=RewardWorkers(reward_fn, reward_workers, reward_timeout)
                    if reward_fn and reward_workers else None)


TASKS = {"addition": Addition, "addition_judge": AdditionJudge, "addition_preference": AdditionPreference,
         "gsm_symbolic": GsmSymbolic, "digits": Digits}


def make_task(name: str, *, format_reward: float = 0.0) -> Task:
    """The task called `name`; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    return TASKS[name](format_reward=format_reward)


def checked_problems(task: Task, count: int, *, seed: int, split: str = "train") -> list[Problem]:
    """`task.problems(...)`, refusing an empty answer: a loop cannot train or evaluate on no prompts."""
    problems = task.problems(count, seed=seed, split=split)
    if not problems:
        raise ValueError(f"task {task.name!r} gave no prompts (asked for {count} from split {split!r}, seed {seed})")
    return problems


def preference_pairs(task: Task, count: int, *, seed: int, split: str = "train") -> list[PreferencePair]:
    """A correct and an incorrect final answer to each of `count` problems (the wrong one off by 1 to 3)."""
    rng = random.Random(f"pairs:{split}:{seed}")
    pairs = []
    for problem in checked_problems(task, count, seed=seed, split=split):
        if not re.fullmatch(r"-?\d+", problem.answer):
            raise ValueError(f"task {task.name!r} has no integer reference answers to build preference pairs from")
        wrong = int(problem.answer) + rng.choice([-3, -2, -1, 1, 2, 3])
        pairs.append(PreferencePair(problem.messages, assistant(f"Answer: {problem.answer}"),
                                    assistant(f"Answer: {wrong}")))
    return pairs


def sft_conversations(task: Task, count: int, *, seed: int, split: str = "train") -> list[Messages]:
    """User prompt and the task's worked solution as the assistant's reply, for `count` problems."""
    conversations = []
    for problem in checked_problems(task, count, seed=seed, split=split):
        if problem.solution is None:
            raise ValueError(f"task {task.name!r} has no worked solutions to fine-tune on")
        conversations.append(problem.messages + assistant(problem.solution))
    return conversations


def _reasoning_gym(name: str, size: int, *, seed: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=max(size, 1), seed=seed)
