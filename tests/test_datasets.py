"""Your own RL problems, SFT conversations and DPO pairs from JSONL, JSON and Parquet files (rl/datasets.py): read
exactly (other field names through data.fields), refused by file, line and field, scored by their reference answers
in each answer format (RL), and trained on by the loops (tiny model, real learner; SFT and DPO then start no
sampler); and a run that starts from another run's adapter (model.adapter)."""

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from test_rl_loop import samples, tiny_config
from transformers import AutoTokenizer

from rl.answers import answers_match, boxed_answer, gsm8k_answer, latex_normalized, math_equal, reward_function
from rl.config import AlgoConfig, DataConfig, EnvConfig, JudgeConfig, ModelConfig, TaskConfig, TrainConfig, check
from rl.datasets import (
    PreferencePair,
    data_files,
    held_out_split,
    read_conversations,
    read_preference_pairs,
    read_problems,
)
from rl.driver import dpo, sft
from rl.driver import rl as rl_loop
from rl.driver.run import Shared, supervised_examples
from rl.driver.state import adapter_folder
from rl.tasks import Addition, Digits, FileTask, file_task, sft_conversations
from rl.train import source_of

SYSTEM = {"role": "system", "content": "You add numbers."}


def write_jsonl(path, records) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in records))
    return str(path)


def pairs_of(problems: list[tuple]) -> list[tuple]:
    """(prompt, answer) of each problem read, without its record."""
    return [(prompt, answer) for prompt, answer, _ in problems]


def sums(count: int) -> list[tuple[int, int]]:
    return [(index % 10, (3 * index + 1) % 10) for index in range(count)]


def test_problems_are_read_and_scored_by_their_final_answer(tmp_path):
    file = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "What is 6 * 7? Put the final answer after 'Answer:'.",
                                                "answer": 42}, {"prompt": "The capital of France?", "answer": "Paris"}])
    assert pairs_of(read_problems(file)) == [("What is 6 * 7? Put the final answer after 'Answer:'.", "42"),
                                             ("The capital of France?", "Paris")]
    number, text = file_task(file, None, 0, format_reward=0.2).train
    assert number.answer == "42" and text.answer == "Paris"
    task = file_task(file, None, 0, format_reward=0.2)
    for right in ("6 * 7 = 42\nAnswer: 42", "Answer: 42.0", "Answer:$42", "Answer: 42 apples\nmore talk",
                  "Answer:\n42", "Answer: 7\nno, Answer: 42"):  # the first line after the last 'Answer:'
        assert task.reward(number, right) == 1.0 and task.accuracy(number, right) == 1.0, right
    for wrong in ("Answer: 41", "Answer: 420", "Answer: forty-two"):
        assert task.reward(number, wrong) == 0.2 and task.accuracy(number, wrong) == 0.0, wrong
    for unanswered in ("42", "Answer:", "Answer:  \n"):
        assert task.reward(number, unanswered) == 0.0, unanswered
    assert task.accuracy(text, "Answer: paris.") == 1.0 and task.accuracy(text, "Answer: Lyon") == 0.0
    assert answers_match("1,200 dollars", "1200") and answers_match("-3.50", "-3.5") and not answers_match("3", "-3")


def test_a_problems_prompt_may_be_a_conversation_with_a_system_prompt(tiny_model_dir, tmp_path):
    from rl.env import TaskEnv

    messages = [{"role": "system", "content": "You add."}, {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "Answer: 2"}, {"role": "user", "content": "2 + 3?"}]
    file = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": messages, "answer": 5}, {"prompt": "4 + 4?", "answer": 8}])
    conversation, plain = file_task(file, None, 0, format_reward=0.0).train
    assert conversation.prompt == messages and conversation.answer == "5" and plain.messages == [
        {"role": "user", "content": "4 + 4?"}]
    assert len({conversation, plain}) == 2, "problems stay hashable"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, _ = asyncio.run(TaskEnv(Addition(), conversation, tokenizer).initial_observation())
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert "You add." in tokenizer.decode(prompt), "the system prompt reaches the model"


def test_held_out_problems_are_evaluation_s_and_never_trained_on(tmp_path):
    file = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a} + {b}?", "answer": a + b} for a, b in sums(10)])
    task = file_task(file, None, 3, format_reward=0.0)
    assert len(task.train) == 7 and task.problems(3, seed=5, split="eval") == list(task.held_out)
    assert task.problems(2, seed=5, split="eval") == list(task.held_out[:2])
    drawn = task.problems(50, seed=1)
    assert set(drawn) <= set(task.train) and drawn == task.problems(50, seed=1) != task.problems(50, seed=2)
    given = file_task(file, file, 3, format_reward=0.0)
    assert len(given.train) == len(given.held_out) == 10, "data.eval's problems held out: the file whole"


