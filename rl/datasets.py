"""Your own examples from JSONL files, for the RL, SFT and DPO loops (`data.train`, `data.eval`).

One example per line (for SFT and DPO in the formats TRL and the HF hub use, standard and conversational):
- RL: a problem, {"prompt": ..., "answer": "..."}: the prompt a string (the user's message) or a list of messages
  (a system prompt, examples: the conversation the model answers), and the reference answer, which the final
  answer of a completion (the first line after its last "Answer:") must match (rl.tasks.FileTask).
- SFT: a conversation, {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} with at
  least one assistant turn (each assistant turn is trained, rl.chat.conversation_datum), or
  {"prompt": "...", "completion": "..."} (one user message and the assistant's reply).
- DPO: a preference pair, {"prompt": ..., "chosen": ..., "rejected": ...}: the prompt a string (the user's
  message) or a list of messages; chosen and rejected each a string (the assistant's reply) or a list of
  messages that follow the prompt. Only the reply's tokens count (the dpo loss compares them).

Every line is checked before any actor starts; a bad one is refused with its file, line and field. Without
`data.eval`, the held-out examples are `eval_prompts` of the training file's, drawn by a fixed seed (the same for
every run and seed, so runs compare on the same ones), and the rest are trained on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages
    """The conversation before the reply: the user's message, or several turns."""
    chosen: Messages
    """The preferred reply: the assistant's message(s) after the prompt."""
    rejected: Messages
    """The other reply."""


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


class BadExample(ValueError):
    """A line of a data file that is not an example of the format asked for."""


def read_problems(path: str | Path, *, key: str = "data.train") -> list[tuple[str | Messages, str]]:
    """The RL problems of a JSONL file, as (prompt, reference answer) (the module's docstring has the format)."""
    return _read(path, key, _problem, 'a problem: {"prompt": ..., "answer": ...}')


def read_conversations(path: str | Path, *, key: str = "data.train") -> list[Messages]:
    """The SFT conversations of a JSONL file (the module's docstring has the format); `key` names the setting
    that gave the path, in errors."""
    return _read(path, key, _conversation, 'a conversation: {"messages": [...]} or {"prompt": ..., "completion": ...}')


def read_preference_pairs(path: str | Path, *, key: str = "data.train") -> list[PreferencePair]:
    """The DPO preference pairs of a JSONL file (the module's docstring has the format)."""
    return _read(path, key, _pair, 'a preference pair: {"prompt": ..., "chosen": ..., "rejected": ...}')


def held_out_split(examples: list, count: int, *, key: str = "data.train") -> tuple[list, list]:
    """(training, held-out) examples: `count` of `examples` held out, drawn by a fixed seed, the rest in their order."""
    if count >= len(examples):
        raise ValueError(f"{key}: {len(examples)} examples cannot spare eval_prompts={count} for held-out evaluation "
                         "and keep some to train on; give held-out examples in data.eval, or lower eval_prompts")
    held = set(random.Random("held-out").sample(range(len(examples)), count))
    return ([example for index, example in enumerate(examples) if index not in held],
            [examples[index] for index in sorted(held)])


def _read(path: str | Path, key: str, parse, what: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{key}={path}: no such file")
    examples = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{key}={path}, line {number}"
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected {what}, got {type(record).__name__}")
            try:
                examples.append(parse(record))
            except BadExample as error:
                raise ValueError(f"{where}: {error}") from None
    if not examples:
        raise ValueError(f"{key}={path}: the file holds no examples (one JSON object per line: {what})")
    return examples


def _problem(record: dict) -> tuple[str | Messages, str]:
    missing = [field for field in ("prompt", "answer") if field not in record]
    if missing:
        raise BadExample(f"no {', '.join(repr(field) for field in missing)} (it has {sorted(record)})")
    prompt, answer = record["prompt"], record["answer"]
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
        if prompt[-1]["role"] != "user":
            raise BadExample(f'"prompt" must end with a user message (the one the model answers), not a '
                             f'{prompt[-1]["role"]} one')
    elif not isinstance(prompt, str) or not prompt.strip():
        raise BadExample(f'"prompt" must be a non-empty string (the user\'s message) or a list of messages, not '
                         f"{json.dumps(prompt)[:80]}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise BadExample(f'"answer" must be a non-empty string or a number, not {json.dumps(answer)[:80]}')
    return prompt, str(answer).strip()


def _conversation(record: dict) -> Messages:
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    elif "prompt" in record and "completion" in record:
        messages = _turn(record["prompt"], "prompt", "user") + _turn(record["completion"], "completion", "assistant")
    else:
        raise BadExample(f'expected "messages", or "prompt" and "completion"; it has {sorted(record)}')
    if not any(message["role"] == "assistant" for message in messages):
        raise BadExample("no assistant turn to train on")
    return messages


def _pair(record: dict) -> PreferencePair:
    missing = [field for field in ("prompt", "chosen", "rejected") if field not in record]
    if missing:
        raise BadExample(f"no {', '.join(repr(field) for field in missing)} (it has {sorted(record)})")
    prompt = _turn(record["prompt"], "prompt", "user")
    chosen, rejected = (_turn(record[field], field, "assistant") for field in ("chosen", "rejected"))
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[-1]["role"] != "assistant":
            raise BadExample(f'"{field}" must end with an assistant message, not a {reply[-1]["role"]} one')
    return PreferencePair(prompt, chosen, rejected)


def _turn(value, field: str, role: str) -> Messages:
    """A string as one message in `role`, or a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, field)


def _messages(value, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise BadExample(f'"{field}" must be a string or a non-empty list of messages, not {json.dumps(value)[:80]}')
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):
            raise BadExample(f'"{field}"[{index}] must be {{"role": one of {", ".join(ROLES)}, "content": a string}}, '
                             f"not {json.dumps(message)[:80]}")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def train_and_held_out(read, train: str | None, eval_file: str | None, held_out: int) -> tuple[list, list]:
    """The examples of file `train` to train on, and the held-out ones: file `eval_file`'s, else `held_out` of
    `train`'s (`held_out_split`); says how many of each, from where. No `train`: nothing to train on (steps=0
    evaluates). `read`: read_problems, read_conversations or read_preference_pairs."""
    examples = read(train, key="data.train") if train is not None else []
    if eval_file is not None:
        split = examples, read(eval_file, key="data.eval")
    else:
        split = held_out_split(examples, held_out)
    source = f"from {eval_file}" if eval_file is not None else "of its own"
    print(f"data: {len(split[0])} examples to train on{f' from {train}' if train else ''}, {len(split[1])} held out "
          f"{source}", flush=True)
    return split
