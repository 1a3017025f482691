"""Your own RL problems, SFT conversations and DPO preference pairs, from files (`data.train`, `data.eval`).

A file is JSONL (one example per line), JSON (a list of examples), Parquet (one per row: the HF hub's format) or
Arrow (what `datasets`' save_to_disk writes; both read with pyarrow); or a folder or a pattern of such files. Each
example is an object with these fields (for SFT and DPO the formats TRL and the hub use, standard and
conversational):
- RL: a problem, {"prompt": ..., "answer": "..."}: the prompt a string (the user's message) or a list of messages
  (a system prompt, examples: the conversation the model answers), and the reference answer, which a completion's
  final answer must match (rl.tasks.FileTask; `data.answer_format` says how a final answer is found). Distillation
  alone (`algo.reward_coef=0` with a teacher) trains on no reward: its problems may lack the answer.
- SFT: a conversation, {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} with at
  least one assistant turn (each assistant turn is trained, rl.chat.conversation_datum), or
  {"prompt": "...", "completion": "..."} (one user message and the assistant's reply).
- DPO: a preference pair, {"prompt": ..., "chosen": ..., "rejected": ...}: the prompt a string (the user's
  message) or a list of messages; chosen and rejected each a string (the assistant's reply) or a list of
  messages that follow the prompt. Or, without a prompt, chosen and rejected as two whole conversations that
  share their start (TRL's implicit prompt): the prompt is what they share up to the last user message. Only the
  reply's tokens count (the dpo loss compares them).

A file whose fields have other names is read as it is with `data.fields` (`{prompt: question}`; a dotted name
reaches into a nested object: `{answer: reward_model.ground_truth}`); other fields are ignored. Every example is
checked before any actor starts; a bad one is refused with its file, line (JSONL), element (JSON) or row (Parquet,
Arrow) and field. Without `data.eval`, the held-out examples are `eval_prompts` of the training file's, drawn by a
fixed seed (the same for every run and seed, so runs compare on the same ones), and the rest are trained on.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
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
    """An example of a data file that is not of the format asked for."""


PROBLEM_FIELDS = ("prompt", "answer")
CONVERSATION_FIELDS = ("messages", "prompt", "completion")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
FILE_TYPES = (".jsonl", ".json", ".parquet", ".arrow")


def read_problems(path: str | Path, *, key: str = "data.train", fields: dict[str, str] | None = None,
                  answers: bool = True) -> list[tuple[str | Messages, str | None, dict]]:
    """The RL problems of a file, as (prompt, reference answer, the example's whole record, for a scorer of your
    own: data.reward_fn) (the module's docstring has the formats); `key` names the setting that gave the path, in
    errors; `fields` renames the format's fields (`data.fields`). Without `answers` (distillation alone, which
    trains on no reward) a problem may lack its answer: None."""
    parse = _problem if answers else partial(_problem, answer_required=False)
    return _read(path, key, fields, PROBLEM_FIELDS, parse, 'a problem: {"prompt": ..., "answer": ...}')


def read_conversations(path: str | Path, *, key: str = "data.train",
                       fields: dict[str, str] | None = None) -> list[Messages]:
    """The SFT conversations of a file (the module's docstring has the formats)."""
    return _read(path, key, fields, CONVERSATION_FIELDS, _conversation,
                 'a conversation: {"messages": [...]} or {"prompt": ..., "completion": ...}')


def read_preference_pairs(path: str | Path, *, key: str = "data.train",
                          fields: dict[str, str] | None = None) -> list[PreferencePair]:
    """The DPO preference pairs of a file (the module's docstring has the formats)."""
    return _read(path, key, fields, PAIR_FIELDS, _pair, 'a preference pair: {"prompt": ..., "chosen": ..., '
                 '"rejected": ...} or {"chosen": [...], "rejected": [...]}')


def held_out_split(examples: list, count: int, *, key: str = "data.train") -> tuple[list, list]:
    """(training, held-out) examples: `count` of `examples` held out, drawn by a fixed seed, the rest in their order."""
    if count >= len(examples):
        raise ValueError(f"{key}: {len(examples)} examples cannot spare eval_prompts={count} for held-out evaluation "
                         "and keep some to train on; give held-out examples in data.eval, or lower eval_prompts")
    held = set(random.Random("held-out").sample(range(len(examples)), count))
    return ([example for index, example in enumerate(examples) if index not in held],
            [examples[index] for index in sorted(held)])


def data_files(path: str | Path, *, key: str = "data.train") -> list[Path]:
    """The files that `path` names: a file; a folder's .jsonl, .json and .parquet files, or its .arrow files where
    it has some (what `datasets`' save_to_disk writes); or the files a pattern matches (`data/train-*.parquet`, as
    the HF hub shards a data set), in name order. A ValueError says what is wrong, naming `key`."""
    path = str(path)
    if glob.has_magic(path):
        files = sorted(Path(match) for match in glob.glob(path, recursive=True) if Path(match).is_file())
        if not files:
            raise ValueError(f"{key}={path}: no file matches")
    elif Path(path).is_dir():
        files = sorted(file for file in Path(path).iterdir() if file.suffix.lower() in FILE_TYPES)
        if any(file.suffix == ".arrow" for file in files):  # `datasets`' save_to_disk: its .json files describe
            files = [file for file in files if file.suffix == ".arrow"]
        if not files:
            raise ValueError(f"{key}={path}: the folder holds no {', '.join(FILE_TYPES)} file")
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise ValueError(f"{key}={path}: no such file")
    for file in files:
        if file.suffix.lower() not in FILE_TYPES:
            raise ValueError(f"{key}={path}: {file} is not a {', '.join(FILE_TYPES)} file")
    return files


def _read(path: str | Path, key: str, fields: dict[str, str] | None, names: tuple[str, ...], parse,
          what: str) -> list:
    files = data_files(path, key=key)
    unknown = sorted(set(fields or {}) - set(names))
    if unknown:
        raise ValueError(f"data.fields: {', '.join(unknown)} is not a field of {what.split(':')[0]} (its fields: "
                         f"{', '.join(names)})")
    examples = []
    records = (record for file in files for record in _records(file, f"{key}={file}"))
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected {what}, got {type(record).__name__}")
        try:
            examples.append(parse(_renamed(record, fields or {})))
        except BadExample as error:
            raise ValueError(f"{where}: {error}") from None
    if not examples:
        raise ValueError(f"{key}={path}: the file holds no examples ({what})")
    return examples


def _records(file: Path, name: str) -> Iterator[tuple[str, object]]:
    """Each record of a file with where it is (`name`, the setting that gave the file, then the line, element or
    row), in errors too: a JSONL file's lines (blank ones skipped; counted from 1, as editors do), a JSON file's
    list, a Parquet or Arrow (stream) file's rows (both counted from 0, as Python, pandas and HF datasets do)."""
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        import pyarrow.ipc  # only for these files
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(file) if suffix == ".parquet" else pyarrow.ipc.open_stream(file).read_all()
        yield from ((f"{name}, row {index}", row) for index, row in enumerate(table.to_pylist()))
        return
    if suffix == ".json":
        try:
            records = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: not JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{name}: a .json file must hold a list of examples (one per line: .jsonl), not a "
                             f"{type(records).__name__}")
        yield from ((f"{name}, element {index}", record) for index, record in enumerate(records))
        return
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}, line {number}: not JSON ({error.msg} at column {error.colno})") from None
            yield f"{name}, line {number}", record