def test_rl_train_hands_the_rl_loop_your_problems_and_sft_and_dpo_the_task_they_ignore(tiny_model_dir, tmp_path):
    file = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"{a} + {b}?", "answer": a + b} for a, b in sums(10)])
    config = TrainConfig(eval_prompts=4, data=DataConfig(train=file), task=TaskConfig(format_reward=0.3),
                         model=ModelConfig(name=str(tiny_model_dir), max_model_len=24))
    task = source_of(config)
    assert isinstance(task, FileTask) and (len(task.train), len(task.held_out), task.format_reward) == (6, 4, 0.3)
    unevaluated = source_of(replace(config, eval_every=0))
    assert (len(unevaluated.train), len(unevaluated.held_out)) == (10, 0), "nothing held out when nothing evaluates"
    boxed = source_of(replace(config, data=DataConfig(train=write_jsonl(tmp_path / "box.jsonl", [
        {"q": f"{a} + {b}?", "answer": rf"\boxed{{{a + b}}}"} for a, b in sums(10)]), fields={"prompt": "q"},
        answer_format="boxed", instruction="Box it.")))
    assert boxed.answer_format == "boxed" and all(p.prompt.endswith("? Box it.") and p.answer.isdigit()
                                                  for p in boxed.train + boxed.held_out)
    sft_loop = replace(config, algo=AlgoConfig(loop="sft", loss_fn="cross_entropy"))
    assert isinstance(source_of(sft_loop), Addition), "the SFT and DPO loops read data.train themselves"
    # Rewards from a judge that does not quote the answer need none: prompts alone (a DPO file's, say) will do.
    prompts = replace(config, eval_every=0, data=DataConfig(train=write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"{a} + {b}?", "chosen": "yes", "rejected": "no"} for a, b in sums(10)])))
    with pytest.raises(ValueError, match=r"no 'answer' \(it has \['chosen', 'prompt', 'rejected'\]\)"):
        source_of(prompts)
    judged = source_of(replace(prompts, judge=JudgeConfig(adapter="base", question="Better than {other}?")))
    assert [problem.answer for problem in judged.train] == [None] * 10
    with pytest.raises(ValueError, match=r"no 'answer'"):
        source_of(replace(prompts, judge=JudgeConfig(adapter="base", question="Is it {answer}?")))
    with pytest.raises(ValueError, match=r"data.train: 4 of the held-out problems have no \"answer\", which "
                                         r"held-out accuracy needs"):
        source_of(replace(prompts, eval_every=5, judge=JudgeConfig(adapter="base")))
    # A pairwise judge measures held-out prompts without answers (eval/win_rate); with some answers, all need one.
    pairwise = JudgeConfig(adapter="base", question="Better than {other}?")
    held_out = source_of(replace(prompts, eval_every=5, judge=pairwise))
    assert (len(held_out.train), [problem.answer for problem in held_out.held_out]) == (6, [None] * 4)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "1 + 1?", "answer": 2}, {"prompt": "2 + 2?"}])
    with pytest.raises(ValueError, match=r"data.eval: 1 of the held-out problems have no \"answer\", .* or none "
                                         r"with answers \(the pairwise judge's eval/win_rate is then the measure\)"):
        source_of(replace(prompts, eval_every=5, judge=pairwise, data=replace(prompts.data, eval=mixed)))
    # A prompt that leaves no room for an answer is refused before anything starts, not when it is drawn.
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1 + 1?", "answer": 2}] * 5 + [
        {"prompt": "What is " + " + ".join(["1"] * 12) + "?", "answer": 12}])
    with pytest.raises(ValueError, match=r"a problem's prompt has 3\d tokens, no room for an answer in "
                                         r"model.max_model_len=24: raise it, .* it begins '<\|im_start\|>user"):
        source_of(replace(config, data=DataConfig(train=long)))


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "hi"}, "line 1: no 'answer' (it has ['prompt'])"),
    ({"prompt": "", "answer": 1}, 'line 1: "prompt" must be a non-empty string'),
    ({"prompt": "hi", "answer": [1]}, 'line 1: "answer" must be a non-empty string or a number, not [1]'),
    ({"prompt": "hi", "answer": True}, 'line 1: "answer" must be a non-empty string or a number, not true'),
    ({"prompt": [], "answer": 1}, 'line 1: "prompt" must be a string or a non-empty list of messages, not []'),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2"}], "answer": 1},
     'line 1: "prompt" must end with a user message (the one the model answers), not a assistant one'),
    ({"prompt": [{"role": "user"}], "answer": 1}, 'line 1: "prompt"[0] must be {"role": one of system, user'),
])
def test_a_bad_problem_is_refused_with_its_line_and_field(tmp_path, record, message):
    with pytest.raises(ValueError) as caught:
        read_problems(write_jsonl(tmp_path / "rl.jsonl", [record]))
    assert message in str(caught.value), str(caught.value)


def test_conversations_in_both_formats_are_read_as_they_are(tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [SYSTEM, {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
                      {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]},
        "",  # blank lines are skipped
        {"prompt": "1 + 1?", "completion": "Answer: 2", "source": "extra keys are ignored"}])
    assert read_conversations(file) == [
        [SYSTEM, {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}],
        [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "Answer: 2"}]]


def test_preference_pairs_as_strings_or_messages(tmp_path):
    turns = [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "Which?"},
             {"role": "user", "content": "2 and 3"}]
    file = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"},
        {"prompt": turns, "chosen": [{"role": "assistant", "content": "5"}],
         "rejected": [{"role": "assistant", "content": "-1"}]}])
    assert read_preference_pairs(file) == [
        PreferencePair([{"role": "user", "content": "2 + 3?"}], [{"role": "assistant", "content": "5"}],
                       [{"role": "assistant", "content": "6"}]),
        PreferencePair(turns, [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "-1"}])]


@pytest.mark.parametrize(("line", "message"), [
    ('{"messages": [', "line 2: not JSON (Expecting value at column 15)"),
    ('["user", "hi"]', "line 2: expected a conversation"),
    ({"text": "hi"}, "line 2: expected \"messages\", or \"prompt\" and \"completion\"; it has ['text']"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: no assistant turn to train on"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 'line 2: "messages"[0] must be {"role": one of system, user'),
    ({"messages": []}, 'line 2: "messages" must be a string or a non-empty list of messages, not []'),
    ({"prompt": "hi", "completion": 3}, '"completion" must be a string or a non-empty list of messages, not 3'),
])
def test_a_bad_conversation_is_refused_with_its_file_line_and_field(tmp_path, line, message):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1 + 1?", "completion": "2"}, line])
    with pytest.raises(ValueError) as caught:
        read_conversations(file, key="data.eval")
    assert str(caught.value).startswith(f"data.eval={file}, line 2: ") and message in str(caught.value)


def test_bad_pairs_and_files_are_refused(tmp_path):
    file = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "2 + 3?", "chosen": "5"}])
    with pytest.raises(ValueError, match=r"line 1: no 'rejected' \(it has \['chosen', 'prompt'\]\)"):
        read_preference_pairs(file)
    file = write_jsonl(tmp_path / "dpo.jsonl", [
        {"prompt": "2 + 3?", "chosen": "5", "rejected": [{"role": "user", "content": "6"}]}])
    with pytest.raises(ValueError, match='line 1: "rejected" must end with an assistant message, not a user one'):
        read_preference_pairs(file)
    with pytest.raises(ValueError, match=r"data.train=.*empty.jsonl: the file holds no examples"):
        read_preference_pairs(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="data.train=nope.jsonl: no such file"):
        read_conversations("nope.jsonl")


def refusal(config: TrainConfig) -> str:
    with pytest.raises(ValueError) as caught:
        check(config)
    return str(caught.value)


