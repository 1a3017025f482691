"""Tasks, the data built from them, and the pure pieces of the loops: exact values, no engines."""

import re
from collections import Counter
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from rl.answers import strict_answer
from rl.chat import chat_tokens, conversation_datum, message_tokens, with_chat_template
from rl.config import JUDGE_QUESTION_PAIRWISE_WITH_ANSWER, JUDGE_QUESTION_WITH_ANSWER, ModelConfig, TrainConfig, check
from rl.datasets import user
from rl.driver.run import batch_indices
from rl.driver.sft import sft_datum
from rl.tasks import (
    ADDITION_HELD_OUT,
    ADDITION_TRAIN,
    Addition,
    AdditionJudge,
    AdditionPreference,
    Digits,
    GsmSymbolic,
    make_task,
    preference_pairs,
    sft_conversations,
)


def test_addition_scores_strictly_with_optional_format_reward():
    task = Addition(format_reward=0.2)
    (problem,) = task.problems(1, seed=0)
    right, wrong = problem.answer, str(int(problem.answer) + 1)
    assert task.reward(problem, f"I think Answer: {right}") == 1.0
    assert task.reward(problem, f"Answer: {wrong}") == 0.2 and task.accuracy(problem, f"Answer: {wrong}") == 0.0
    assert task.reward(problem, right) == 0.0, "no 'Answer:', no reward"
    assert strict_answer("Answer: 3 Answer: -12 apples") == -12 and strict_answer("Answer: x") is None
    assert problem.solution.endswith(f"Answer: {right}")
    assert Addition().problems(8, seed=0) == Addition().problems(8, seed=0)
    assert Addition().problems(8, seed=0) != Addition().problems(8, seed=0, split="eval")
    # There are only 100 sums: evaluation's 32 are never trained on, and each is asked once.
    held_out = {problem.prompt for problem in Addition().problems(32, seed=3, split="eval")}
    assert len(held_out) == 32 and held_out.isdisjoint(problem.prompt for problem in Addition().problems(500, seed=3))
    with pytest.raises(ValueError, match="holds out 32 sums for evaluation; 33 held-out prompts asked for"):
        Addition().problems(33, seed=0, split="eval")


def test_gsm_symbolic_uses_reasoning_gyms_scorer_and_worked_solutions():
    task = GsmSymbolic(format_reward=0.2)
    problems = task.problems(3, seed=0)
    assert [p.answer for p in problems] == [p.answer for p in task.problems(3, seed=0)], "deterministic"
    assert {p.prompt for p in problems}.isdisjoint({p.prompt for p in task.problems(3, seed=0, split="eval")})
    problem = problems[0]
    assert problem.prompt.endswith("Put the final answer after 'Answer:'.")
    assert task.reward(problem, f"Let me see.\nAnswer: {problem.answer}\nDone") == 1.0
    assert task.reward(problem, "Answer: 123456789") == 0.2 and task.reward(problem, problem.answer) == 0.0
    assert problem.solution.endswith(f"\nAnswer: {problem.answer}") and "####" not in problem.solution
    assert task.accuracy(problem, problem.solution) == 1.0, "the worked solution scores as correct"


def test_digits_rewards_the_share_of_digits():
    task = Digits()
    (problem,) = task.problems(1, seed=0)
    assert task.reward(problem, "12 ab") == pytest.approx(0.5) and task.reward(problem, "") == 0.0
    assert task.accuracy(problem, " 42 ") == 1.0 and task.accuracy(problem, "42a") == 0.0


def test_preference_pairs_and_sft_conversations():
    pairs = preference_pairs(Addition(), 20, seed=1)
    for pair, problem in zip(pairs, Addition().problems(20, seed=1), strict=True):
        assert pair.prompt == [{"role": "user", "content": problem.prompt}]
        assert pair.chosen == [{"role": "assistant", "content": f"Answer: {problem.answer}"}]
        (rejected,) = pair.rejected
        assert rejected["role"] == "assistant"
        wrong = int(rejected["content"].removeprefix("Answer: "))
        assert 1 <= abs(wrong - int(problem.answer)) <= 3
    with pytest.raises(ValueError, match="task 'digits' has no integer reference answers"):
        preference_pairs(Digits(), 2, seed=0)
    (conversation,) = sft_conversations(GsmSymbolic(), 1, seed=0)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[1]["content"] == GsmSymbolic().problems(1, seed=0)[0].solution
    with pytest.raises(ValueError, match="task 'digits' has no worked solutions"):
        sft_conversations(Digits(), 1, seed=0)
    with pytest.raises(ValueError, match="unknown task 'nope': known tasks are addition, addition_judge, addition_p"):
        make_task("nope")