def _renamed(record: dict, fields: dict[str, str]) -> dict:
    """The record with each field that `fields` renames taken from where it names (a dotted name reaches into
    nested objects: "reward_model.ground_truth")."""
    renamed = dict(record)
    for name, source in fields.items():
        value = record
        for part in source.split("."):
            if not isinstance(value, dict) or part not in value:
                has = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise BadExample(f"no {source!r} for {name!r} (data.fields.{name}; it has {has})")
            value = value[part]
        renamed[name] = value
    return renamed


def _problem(record: dict, *, answer_required: bool = True) -> tuple[str | Messages, str | None, dict]:
    missing = [field for field in PROBLEM_FIELDS if field not in record and (answer_required or field != "answer")]
    if missing:
        raise BadExample(f"no {', '.join(repr(field) for field in missing)} (it has {sorted(record)})")
    prompt, answer = record["prompt"], record.get("answer")
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt")
        if prompt[-1]["role"] != "user":
            raise BadExample(f'"prompt" must end with a user message (the one the model answers), not a '
                             f'{prompt[-1]["role"]} one')
    elif not isinstance(prompt, str) or not prompt.strip():
        raise BadExample(f'"prompt" must be a non-empty string (the user\'s message) or a list of messages, not '
                         f"{json.dumps(prompt)[:80]}")
    if answer is None and not answer_required:
        return prompt, None, record
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise BadExample(f'"answer" must be a non-empty string or a number, not {json.dumps(answer)[:80]}')
    return prompt, str(answer).strip(), record


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
    missing = [field for field in PAIR_FIELDS if field not in record]
    if missing == ["prompt"] and all(isinstance(record[field], list) for field in ("chosen", "rejected")):
        return _implicit_prompt_pair(*(_messages(record[field], field) for field in ("chosen", "rejected")))
    if missing:
        raise BadExample(f"no {', '.join(repr(field) for field in missing)} (it has {sorted(record)})")
    prompt = _turn(record["prompt"], "prompt", "user")
    chosen, rejected = (_turn(record[field], field, "assistant") for field in ("chosen", "rejected"))
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[-1]["role"] != "assistant":
            raise BadExample(f'"{field}" must end with an assistant message, not a {reply[-1]["role"]} one')
    return PreferencePair(prompt, chosen, rejected)


def _implicit_prompt_pair(chosen: Messages, rejected: Messages) -> PreferencePair:
    """Two whole conversations (TRL's "implicit prompt" pairs): the prompt is the messages they share up to the
    last user message before they differ."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    users = [index for index in range(shared) if chosen[index]["role"] == "user"]
    if not users:
        raise BadExample('"chosen" and "rejected" without a "prompt" must both start with the same conversation, up '
                         "to a user message (the prompt), and differ after it")
    prompt = users[-1] + 1
    for field, reply in (("chosen", chosen[prompt:]), ("rejected", rejected[prompt:])):
        if not reply or reply[-1]["role"] != "assistant":
            raise BadExample(f'"{field}" must end with an assistant message after the shared prompt')
    return PreferencePair(chosen[:prompt], chosen[prompt:], rejected[prompt:])


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


def train_and_held_out(read, train: str | None, eval_file: str | None, held_out: int,
                       fields: dict[str, str] | None = None) -> tuple[list, list]:
    """The examples of file `train` to train on, and the held-out ones: file `eval_file`'s, else `held_out` of
    `train`'s (`held_out_split`); says how many of each, from where. No `train`: nothing to train on (steps=0
    evaluates). `read`: read_problems, read_conversations or read_preference_pairs; `fields`: data.fields."""
    examples = read(train, key="data.train", fields=fields) if train is not None else []
    if eval_file is not None:
        split = examples, read(eval_file, key="data.eval", fields=fields)
    else:
        split = held_out_split(examples, held_out)
    source = f"from {eval_file}" if eval_file is not None else "of its own"
    print(f"data: {len(split[0])} examples to train on{f' from {train}' if train else ''}, {len(split[1])} held out "
          f"{source}", flush=True)
    return split
