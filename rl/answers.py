"""Answers: where a completion's final answer is, and whether it is the reference's.

The tasks score with these (rl.tasks); your own problems pick a format (`data.answer_format`: ANSWER_FORMATS) or a
scorer of your own (`data.reward_fn`: `custom_score`, called as verl calls one).
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import inspect
import math
import multiprocessing
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def final_answer(completion: str) -> str | None:
    """The first line of the text after the last 'Answer:', stripped; None without an 'Answer:'."""
    return _line_after("Answer:", completion)


def gsm8k_answer(text: str) -> str | None:
    """The first line of the text after the last '####' (GSM8K's solutions end '#### 72'); None without one."""
    return _line_after("####", text)


def boxed_answer(text: str) -> str | None:
    """What the last \\boxed{...} (or \\fbox{...}) of the text holds, braces balanced, `latex_normalized`; None
    without one, or where its braces do not close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    if len(rest) < 2 or rest[0] not in ("\\boxed", "\\boxed ", "\\fbox"):
        return None
    depth = 1
    for end, character in enumerate(rest[1]):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if depth == 0:
            return latex_normalized(rest[1][:end]) or None
    return None


def latex_normalized(answer: str) -> str:
    """A LaTeX answer without what does not change its value: spaces, $, \\left and \\right, spacing commands,
    a degree sign, {,} (a thousands comma), \\dfrac and \\tfrac for \\frac, a trailing period."""
    for plain, spelled in ((",", "{,}"), ("", "\\!"), ("", "\\,"), ("", "\\;"), ("", "$"), ("", "^{\\circ}"),
                           ("", "^\\circ"), ("\\frac", "\\dfrac"), ("\\frac", "\\tfrac")):
        answer = answer.replace(spelled, plain)
    return re.sub(r"\\(left|right)(?![A-Za-z])|\s+", "", answer).rstrip(".")


def _line_after(marker: str, text: str) -> str | None:
    if marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip().split("\n")[0].strip()


def strict_answer(completion: str) -> int | None:
    """The integer that starts the text after the last 'Answer:', if any."""
    match = re.match(r"-?\d+", final_answer(completion) or "")
    return int(match.group()) if match else None


def answers_match(given: str, reference: str) -> bool:
    """Whether a final answer is the reference: by value where the reference is a number (the answer must start
    with that number: "12", "12.0", "1,200", "$12" and "12 apples" match 12), else the same text ignoring case and a
    trailing period."""
    number = _number(reference)
    if number is not None:
        match = re.match(r"\$?(-?[\d,]*\.?\d+)", given)
        return match is not None and _number(match.group(1)) == number
    return given.rstrip(".").casefold() == reference.strip().rstrip(".").casefold()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def math_equal(given: str, reference: str) -> bool:
    """Whether two LaTeX answers are the same mathematics, by math-verify (as tinker-cookbook's, verl's and
    open-r1's math rewards): 0.5 and \\frac{1}{2}, x+1 and 1+x, 1,200 and 1200."""
    if threading.current_thread() is not threading.main_thread():
        # math-verify times its sympy work out (9^{9^{9^{9}}} would never end) with SIGALRM, which only a main thread
        # may set: a sweep's runs, which are threads, grade in a process of their own.
        return _grading_process().submit(math_equal, given, reference).result()
    from math_verify import parse, verify

    return verify(parse(f"${reference}$", parsing_timeout=5), parse(f"${given}$", parsing_timeout=5),
                  timeout_seconds=5)


@functools.cache
def _grading_process() -> concurrent.futures.ProcessPoolExecutor:
    # Spawned, not forked: the driver holds Ray's threads and sockets.
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


@dataclass(frozen=True)
class AnswerFormat:
    """How a final answer is found in a text (a completion's, and a reference that is a whole solution), and how it
    is compared with the reference's."""

    find: Callable[[str], str | None]
    """The text's final answer, or None where it gives none."""
    bare: Callable[[str], str]
    """A reference that is an answer alone, as `find` gives answers."""
    match: Callable[[str, str], bool] = answers_match
    """Whether a final answer is the reference's."""


ANSWER_FORMATS = {"answer_line": AnswerFormat(final_answer, str.strip),
                  "boxed": AnswerFormat(boxed_answer, latex_normalized),
                  "math": AnswerFormat(boxed_answer, latex_normalized, math_equal),
                  "gsm8k": AnswerFormat(gsm8k_answer, str.strip)}
"""data.answer_format's choices (RL on your problems, `FileTask`)."""


@functools.cache
def reward_function(spec: str) -> Callable:
    """The function that data.reward_fn names: "path/to/file.py:name" or "package.module:name", loaded once; a
    ValueError says what is missing."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"data.reward_fn={spec}: give it as FILE.py:FUNCTION or MODULE:FUNCTION")
    if where.endswith(".py") and not Path(where).is_file():
        raise ValueError(f"data.reward_fn={spec}: there is no file {where}")
    try:
        module = _module_of_file(where) if where.endswith(".py") else importlib.import_module(where)
    except Exception as error:  # your code: whatever it raises, the configuration names it
        raise ValueError(f"data.reward_fn={spec}: cannot import {where} ({type(error).__name__}: {error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"data.reward_fn={spec}: {where} has no function {name}")
    try:
        inspect.signature(function).bind(data_source=None, solution_str="", ground_truth="", extra_info=None)
    except TypeError as error:
        raise ValueError(f"data.reward_fn={spec}: {name} must take data_source, solution_str, ground_truth and "
                         f"extra_info by name, as verl calls it ({error})") from None
    return function


def _module_of_file(path: str):
    spec = importlib.util.spec_from_file_location(f"rl_reward_fn_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class CustomScore:
    """What data.reward_fn's function said of a completion."""

    score: float
    """The reward."""
    accuracy: float
    """What evaluation reports: the dict's "acc" where it gives one (as verl's math scorers do), else the score."""
    metrics: dict[str, float]
    """The dict's other numbers (verl logs them as reward_extra_info): logged as env/NAME and eval/NAME."""


def custom_score(spec: str, completion: str, reference: str, example: dict | None) -> CustomScore:
    """What data.reward_fn's function scores `completion`, called as verl calls its custom reward function
    (`compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`: `reward_arguments`); it returns a
    number, or a dict whose "score" is one (and whose "acc" and other numbers, if any, `CustomScore` keeps)."""
    return custom_score_of(spec, reward_function(spec)(**reward_arguments(completion, reference, example)))


def reward_arguments(completion: str, reference: str | None, example: dict | None) -> dict:
    """The keywords verl calls a reward function with: data_source and extra_info are the example's fields of those
    names (None where it has none)."""
    given = example or {}
    return {"data_source": given.get("data_source"), "solution_str": completion, "ground_truth": reference,
            "extra_info": given.get("extra_info")}


def custom_score_of(spec: str, returned: object) -> CustomScore:
    """What data.reward_fn's function returned, as a CustomScore: a number, or a dict whose "score" is one (and whose
    "acc" and other numbers, if any, it keeps); anything else is refused naming it."""
    named = returned if isinstance(returned, dict) else {"score": returned}
    numbers = {key: float(value) for key, value in named.items()  # a bool counts: True is 1
               if isinstance(value, int | float) and math.isfinite(value)}
    if "score" not in numbers or "acc" in named and "acc" not in numbers:
        raise ValueError(f"data.reward_fn={spec} returned {returned!r}: a finite number, or a dict whose 'score' (and "
                         f"'acc', if given) is one")
    reward = numbers.pop("score")
    return CustomScore(reward, numbers.pop("acc", reward), numbers)