def test_conversation_datum_trains_the_assistant_tokens_only(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4"},
                {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "Answer: 6"}]
    datum = conversation_datum(tokenizer, messages)
    tokens = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    targets, weights = datum.loss_fn_inputs["target_tokens"].data, datum.loss_fn_inputs["weights"].data
    assert datum.model_input.to_ints() == tokens[:-1] and targets == tokens[1:]
    trained = tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w == 1.0])
    # ChatML: each reply and its end-of-turn marker (and the newline the template puts after it) are trained.
    assert trained == "Answer: 4<|im_end|>\nAnswer: 6<|im_end|>\n"
    assert set(weights) == {0.0, 1.0}
    # A DPO reply after a prompt with an assistant turn of its own: only the reply is weighted.
    reply_only = conversation_datum(tokenizer, messages, trained_from=3)
    assert reply_only.model_input.to_ints() == datum.model_input.to_ints()
    weights = reply_only.loss_fn_inputs["weights"].data
    assert tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w == 1.0]) == "Answer: 6<|im_end|>\n"
    # SFT trains every assistant message, or with data.train_on=last the last one alone.
    config = TrainConfig()
    assert sft_datum(config, tokenizer, messages) == datum
    last = replace(config, data=replace(config.data, train_on="last"))
    assert sft_datum(last, tokenizer, messages) == reply_only


def test_addition_judge_asks_whether_a_reply_is_right_as_addition_scores_it():
    task = AdditionJudge()
    problems = task.problems(400, seed=0)
    assert problems == task.problems(400, seed=0) != task.problems(400, seed=1)
    for problem in problems:
        question, reply, asked = problem.prompt
        a, b = map(int, re.fullmatch(r"What is (\d) \+ (\d)\? Put the final answer after 'Answer:'\.",
                                     question["content"]).groups())
        assert (a, b) in ADDITION_TRAIN and reply["role"] == "assistant"
        assert asked == {"role": "user", "content": f"The right answer is {a + b}. Is your answer correct? Reply Yes "
                                                    "or No."} == user(JUDGE_QUESTION_WITH_ANSWER.replace("{answer}",
                                                                                                      str(a + b)))[0]
        stated = re.search(r"Answer: (\d+)$", reply["content"])
        assert problem.answer == problem.solution == ("Yes" if stated and int(stated[1]) == a + b else "No")
    yes = sum(problem.answer == "Yes" for problem in problems) / len(problems)
    assert 0.45 < yes < 0.55, yes
    held_out = {re.search(r"(\d) \+ (\d)", p.prompt[0]["content"]).groups() for p in task.problems(64, seed=0,
                                                                                                     split="eval")}
    assert {(int(a), int(b)) for a, b in held_out} <= set(ADDITION_HELD_OUT)
    (problem,) = [p for p in problems if p.answer == "Yes"][:1]
    assert task.accuracy(problem, " Yes.") == task.reward(problem, "Yes") == 1.0
    assert task.accuracy(problem, "No") == task.accuracy(problem, "") == task.accuracy(problem, "Yesterday") == 0.0