def write_parquet(path, records) -> str:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return str(path)


def write_json(path, records) -> str:
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def test_jsonl_json_and_parquet_files_hold_the_same_examples(tmp_path):
    problems = [{"prompt": [SYSTEM, {"role": "user", "content": "2 + 3?"}], "answer": "5"},
                {"prompt": [{"role": "user", "content": "4 + 4?"}], "answer": "8"}]
    conversations = [{"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}]
    pairs = [{"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}]
    for read, records in ((read_problems, problems), (read_conversations, conversations),
                          (read_preference_pairs, pairs)):
        files = [write(tmp_path / f"{read.__name__}.{suffix}", records) for write, suffix in
                 ((write_jsonl, "jsonl"), (write_json, "json"), (write_parquet, "parquet"))]
        expected = read(files[0])
        assert len(expected) == len(records) and all(read(file) == expected for file in files[1:]), read.__name__
        if read is read_problems:
            assert expected[0] == ([SYSTEM, {"role": "user", "content": "2 + 3?"}], "5", problems[0]), "and its record"
    # A bad example names its file and where in it: a JSON list's element, a Parquet row (both from 0).
    bad = [*problems, {"prompt": [{"role": "user", "content": "hi"}], "answer": ""}]
    for write, suffix, where in ((write_json, "json", "element 2"), (write_parquet, "parquet", "row 2")):
        path = write(tmp_path / f"bad.{suffix}", bad)
        with pytest.raises(ValueError, match=f'^data.train={path}, {where}: "answer" must be a non-empty string'):
            read_problems(path)
    with pytest.raises(ValueError, match=r"a .json file must hold a list of examples \(one per line: .jsonl\), not a "
                                         "dict"):
        read_problems(write_json(tmp_path / "one.json", problems[0]))
    with pytest.raises(ValueError, match=r"data.eval=.*mine.csv: .*mine.csv is not a .jsonl, .json, .parquet, .arrow"):
        read_problems(write_jsonl(tmp_path / "mine.csv", problems), key="data.eval")


def test_a_data_set_in_shards_is_read_from_its_folder_or_a_pattern_in_name_order(tmp_path):
    shards = tmp_path / "data"
    shards.mkdir()
    rows = [{"prompt": f"{a} + 1?", "answer": a + 1} for a in range(6)]
    for index in (1, 0):  # written out of order: read in name order
        write_parquet(shards / f"train-0000{index}-of-00002.parquet", rows[3 * index:3 * index + 3])
    (shards / "README.md").write_text("not data")
    expected = [(f"{a} + 1?", str(a + 1)) for a in range(6)]
    assert pairs_of(read_problems(shards)) == pairs_of(read_problems(f"{shards}/train-*.parquet")) == expected
    assert data_files(f"{shards}/*-of-00002.parquet") == sorted(shards.glob("*.parquet"))
    check(TrainConfig(data=DataConfig(train=f"{shards}/train-*.parquet", eval=str(shards))))
    write_parquet(shards / "train-00002-of-00002.parquet", [{"prompt": "7 + 1?", "answer": ""}])
    with pytest.raises(ValueError, match=r"^data.train=.*train-00002-of-00002.parquet, row 0: \"answer\" must be"):
        read_problems(f"{shards}/train-*")
    for pattern, message in ((f"{shards}/test-*.parquet", "no file matches"), (f"{shards}/*", "README.md is not a "),
                             (str(tmp_path / "nothing"), "no such file")):
        with pytest.raises(ValueError, match=message):
            read_problems(pattern)
        assert message in refusal(TrainConfig(data=DataConfig(train=pattern)))
    # What `datasets` saves to disk: Arrow files beside JSON files that describe them (not examples).
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    assert {file.suffix for file in (tmp_path / "saved").iterdir()} == {".arrow", ".json"}
    assert pairs_of(read_problems(tmp_path / "saved")) == expected
    (tmp_path / "empty").mkdir()
    assert "the folder holds no .jsonl, .json, .parquet, .arrow file" in refusal(TrainConfig(data=DataConfig(
        train=str(tmp_path / "empty"))))


def test_fields_of_other_names_are_read_where_data_fields_says(tmp_path):
    # verl's layout: the prompt as messages, the reference answer nested in reward_model; and GSM8K's own names.
    verl = write_parquet(tmp_path / "verl.parquet", [
        {"data_source": "addition", "prompt": [{"role": "user", "content": "2 + 3?"}],
         "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"index": 0}}])
    ((prompt, answer, record),) = read_problems(verl, fields={"answer": "reward_model.ground_truth"})
    assert (prompt, answer) == ([{"role": "user", "content": "2 + 3?"}], "5")
    assert record["data_source"] == "addition" and record["extra_info"] == {"index": 0}, "the record, for a scorer"
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 7"}])
    assert pairs_of(read_problems(gsm8k, fields={"prompt": "question"})) == [("Tom has 3 apples...",
                                                                              "3 + 4 = 7\n#### 7")]
    swapped = write_jsonl(tmp_path / "swapped.jsonl", [{"prompt": "the answer", "answer": "the question"}])
    assert pairs_of(read_problems(swapped, fields={"prompt": "answer", "answer": "prompt"})) == [
        ("the question", "the answer")]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "2 + 3?", "good": "5", "bad": "6"}])
    assert read_preference_pairs(pairs, fields={"prompt": "question", "chosen": "good", "rejected": "bad"}) == [
        PreferencePair([{"role": "user", "content": "2 + 3?"}], [{"role": "assistant", "content": "5"}],
                       [{"role": "assistant", "content": "6"}])]
    with pytest.raises(ValueError, match=r"row 0: no 'reward_model.truth' for 'answer' \(data.fields.answer; it has "
                                         r"\['ground_truth', 'style'\]\)"):
        read_problems(verl, fields={"answer": "reward_model.truth"})
    with pytest.raises(ValueError, match=r"line 1: no 'answer.value' for 'answer' .* it has str\)"):
        read_problems(gsm8k, fields={"prompt": "question", "answer": "answer.value"})
    with pytest.raises(ValueError, match=r"data.fields: question is not a field of a problem \(its fields: prompt, "
                                         r"answer\)"):
        read_problems(gsm8k, fields={"question": "prompt"})


def test_dpo_pairs_may_be_two_conversations_that_share_their_prompt(tmp_path):
    asked = [SYSTEM, {"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "Which base?"},
             {"role": "user", "content": "Ten."}]
    file = write_jsonl(tmp_path / "dpo.jsonl", [
        {"chosen": [*asked, {"role": "assistant", "content": "5"}],
         "rejected": [*asked, {"role": "assistant", "content": "6"}, {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Yes."}]}])
    assert read_preference_pairs(file) == [PreferencePair(asked, [{"role": "assistant", "content": "5"}], [
        {"role": "assistant", "content": "6"}, {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."}])]
    for chosen, rejected in (([{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}]),
                             ([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}])):
        with pytest.raises(ValueError, match='line 1: "chosen" and "rejected" without a "prompt" must both start '):
            read_preference_pairs(write_jsonl(tmp_path / "bad.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    with pytest.raises(ValueError, match='line 1: "rejected" must end with an assistant message after the shared'):
        read_preference_pairs(write_jsonl(tmp_path / "bad.jsonl", [
            {"chosen": asked + [{"role": "assistant", "content": "5"}], "rejected": asked}]))


def test_answer_formats_find_the_final_answer_of_a_completion_and_of_a_reference_solution(tmp_path):
    assert boxed_answer(r"First \boxed{2}, then $\boxed{\dfrac{1}{ 2}}$.") == r"\frac{1}{2}", "the last box"
    assert boxed_answer(r"\boxed{\left( 3, \sqrt{2} \right)}") == r"(3,\sqrt{2})", "nested braces"
    assert boxed_answer(r"\fbox{1{,}000}") == "1,000" and boxed_answer(r"\boxed {90^\circ}") == "90"
    for none in (r"\boxed{1", "no box", r"\boxed{}", r"\boxedx{1}"):
        assert boxed_answer(none) is None, none
    assert latex_normalized(r"x \Rightarrow y \leftarrow z") == r"x\Rightarrowy\leftarrowz", "not \\left"
    assert gsm8k_answer("3 + 4 = 7\n#### 7\n") == "7" and gsm8k_answer("7") is None
    problems = [{"prompt": "2 + 3?", "answer": r"So we get $\boxed{5}$."},
                {"prompt": [SYSTEM, {"role": "user", "content": "Half of 1?"}], "answer": r"\tfrac{1}{2}"},
                {"prompt": "Half of 1?", "answer": r"\boxed{\frac12}"}]
    file = write_jsonl(tmp_path / "math.jsonl", problems)
    box = "Put the final answer within \\boxed{}."
    task = file_task(file, None, 0, format_reward=0.1, answer_format="boxed", instruction=box)
    five, half, unbraced = task.train
    assert (five.answer, half.answer, unbraced.answer) == ("5", r"\frac{1}{2}", r"\frac12"), "references as found"
    assert five.prompt == f"2 + 3? {box}" and half.prompt == [SYSTEM, {"role": "user", "content": f"Half of 1? {box}"}]
    assert problems[1]["prompt"][1]["content"] == "Half of 1?", "the file's messages are left as they were"
    for completion, reward in ((r"2 + 3 = \boxed{5}", 1.0), (r"\boxed{5.0}", 1.0), (r"\boxed{6}", 0.1),
                               ("Answer: 5", 0.0), (r"\boxed{5", 0.0)):
        assert task.reward(five, completion) == reward and task.accuracy(five, completion) == float(reward == 1), \
            completion
    assert task.accuracy(half, r"\boxed{\dfrac{1}{2}}") == 1.0 and task.accuracy(half, r"\boxed{0.5}") == 0.0, \
        "by text after normalizing, not by value"
    gsm8k = file_task(write_jsonl(tmp_path / "gsm8k.jsonl", [{"q": "Tom...", "a": "3 + 4 = 7\n#### 1,207"}]), None, 0,
                      format_reward=0.0, answer_format="gsm8k", fields={"prompt": "q", "answer": "a"})
    (tom,) = gsm8k.train
    assert (tom.prompt, tom.answer) == ("Tom...", "1,207")
    assert gsm8k.accuracy(tom, "so 1207 in all.\n#### 1207") == 1.0 and gsm8k.accuracy(tom, "Answer: 1207") == 0.0
    # math: the boxed answer compared as mathematics (math-verify), from the driver's thread or any other.
    math = file_task(file, None, 0, format_reward=0.1, answer_format="math")
    five, half, unbraced = math.train
    for problem, completion, reward in ((half, r"\boxed{0.5}", 1.0), (unbraced, r"$\boxed{\dfrac{1}{2}}$", 1.0),
                                        (five, r"\boxed{5.0}", 1.0), (five, r"\boxed{\frac{10}{2}}", 1.0),
                                        (five, r"\boxed{6}", 0.1), (five, "Answer: 5", 0.0), (half, r"\boxed{2}", 0.1)):
        assert math.reward(problem, completion) == reward, (problem.answer, completion)
    assert math_equal("1+x", "x+1") and math_equal("1200", "1,200") and not math_equal("3.14159", r"\pi")
    with concurrent.futures.ThreadPoolExecutor(1) as elsewhere:
        assert elsewhere.submit(math.accuracy, half, r"\boxed{\frac{2}{4}}").result() == 1.0


def test_math_grading_is_timed_out_on_any_thread():
    """A completion sympy would work on forever is wrong after math-verify's timeout, also where the grading runs
    off the main thread (a sweep's runs), where math-verify's SIGALRM cannot be set."""
    tower = "9^{9^{9^{9}}}"
    assert not math_equal(tower, "2")
    graded = []
    thread = threading.Thread(target=lambda: graded.extend([math_equal(tower, "2"), math_equal("0.5", r"\frac{1}{2}")]),
                              daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert graded == [False, True], "graded (in a process of its own), not hung"


VERL_REWARD = """
CALLS = []


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    # verl's custom reward function, as its users write them
    CALLS.append(solution_str)
    if data_source != "addition":
        raise KeyError(data_source)
    said = solution_str.split("=")[-1].strip()
    if extra_info["index"] == 1:
        return {"score": 0.25 if said == ground_truth else -0.5, "acc": said == ground_truth, "pred": said,
                "length": len(solution_str)}
    return 1.0 if said == ground_truth else 0.0


def not_a_number(data_source, solution_str, ground_truth, extra_info=None):
    return "yes"


def text_acc(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0, "acc": "right"}


def right(solution_str, ground_truth, **_):
    return solution_str.endswith(ground_truth)


def two_arguments(solution, answer):
    return 1.0
"""


def test_your_reward_function_scores_completions_as_verl_calls_it(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(VERL_REWARD)
    file = write_parquet(tmp_path / "train.parquet", [
        {"data_source": "addition", "prompt": [{"role": "user", "content": f"{a} + 2?"}],
         "reward_model": {"ground_truth": str(a + 2)}, "extra_info": {"index": a}} for a in range(3)])
    fields = {"answer": "reward_model.ground_truth"}
    for spec in (f"{tmp_path}/my_rewards.py:compute_score", "my_rewards:compute_score"):  # a file, or a module
        monkeypatch.syspath_prepend(tmp_path)
        task = file_task(file, None, 0, format_reward=0.2, fields=fields, reward_fn=spec)
        zero, one, _ = task.train
        assert (task.reward(zero, "0 + 2 = 2"), task.reward(zero, "0 + 2 = 3"), task.reward(zero, "Answer: 2")) == (
            1.0, 0.0, 0.0), "its score alone: no format reward"
        assert (task.reward(one, "1 + 2 = 3"), task.reward(one, "= 4")) == (0.25, -0.5)
        # A dict's "acc" is the accuracy, its other numbers are metrics (its text, verl's "pred", is not).
        assert (task.accuracy(one, "= 4"), task.metrics(one, "= 4")) == (0.0, {"length": 3.0})
        called = reward_function(spec).__globals__["CALLS"]
        assert asyncio.run(task.score(one, "1 + 2 = 4")) == (-0.5, 0.0, {"length": 9.0})
        assert called[-2:] == ["= 4", "1 + 2 = 4"], "what the loop asks, reward, accuracy and metrics: one call"
        assert (task.accuracy(zero, "= 4"), task.metrics(zero, "= 4")) == (0.0, {}), "a number: the accuracy too"
        other = replace(zero, entry={**zero.entry, "data_source": "gsm8k"})
        with pytest.raises(KeyError, match="gsm8k"):
            task.reward(other, "2")
    for name, returned in (("not_a_number", "'yes'"), ("text_acc", "{'score': 1.0, 'acc': 'right'}")):
        with pytest.raises(ValueError, match=rf"data.reward_fn=.*:{name} returned {re.escape(returned)}: a finite "
                                             "number, or a dict whose 'score' \\(and 'acc', if given\\) is one"):
            file_task(file, None, 0, format_reward=0.0, fields=fields,
                      reward_fn=f"{tmp_path}/my_rewards.py:{name}").reward(zero, "2")
    assert file_task(file, None, 0, format_reward=0.0, fields=fields, reward_fn=f"{tmp_path}/my_rewards.py:right"
                     ).reward(zero, "2") == 1.0, "True is 1 (and any keywords it does not name may go to **_)"
    # A function that cannot be found, or called as verl calls it, is refused with the configuration.
    (tmp_path / "broken.py").write_text("import nothing_of_the_kind\n")
    for spec, message in ((f"{tmp_path}/my_rewards.py:score", "my_rewards.py has no function score"),
                          (f"{tmp_path}/nope.py:score", "there is no file"),
                          ("no_such_module:score", "cannot import no_such_module \\(ModuleNotFoundError"),
                          (f"{tmp_path}/broken.py:score", "cannot import .*broken.py \\(ModuleNotFoundError: No module "
                                                          "named 'nothing_of_the_kind'\\)"),
                          ("compute_score", "give it as FILE.py:FUNCTION or MODULE:FUNCTION"),
                          (f"{tmp_path}/my_rewards.py:two_arguments", "two_arguments must take data_source, "
                           "solution_str, ground_truth and extra_info by name, as verl calls it")):
        assert re.search(f"data.reward_fn='.*': .*{message}", refusal(TrainConfig(data=DataConfig(
            train=file, fields=fields, reward_fn=spec)))), spec
    assert "data.reward_fn='my_rewards:compute_score': unset: it applies to RL problems" in refusal(TrainConfig(
        algo=AlgoConfig(loop="sft", loss_fn="cross_entropy"), data=DataConfig(train=file,
                                                                            reward_fn="my_rewards:compute_score")))


WORKER_REWARD = """
import os, subprocess, time
from pathlib import Path


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str.startswith("meet "):  # waits for its partner: scores 1 only if both are scored at once
        me, partner, folder = solution_str.split()[1:]
        Path(folder, me).touch()
        for _ in range(400):
            if Path(folder, partner).exists():
                return {"score": 1.0, "pid": os.getpid()}
            time.sleep(0.025)
        return {"score": 0.0, "pid": os.getpid()}
    if solution_str.startswith("hang "):  # starts a process of its own, then never returns
        child = subprocess.Popen(["sleep", "600"])
        Path(solution_str.split()[1]).write_text(str(child.pid))
        time.sleep(600)
    if solution_str == "raise":
        raise RuntimeError("the judge is down")
    if solution_str == "die":
        os._exit(3)
    return float(solution_str == ground_truth)
"""


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, waiting to be reaped


def test_reward_workers_score_at_once_and_time_out_what_hangs(tmp_path):
    (tmp_path / "worker_rewards.py").write_text(WORKER_REWARD)
    file = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "1 + 1?", "answer": "2", "data_source": "sums"}])
    task = file_task(file, None, 0, format_reward=0.0, reward_fn=f"{tmp_path}/worker_rewards.py:compute_score",
                     reward_workers=2, reward_timeout=2.0)
    (problem,) = task.train

    async def scores(*completions):
        return await asyncio.gather(*(task.score(problem, completion) for completion in completions))

    # Each of two completions waits for the other: both score 1 only if two processes score them at once.
    first, second = asyncio.run(scores(f"meet a b {tmp_path}", f"meet b a {tmp_path}"))
    assert (first[0], second[0]) == (1.0, 1.0), (first, second)
    assert first[2]["pid"] != second[2]["pid"] and first[2]["reward_timeout"] == 0.0
    # One that hangs is cut off after reward_timeout: it scores 0, the process it started dies with its worker, and
    # the others are scored meanwhile by the other worker.
    hung, right, wrong = asyncio.run(scores(f"hang {tmp_path}/child", "2", "3"))
    assert hung == (0.0, 0.0, {"reward_timeout": 1.0}) and right[:2] == (1.0, 1.0) and wrong[:2] == (0.0, 0.0)
    assert right[2] == wrong[2] == {"reward_timeout": 0.0}
    assert not alive(int((tmp_path / "child").read_text())), "what the hung function started is killed too"
    # An exception, or a worker that dies, ends the run naming your function; the next completion is scored.
    with pytest.raises(ValueError, match=r"(?s)data.reward_fn=.*worker_rewards.py:compute_score failed on a "
                                         r"completion: Traceback.*RuntimeError: the judge is down"):
        asyncio.run(scores("raise"))
    with pytest.raises(ValueError, match=r"failed on a completion: its worker process died \(exit code 3\)"):
        asyncio.run(scores("die"))
    assert [score[0] for score in asyncio.run(scores("2", "2", "1"))] == [1.0, 1.0, 0.0]
    # A worker killed from outside between calls is replaced at its next.
    (_, _, metrics), _ = asyncio.run(scores(f"meet c d {tmp_path}", f"meet d c {tmp_path}"))
    os.kill(int(metrics["pid"]), signal.SIGKILL)
    for _ in range(200):  # until it is gone (a zombie counts)
        if not alive(int(metrics["pid"])):
            break
        time.sleep(0.05)
    assert [score[0] for score in asyncio.run(scores("2", "2"))] == [1.0, 1.0]
    assert "data.reward_workers=2: 0 without data.reward_fn" in refusal(TrainConfig(data=DataConfig(
        train=file, reward_workers=2)))


PARITY_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": len(solution_str) % 2, "acc": len(solution_str) % 3 == 0}
"""


def test_several_benchmarks_are_evaluated_each_on_its_own_and_together(shared_actors, tiny_model_dir, tmp_path):
    """verl's validation files, one per data set (data.eval a pattern): each data source's first eval_prompts
    problems are evaluated and its accuracy logged as eval/SOURCE/accuracy, beside eval/accuracy over all of them."""
    for source, count in (("gsm8k", 3), ("math", 4)):
        (tmp_path / source).mkdir()
        write_parquet(tmp_path / source / "test.parquet", [
            {"data_source": source, "prompt": [{"role": "user", "content": f"{source} {index}?"}],
             "reward_model": {"ground_truth": str(index)}} for index in range(count)])
    (tmp_path / "parity.py").write_text(PARITY_REWARD)
    # Scored by two worker processes (data.reward_workers), as a scorer that runs code would be.
    task = file_task(None, str(tmp_path / "*" / "test.parquet"), 0, format_reward=0.0,
                     fields={"answer": "reward_model.ground_truth"}, reward_fn=f"{tmp_path}/parity.py:compute_score",
                     reward_workers=2)
    assert task.data_sources == ["gsm8k", "math"]
    assert [problem.prompt[0]["content"] for problem in task.problems(2, seed=0, split="eval")] == [
        "gsm8k 0?", "gsm8k 1?", "math 0?", "math 1?"], "the first eval_prompts of each, in the files' order"
    gsm8k = task.held_out[0]
    assert task.metrics(gsm8k, "12") == {"gsm8k/accuracy": 0.0} and task.metrics(gsm8k, "123") == {
        "gsm8k/accuracy": 1.0}
    assert file_task(None, str(tmp_path / "math" / "test.parquet"), 0, format_reward=0.0,
                     fields={"answer": "reward_model.ground_truth"}).metrics(gsm8k, "1") == {}, "one source: none"
    config = tiny_config(tiny_model_dir, tmp_path / "run", steps=0, eval_prompts=2)
    [record] = rl_loop.train(config, task, shared_actors(config))
    evaluated = [line for line in samples(tmp_path / "run") if line["split"] == "eval"]
    assert len(evaluated) == 4
    for source in ("gsm8k", "math"):
        scores = [line["metrics"][f"{source}/accuracy"] for line in evaluated
                  if f"{source} " in line["turns"][0]["observation"]]
        assert len(scores) == 2 and record[f"eval/{source}/accuracy"] == sum(scores) / 2, record
    assert record["eval/accuracy"] == (record["eval/gsm8k/accuracy"] + record["eval/math/accuracy"]) / 2
    assert record["eval/reward_timeout"] == 0.0 and all(line["metrics"]["reward_timeout"] == 0.0 for line in evaluated)
    parity = [len(line["turns"][0]["action"]) % 3 == 0 for line in evaluated]
    assert record["eval/accuracy"] == sum(parity) / 4, "each answer scored by the function, in a worker"


def test_held_out_examples_are_drawn_by_a_fixed_seed():
    examples = list(range(20))
    train, held_out = held_out_split(examples, 5)
    assert len(held_out) == 5 and sorted(train + held_out) == examples and not set(train) & set(held_out)
    assert train == sorted(train), "the rest keep the file's order"
    assert held_out_split(examples, 5) == (train, held_out), "the same for every run"
    assert held_out_split(examples, 0) == (examples, [])
    with pytest.raises(ValueError, match="data.train: 5 examples cannot spare eval_prompts=5 for held-out"):
        held_out_split(examples[:5], 5)


def test_data_settings_are_checked_with_the_loop(tiny_model_dir, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1 + 1?", "completion": "2"}])
    sft_loop = AlgoConfig(loop="sft", loss_fn="cross_entropy")
    check(TrainConfig(algo=sft_loop, data=DataConfig(train=file, eval=file)))
    check(TrainConfig(data=DataConfig(train=file)))  # RL on your problems
    with pytest.raises(ValueError) as caught:
        check(TrainConfig(data=DataConfig(train=file), env=EnvConfig(name="calculator")))
    assert "data.train=" in str(caught.value) and "unset: env calculator makes its own problems" in str(caught.value)
    with pytest.raises(ValueError) as caught:
        check(TrainConfig(algo=sft_loop, recipe="sft_jsonl", data=DataConfig(eval=str(tmp_path / "no.jsonl"),
                                                                             required=True)))
    message = str(caught.value)
    assert "data.train=None: a file of your examples: recipe sft_jsonl trains on your own data" in message
    assert f"data.eval='{tmp_path / 'no.jsonl'}': a .jsonl, .json, .parquet or .arrow file, a folder of them or a " \
        "pattern that matches them: no such file" in message
    assert "data.eval=" in message and "unset, or given with data.train" in message
    # steps=0 evaluates the starting weights: data.eval alone is then enough, even for a recipe that needs data.
    check(TrainConfig(algo=sft_loop, recipe="sft_jsonl", steps=0, data=DataConfig(eval=file, required=True)))
    with pytest.raises(ValueError, match=r"steps=0: at least 1 with eval_every=0: steps=0 only evaluates"):
        check(TrainConfig(steps=0, eval_every=0))
    with pytest.raises(ValueError, match=r"eval_temperature=0.0: more than 0 with eval_samples=4: greedy answers"):
        check(TrainConfig(eval_samples=4))
    check(TrainConfig(eval_samples=4, eval_temperature=0.7))
    # The answer's format, the instruction and the fields' names apply to your files; the first two to RL problems.
    message = refusal(TrainConfig(data=DataConfig(answer_format="latex", instruction="Box it.", fields={"a": "b"})))
    assert "data.answer_format='latex': one of answer_line, boxed, math, gsm8k" in message
    assert "data.fields={'a': 'b'}: unset without data.train or data.eval: it applies to your files" in message
    assert "data.instruction='Box it.': unset without data.train or data.eval" in message
    message = refusal(TrainConfig(algo=sft_loop, data=DataConfig(train=file, answer_format="boxed",
                                                                 fields={"messages": "chat"})))
    assert message.count("data.") == 1 and "data.answer_format='boxed': unset: it applies to RL problems, and the " \
                                               "sft loop has none" in message
    evaluated = source_of(TrainConfig(steps=0, model=ModelConfig(name=str(tiny_model_dir)), data=DataConfig(
        eval=write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "1 + 1?", "answer": 2}]))))
    assert isinstance(evaluated, FileTask) and (len(evaluated.train), len(evaluated.held_out)) == (0, 1)


def test_without_a_data_file_the_task_gives_the_examples_and_with_one_the_file(tmp_path):
    config = TrainConfig(algo=AlgoConfig(loop="sft", loss_fn="cross_entropy", train_examples=6), eval_prompts=3)
    train, held_out, problems = supervised_examples(config, Addition(), from_task=sft_conversations,
                                                    read=read_conversations)
    assert train == sft_conversations(Addition(), 6, seed=0) and len(held_out) == 3 and len(problems) == 3
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{a} + {b}?", "completion": str(a + b)}
                                               for a, b in sums(10)])
    with_file = replace(config, data=DataConfig(train=file))
    train, held_out, problems = supervised_examples(with_file, Addition(), from_task=sft_conversations,
                                                    read=read_conversations)
    assert (len(train), len(held_out), problems) == (7, 3, []), "eval_prompts of the file held out, no verifier"
    assert sorted(map(str, train + held_out)) == sorted(map(str, read_conversations(file)))
    all_of_it = supervised_examples(replace(with_file, eval_every=0), Addition(), from_task=sft_conversations,
                                    read=read_conversations)
    assert all_of_it == (read_conversations(file), [], []), "nothing held out when nothing evaluates"


def test_sft_on_a_file_learns_it_and_starts_no_sampler(ray_local, tiny_model_dir, tmp_path):
    conversations = [{"messages": [SYSTEM, {"role": "user", "content": f"{a} + {b}?"},
                                   {"role": "assistant", "content": f"{a + b}"}]} for a, b in sums(8)]
    file = write_jsonl(tmp_path / "sft.jsonl", conversations)
    config = tiny_config(tiny_model_dir, tmp_path / "run", steps=8, eval_every=8, eval_prompts=4)
    config = replace(config, algo=AlgoConfig(loop="sft", loss_fn="cross_entropy", learning_rate=1e-2,
                                             prompts_per_step=4, max_tokens=8),
                     data=DataConfig(train=file, eval=file))
    history = sft.train(config, Addition())
    steps = [record for record in history if "loss" in record]
    assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"] / 2, [record["loss"] for record in steps]
    assert history[-1]["eval/loss"] < history[0]["eval/loss"] / 2, "its held-out copy, learnt"
    assert not any("eval/accuracy" in record or "memory/sampler0_gib" in record for record in history)


def test_dpo_on_a_file_learns_its_pairs_and_starts_no_sampler(ray_local, tiny_model_dir, tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "Which numbers?"},
                         {"role": "user", "content": f"{a} and {b}"}],
              "chosen": str(a + b), "rejected": f"{a + b + 1}"} for a, b in sums(8)]
    file = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chosen, rejected = dpo.pair_datums(tokenizer, read_preference_pairs(file)[:1])
    for datum, reply in ((chosen, "1"), (rejected, "2")):  # 0 + 1: only the reply, not the prompt's own turn
        targets, weights = (datum.loss_fn_inputs[key].data for key in ("target_tokens", "weights"))
        assert tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w]) == f"{reply}<|im_end|>\n"
    config = tiny_config(tiny_model_dir, tmp_path / "run", steps=8, eval_every=8, eval_prompts=4)
    config = replace(config, algo=AlgoConfig(loop="dpo", loss_fn="dpo", loss_fn_config={"beta": 0.1},
                                             learning_rate=1e-2, prompts_per_step=8, max_tokens=8),
                     data=DataConfig(train=file, eval=file))
    history = dpo.train(config, Addition())
    steps = [record for record in history if "loss" in record]
    assert abs(steps[0]["dpo_margin:mean"]) < 1e-4, "at step 0 the policy is the reference"
    assert history[0]["eval/dpo_accuracy:mean"] == 0.0 and history[-1]["eval/dpo_accuracy:mean"] > 0.9, history[-1]
    assert not any("eval/accuracy" in record or "memory/sampler0_gib" in record for record in history)


def test_an_example_longer_than_the_model_context_is_refused_before_anything_starts(tiny_model_dir, tmp_path):
    long_reply = " ".join(["seven"] * 1100)  # the tiny model's context is 1,024 tokens
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Count.", "completion": "one"},
                                                {"prompt": "Count on.", "completion": long_reply}])
    config = tiny_config(tiny_model_dir, tmp_path / "run", eval_every=0)
    config = replace(config, algo=AlgoConfig(loop="sft", loss_fn="cross_entropy"), data=DataConfig(train=file))
    with pytest.raises(ValueError, match=r"an example of \d{4} tokens is longer than .*'s context of 1024 tokens "
                                         r"\(\+1: the last token is only a target\); it begins '.*Count on\."):
        sft.train(config, Addition())
    assert not (tmp_path / "run").exists(), "refused before the run began"


def test_a_run_starts_from_another_runs_adapter_and_refuses_one_of_another_shape(ray_local, tiny_model_dir,
                                                                                 tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{a} + {b}?", "completion": str(a + b)}
                                               for a, b in sums(8)])

    def sft_config(folder: str, steps: int, **model) -> TrainConfig:
        config = tiny_config(tiny_model_dir, tmp_path / folder, steps=steps, eval_every=steps, eval_prompts=4)
        return replace(config, model=replace(config.model, **model), data=DataConfig(train=file, eval=file),
                       algo=AlgoConfig(loop="sft", loss_fn="cross_entropy", learning_rate=1e-2, prompts_per_step=4))

    # SFT, then DPO or RL with a KL penalty: the reference is the adapter the run starts from (algo.reference=start,
    # held frozen in the learner), as TRL's is the SFT policy; algo.reference=base measures against the base model.
    # The runs one after another on one learner and pool, as a sweep's (rl.sweep): each its own adapter and folder.
    rl_config = replace(tiny_config(tiny_model_dir, tmp_path / "rl_start", steps=1, eval_every=0),
                        model=replace(sft_config("", 1).model, adapter=str(tmp_path / "first")),
                        algo=replace(tiny_config(tiny_model_dir, tmp_path).algo, kl_coef=0.1, reference="start"))
    shared = Shared.start([sft_config("first", 4), rl_config])
    try:
        trained = sft.train(sft_config("first", 4), Addition(), shared)
        assert trained[-1]["eval/loss"] < trained[0]["eval/loss"] - 1, "it trained: its adapter is not the start"
        pairs = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": f"{a} + {b}?", "chosen": str(a + b),
                                                     "rejected": str(a + b + 1)} for a, b in sums(8)])

        def dpo_config(folder: str, steps: int, reference: str) -> TrainConfig:
            config = sft_config(folder, steps, adapter=str(tmp_path / "first"))
            return replace(config, checkpoint_every=1, data=DataConfig(train=pairs, eval=pairs), algo=AlgoConfig(
                loop="dpo", loss_fn="dpo", learning_rate=1e-2, prompts_per_step=4, reference=reference))

        first_steps = {}
        for reference in ("start", "base"):
            dpo_steps = [record for record in dpo.train(dpo_config(f"dpo_{reference}", 2, reference), Addition(),
                                                        shared) if "loss" in record]
            if reference == "start":  # resumed after step 0, the run measures against the same starting adapter
                dpo.train(dpo_config("dpo_resumed", 1, reference), Addition(), shared)
                resumed = dpo.train(replace(dpo_config("dpo_resumed", 2, reference), resume=True), Addition(), shared)
                assert resumed[1]["dpo_margin:mean"] == pytest.approx(dpo_steps[1]["dpo_margin:mean"], rel=1e-4)
            first_steps[reference] = dpo_steps[0]
        dpo_start, dpo_base = first_steps["start"], first_steps["base"]
        # The frozen adapter's logprobs are a phase of their own; the base model's come in the training pass.
        assert dpo_start["time/reference_s"] > 0 and "time/reference_s" not in dpo_base, (dpo_start, dpo_base)
        # Measured: margins 0.0 and 0.44; RL's KL penalty reads the same reference (Run.reference_logprobs): ~1e-7.
        assert abs(dpo_start["dpo_margin:mean"]) < 1e-4 and abs(dpo_base["dpo_margin:mean"]) > 0.05, first_steps
        assert abs(rl_loop.train(rl_config, Digits(), shared)[0]["kl/sampler_vs_reference"]) < 1e-4
        # A run folder (its latest checkpoint), or the adapter folder itself.
        checkpoint = max((tmp_path / "first" / "checkpoints").glob("*/weights/*"), key=lambda folder: folder.name)
        assert adapter_folder(tmp_path / "first") == adapter_folder(checkpoint) == checkpoint
        again = sft.train(sft_config("again", 1, adapter=str(tmp_path / "first")), Addition(), shared)
        # Before its first step, the run computes with the first run's final weights: the same held-out loss.
        assert again[0]["eval/loss"] == pytest.approx(trained[-1]["eval/loss"], rel=1e-5), (again[0], trained[-1])
        # steps=0 with data.eval alone: the adapter evaluated on a file, nothing trained.
        evaluated = replace(sft_config("evaluated", 0, adapter=str(tmp_path / "first")), data=DataConfig(eval=file),
                            eval_every=1)
        [record] = sft.train(evaluated, Addition(), shared)
        assert record["step"] == 0 and record["eval/loss"] == pytest.approx(trained[-1]["eval/loss"], rel=1e-5)
        assert "loss" not in record and not (tmp_path / "evaluated" / "state.json").exists()
        with pytest.raises(ValueError, match=r"model.adapter=.*first: the adapter's r is 8; this run's is 4"):
            sft.train(sft_config("smaller", 1, adapter=str(tmp_path / "first"), lora_rank=4), Addition(), shared)
        # Each run took its adapters away as it ended, the refused one too (a sweep's learner would fill up).
        assert ray.get(shared.learner.__ray_call__.remote(lambda learner: list(learner._runs))) == []
    finally:
        shared.close()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.adapter=.*empty: not a PEFT adapter folder \(it lacks "
                                         r"adapter_config.json, adapter_model.safetensors\) nor a run folder"):
        sft.train(sft_config("from_nothing", 1, adapter=str(tmp_path / "empty")), Addition())
    with pytest.raises(ValueError, match="model.adapter='nowhere': a PEFT adapter folder or a run folder, but"):
        check(sft_config("from_nowhere", 1, adapter="nowhere"))