def test_addition_preference_asks_whether_a_reply_is_better_than_another_as_addition_scores_them():
    task = AdditionPreference()
    problems = task.problems(400, seed=0)
    assert problems == task.problems(400, seed=0) != task.problems(400, seed=1)
    cases = Counter()
    for problem in problems:
        question, reply, asked = problem.prompt
        a, b = map(int, re.search(r"What is (\d) \+ (\d)\?", question["content"]).groups())
        other = re.fullmatch(rf"The right answer is {a + b}\. Another answer was:\n(.*)\nIs your answer better than "
                             r"that one\? Reply Yes or No\.", asked["content"], re.DOTALL)[1]
        assert asked == user(JUDGE_QUESTION_PAIRWISE_WITH_ANSWER.replace("{answer}", str(a + b)).replace(
            "{other}", other))[0]

        case = tuple(bool(stated) and int(stated[1]) == a + b
                     for stated in (re.search(r"Answer: (\d+)$", text) for text in (reply["content"], other)))
        cases[case] += 1
        assert problem.answer == problem.solution == ("Yes" if case == (True, False) else "No")
    assert 0.45 < cases[True, False] / 400 < 0.55 and 0.2 < cases[False, True] / 400 < 0.3, cases
    assert cases[True, True] > 20 and cases[False, False] > 20, cases


def test_a_base_model_without_a_chat_template_renders_with_model_chat_template(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="model.chat_template=None: base's tokenizer has no chat template .* give "
                                         "one: plain, role_colon"):
        with_chat_template(tokenizer, None, model="base")
    eos = tokenizer.eos_token

    def trained(datum) -> str:
        targets, weights = datum.loss_fn_inputs["target_tokens"].data, datum.loss_fn_inputs["weights"].data
        return tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w == 1.0])

    # plain: the prompt's text as it is (a continuation for a base model), the reply then end-of-sequence.
    plain = with_chat_template(tokenizer, "plain", model="base")
    prompt = "Question: 2 + 3?\nAnswer:"
    assert chat_tokens(plain, prompt) == plain.encode(prompt, add_special_tokens=False)
    datum = conversation_datum(plain, [{"role": "user", "content": prompt}, {"role": "assistant", "content": " 5"}])
    assert plain.decode([*datum.model_input.to_ints(), datum.loss_fn_inputs["target_tokens"].data[-1]]) == \
        f"{prompt} 5{eos}" and trained(datum) == f" 5{eos}"
    # role_colon: each message after its role; a reply ends with end-of-sequence, where the sampler stops, so a
    # multi-turn environment's next message follows the sampled tokens as the whole conversation renders it.
    colon = with_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir), "role_colon", model="base")
    asked = [{"role": "system", "content": "You add."}, {"role": "user", "content": "2 + 3?"}]
    assert colon.decode(chat_tokens(colon, asked)) == "System: You add.\n\nUser: 2 + 3?\n\nAssistant:"
    conversation = [*asked, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                    {"role": "assistant", "content": "8"}]
    assert trained(conversation_datum(colon, conversation)) == f" 5{eos}\n\n 8{eos}\n\n"
    assert colon.decode(message_tokens(colon, conversation[3])) == "\n\nUser: And 4 + 4?\n\nAssistant:"
    # A Jinja file of your own.
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    mine = with_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir), str(tmp_path / "mine.jinja"), model="m")
    assert mine.decode(chat_tokens(mine, "hi")) == "<user>hi<assistant>"
    assert not refused(ModelConfig(chat_template="plain")) and not refused(ModelConfig(chat_template=str(
        tmp_path / "mine.jinja")))
    assert "model.chat_template='chatml': unset (the tokenizer's own), plain, role_colon, or a Jinja file, but " \
           "there is no such file" in refused(ModelConfig(chat_template="chatml"))


def refused(model: ModelConfig) -> str:
    try:
        check(TrainConfig(model=model))
    except ValueError as error:
        return str(error)
    return ""


def test_batch_indices_cycle_through_shuffled_epochs():
    seen = [batch_indices(step, 3, 7, seed=0) for step in range(7)]  # 21 positions = 3 epochs of 7
    flat = [index for batch in seen for index in batch]
    for epoch in range(3):
        assert sorted(flat[epoch * 7:(epoch + 1) * 7]) == list(range(7)), "each epoch visits every example once"
    assert flat[:7] != flat[7:14], "epochs are shuffled differently"
    assert seen == [batch_indices(step, 3, 7, seed=0) for step in range(7)], "a function of (seed, step) only"
