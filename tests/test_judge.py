"""Rewards from a judge (rl/judge.py): the sequence it reads, its probability as the reward, and the RL loop's
rewards checked against PEFT's own computation of the judge's probabilities."""

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from test_rl_loop import metrics, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import rl.driver.rl as rl_loop
import rl.driver.run
import rl.driver.sft
import rl.judge
from rl.chat import chat_tokens
from rl.config import (
    JUDGE_QUESTION,
    JUDGE_QUESTION_PAIRWISE_WITH_ANSWER,
    JUDGE_QUESTION_WITH_ANSWER,
    DataConfig,
    JudgeConfig,
    check,
)
from rl.datasets import PreferencePair, assistant, held_out_split, user
from rl.driver.episodes import Episode, Turn
from rl.driver.state import adapter_folder
from rl.env import TaskEnv
from rl.judge import (
    Reply,
    judge_episodes,
    judge_question,
    judge_sequence,
    pair_accuracy,
    pair_conversations,
    verdict_probabilities,
    verdict_probability,
    verdict_tokens,
    win_rate,
)
from rl.tasks import Addition, Digits, Problem
from rl.types import SampledSequence


def test_the_judge_reads_the_conversation_as_the_chat_template_renders_it(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question, reply = "What is 2 + 3?", "Answer: 5"
    verdict = verdict_tokens(tokenizer, "Yes")
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": reply},
         {"role": "user", "content": JUDGE_QUESTION}], tokenize=True, add_generation_prompt=True,
        return_dict=False) + tokenizer.encode("Yes", add_special_tokens=False)
    reply_tokens = tokenizer.encode(reply, add_special_tokens=False)
    ended = judge_sequence(tokenizer, chat_tokens(tokenizer, question), [*reply_tokens, tokenizer.eos_token_id],
                           JUDGE_QUESTION, verdict)
    assert ended == expected
    # A reply a limit cut off is closed as if it had ended.
    assert judge_sequence(tokenizer, chat_tokens(tokenizer, question), reply_tokens, JUDGE_QUESTION, verdict) == ended
    with pytest.raises(ValueError, match="judge.verdict=''"):
        verdict_tokens(tokenizer, "")


class Tokenizer:
    """The methods the judge's sequences need, with a chat template of no markers: a character is a token."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens):
        return [ord(character) for character in text]

    def apply_chat_template(self, messages, **options):
        return [token for message in messages for token in self.encode(message["content"], False)]

    def decode(self, tokens, skip_special_tokens):
        return "".join(chr(token) for token in tokens if not (skip_special_tokens and token == self.eos_token_id))


def test_the_judges_probability_replaces_the_episodes_rewards_and_the_tasks_is_kept(monkeypatch):
    def turn(reward: float) -> Turn:
        return Turn(prompt=[1, 2], action=SampledSequence(tokens=[3], logprobs=[-0.1], stop_reason="stop"),
                    reward=reward, metrics={"accuracy": 1.0})

    episodes = [Episode(turns=[turn(0.5), turn(0.25)], stop="done", group_reward=0.125),
                Episode(turns=[turn(1.0)], stop="max_turns")]
    scored = []

    async def logprobs(sequences, last):
        scored.extend(sequences)
        # per target: the verdict's two tokens are the last two
        return [[-5.0] * (len(sequence) - 3) + [-0.5, -0.25] for sequence in sequences]

    monkeypatch.setattr(rl.judge, "message_tokens", lambda tokenizer, message: [9, 9])
    asyncio.run(judge_episodes([episodes[:1], episodes[1:]], JudgeConfig(adapter="base", verdict="ok"), Tokenizer(),
                               logprobs))
    assert scored == [[1, 2, 3, 0, 9, 9, ord("o"), ord("k")]], "the last turn's prompt and reply, closed, once"
    for episode, task_reward in zip(episodes, [0.875, 1.0], strict=True):
        assert [turn.reward for turn in episode.turns][:-1] == [0.0] * (len(episode.turns) - 1)
        assert episode.total_reward == pytest.approx(math.exp(-0.75)) and episode.group_reward == 0.0
        assert episode.metrics == {"accuracy": 1.0, "task_reward": task_reward}
    assert verdict_probability([-9.0, -1.0, -2.0], 2) == pytest.approx(math.exp(-3.0))


def test_a_judges_question_may_quote_the_episodes_reference_answer():
    episode = Episode(turns=[], stop="done", reference="7")
    assert judge_question(JUDGE_QUESTION_WITH_ANSWER, episode.reference) == (
        "The right answer is 7. Is your answer correct? Reply Yes or No.")
    assert judge_question(JUDGE_QUESTION, None) == JUDGE_QUESTION
    with pytest.raises(ValueError, match=r"judge.question='The right answer is \{answer\}.*' quotes \{answer\}, "
                                         "the reference answer, but this environment's episodes give none"):
        judge_question(JUDGE_QUESTION_WITH_ANSWER, None)
    # Task episodes carry their problem's answer; recipe arithmetic_judge_rl asks the question addition_judge trains.
    assert TaskEnv(Addition(), Problem("What is 3 + 4?", "7"), None).reference == "7"
    recipes = Path(__file__).parents[1] / "configs/recipe"
    for recipe, question in (("arithmetic_judge_rl", JUDGE_QUESTION_WITH_ANSWER),
                             ("arithmetic_preference_rl", JUDGE_QUESTION_PAIRWISE_WITH_ANSWER)):
        assert yaml.safe_load((recipes / f"{recipe}.yaml").read_text())["judge"]["question"] == question


def test_a_pairwise_judge_compares_each_reply_with_each_other_of_its_group(monkeypatch):
    def episode(reply: str) -> Episode:
        action = SampledSequence(tokens=[ord(c) for c in reply] + [0], logprobs=[-0.1] * (len(reply) + 1),
                                 stop_reason="stop")
        return Episode(turns=[Turn(prompt=[1], action=action, reward=1.0, metrics={})], stop="done", reference="5")

    groups = [[episode("a"), episode("b"), episode("a")], [episode("c"), episode("d")]]
    judge = JudgeConfig(adapter="base", question="{answer}:{other}", verdict="Y")
    assert judge.pairwise and not JudgeConfig().pairwise
    monkeypatch.setattr(rl.judge, "message_tokens", lambda tokenizer, message: [ord(c) for c in message["content"]])
    asked = []
    # P(Y) by the reply judged and the rival quoted: an independent table of the pairs' probabilities
    table = {("a", "b"): 0.9, ("b", "a"): 0.2, ("a", "a"): 0.5, ("c", "d"): 0.6, ("d", "c"): 0.3}

    async def logprobs(sequences, last):
        asked.extend(sequences)
        return [[0.0] * (len(sequence) - 2) + [math.log(table[chr(sequence[1]), chr(sequence[-2])])]
                for sequence in sequences]

    probabilities = asyncio.run(verdict_probabilities(groups, judge, Tokenizer(), logprobs))
    assert probabilities == [pytest.approx([(0.9 + 0.5) / 2, 0.2, (0.5 + 0.9) / 2]), pytest.approx([0.6, 0.3])]
    # The prompt, the reply closed, the question quoting the reference and the rival's text, the verdict; each
    # distinct sequence once (the two "a" replies ask the same two questions).
    assert sorted("".join(chr(t) for t in sequence[1:]) for sequence in asked) == sorted(
        [f"{mine}\x005:{other}Y" for mine, other in table])


def test_the_win_rate_asks_both_orders_of_each_answer_and_its_baseline_and_ties_are_even(monkeypatch):
    judge = JudgeConfig(adapter="base", question="{answer}:{other}", verdict="Y")
    monkeypatch.setattr(rl.judge, "message_tokens", lambda tokenizer, message: [ord(c) for c in message["content"]])
    table = {("a", "b"): 0.9, ("b", "a"): 0.2, ("a", "c"): 0.4, ("c", "a"): 0.7}  # P(Y): (judged, quoted)
    asked = []

    async def logprobs(sequences, last):
        asked.extend("".join(chr(t) for t in sequence[1:]) for sequence in sequences)
        return [[0.0] * (len(sequence) - 2) + [math.log(table[chr(sequence[1]), chr(sequence[-2])])]
                for sequence in sequences]

    def reply(text: str) -> Reply:
        return Reply(prompt=(1,), tokens=(ord(text), 0), reference="5")

    rate = asyncio.run(win_rate([reply("a"), reply("b"), reply("a")], [reply("b"), reply("b"), reply("c")], judge,
                                Tokenizer(), logprobs))
    # (P(mine | theirs) + 1 - P(theirs | mine)) / 2 each: 0.85, a tie 0.5, 0.35
    assert rate == pytest.approx((0.85 + 0.5 + 0.35) / 3)
    assert sorted(asked) == sorted(["a\x005:bY", "b\x005:aY", "a\x005:cY", "c\x005:aY"]), "a tie is not asked"
    assert asyncio.run(win_rate([reply("a")], [reply("a")], judge, Tokenizer(), logprobs)) == 0.5


def test_a_preference_pair_is_a_pairwise_judges_two_conversations_and_held_out_it_is_ordered_by_them():
    pair = PreferencePair(user("What is 2 + 3?"), assistant("Answer: 5"), [*assistant("5?"), *assistant("Answer: 6")])
    judge = JudgeConfig(question="Better than: {other}?", verdict="Y", negative="N")
    assert pair_conversations(pair, judge) == [
        [*user("What is 2 + 3?"), *assistant("Answer: 5"), *user("Better than: Answer: 6?"), *assistant("Y")],
        [*user("What is 2 + 3?"), *assistant("5?"), *assistant("Answer: 6"), *user("Better than: Answer: 5?"),
         *assistant("N")]]
    scored = []

    def judged(probabilities):  # P(Y) of each sequence in turn
        async def logprobs(sequences, last):
            scored.extend(sequences)
            return [[-1.0] * (len(sequence) - 2) + [math.log(p)] for sequence, p in zip(sequences, probabilities,
                                                                                         strict=True)]
        return logprobs

    # Pairs in turn: the chosen reply asked about the rejected one, then the reverse; a tie is not a preference.
    assert asyncio.run(pair_accuracy([pair, pair], judge, Tokenizer(), judged([0.6, 0.7, 0.2, 0.2]))) == 0.0
    assert asyncio.run(pair_accuracy([pair, pair], judge, Tokenizer(), judged([0.7, 0.6, 0.9, 0.2]))) == 1.0
    # What each sequence is: the conversation up to the judge's reply, rendered for it, then the verdict.
    assert scored[:2] == [Tokenizer().apply_chat_template(conversation[:-1]) + Tokenizer().encode("Y", False)
                          for conversation in pair_conversations(pair, judge)]


@pytest.fixture(scope="module")
def judge_adapter(tiny_model_dir, tmp_path_factory):
    """A random rank-4 PEFT adapter on the tiny model's attention (B not zero: it changes the model)."""
    folder = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


# An adapter judge asked pairwise, and the base model as a judge of one reply (which also judges the evaluations).
@pytest.mark.parametrize("judge", ["base", "pairwise"])
def test_rl_rewards_are_the_judges_probabilities_as_peft_computes_them(shared_actors, tiny_model_dir, judge_adapter,
                                                                         tmp_path, monkeypatch, judge):
    calls = {"train": [], "eval": []}  # (groups, the judge's probabilities) of each call, in training and evaluation

    def recording(split):
        async def record(groups, *args):
            probabilities = await verdict_probabilities(groups, *args)
            calls[split].append((groups, probabilities))
            return probabilities
        return record

    monkeypatch.setattr(rl.judge, "verdict_probabilities", recording("train"))
    monkeypatch.setattr(rl.driver.run, "verdict_probabilities", recording("eval"))
    win_rates = []  # (replies, baselines, win rate) of each evaluation by the pairwise judge

    async def recorded_win_rate(replies, baselines, *args):
        win_rates.append((replies, baselines, await rl.judge.win_rate(replies, baselines, *args)))
        return win_rates[-1][-1]

    monkeypatch.setattr(rl.driver.run, "win_rate", recorded_win_rate)
    question = "Better than {other}? Yes or No." if judge == "pairwise" else JUDGE_QUESTION
    config = tiny_config(tiny_model_dir, tmp_path, steps=1, eval_every=1, eval_prompts=4,
                         judge=JudgeConfig(adapter="base" if judge == "base" else str(judge_adapter),
                                           question=question), algo={"prompts_per_step": 2, "group_size": 4})
    check(config)
    first, final = rl_loop.train(config, Digits(), shared_actors(config))

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if judge != "base":
        model = PeftModel.from_pretrained(model, judge_adapter)
    verdict = verdict_tokens(tokenizer, "Yes")

    def p_verdict(episode: Episode | Reply, other: Episode | Reply | None = None) -> float:
        """PEFT's P(verdict) for the episode's reply, with `other`'s reply quoted in a pairwise question."""
        mine, theirs = (Reply.of(e) if isinstance(e, Episode) else e for e in (episode, other or episode))
        asked = question.replace("{other}", "" if other is None else tokenizer.decode(
            theirs.tokens, skip_special_tokens=True))
        sequence = judge_sequence(tokenizer, list(mine.prompt), list(mine.tokens), asked, verdict)
        with torch.no_grad():
            logits = model(torch.tensor([sequence])).logits[0, -len(verdict) - 1:-1]
        return math.exp(logits.log_softmax(-1).gather(-1, torch.tensor(verdict)[:, None]).sum().item())

    [(groups, rewards_G)], evaluations = calls["train"], calls["eval"]
    assert [len(group) for group in groups] == [4, 4]
    # A pairwise judge compares an evaluation's answers with the first evaluation's instead of judging them alone.
    assert [sum(map(len, groups)) for groups, _ in evaluations] == ([] if judge == "pairwise" else [4, 4])
    for groups_, probabilities_G in [*calls["train"], *evaluations]:
        for group, probabilities in zip(groups_, probabilities_G, strict=True):
            for episode, probability in zip(group, probabilities, strict=True):
                rivals = [other for other in group if other is not episode] if judge == "pairwise" else [None]
                expected = sum(p_verdict(episode, other) for other in rivals) / len(rivals)
                assert probability == pytest.approx(expected, rel=1e-3, abs=1e-7)
    judged, rewards = [e for group in groups for e in group], [r for rewards in rewards_G for r in rewards]
    for episode, reward in zip(judged, rewards, strict=True):
        assert episode.total_reward == reward
        assert episode.metrics["task_reward"] == Digits().reward(None, tokenizer.decode(
            episode.turns[0].action.tokens, skip_special_tokens=True))
    assert first["reward/mean"] == pytest.approx(sum(rewards) / 8)
    assert first["env/task_reward"] == pytest.approx(sum(e.metrics["task_reward"] for e in judged) / 8)
    assert len(set(rewards)) > 1, "the judge tells the replies apart"
    assert first["time/judge_s"] > 0 and metrics(tmp_path)[0]["time/judge_s"] == first["time/judge_s"]
    # Each evaluation: the environment's accuracy, and the judge's mean probability for the same answers.
    if judge == "pairwise":
        assert "eval/judge_reward" not in first and "eval/judge_reward" not in final
        (replies, baseline, even), (final_replies, final_baseline, rate) = win_rates
        assert replies == baseline == final_baseline and even == first["eval/win_rate"] == 0.5
        expected = [0.5 if mine == theirs else (p_verdict(mine, theirs) + 1 - p_verdict(theirs, mine)) / 2
                    for mine, theirs in zip(final_replies, baseline, strict=True)]
        assert final["eval/win_rate"] == rate == pytest.approx(sum(expected) / 4, rel=1e-3, abs=1e-7)
        assert sum(mine != theirs for mine, theirs in zip(final_replies, baseline, strict=True)) >= 1, "not all ties"
        assert "eval/accuracy" in first and "eval/accuracy" in final, "Digits' problems have answers to check"
        return
    for record, (groups_, probabilities_G) in zip((first, final), evaluations, strict=True):
        assert record["eval/judge_reward"] == pytest.approx(sum(map(sum, probabilities_G)) / 4)
        assert record["eval/accuracy"] == sum(e.metrics["accuracy"] for group in groups_ for e in group) / 4


def test_sft_trains_a_pairwise_judge_on_preference_pairs_and_holds_out_its_pair_accuracy(
        shared_actors, tiny_model_dir, tmp_path, monkeypatch):
    pairs = [{"prompt": f"What is {a} + {b}?", "chosen": f"Answer: {a + b}", "rejected": f"Answer: {a + b + 1}"}
             for a in range(4) for b in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    question = "Better than {other}? Yes or No."
    calls = []

    async def recorded(held_out, judge, tokenizer, logprobs):
        async def recording(sequences, last):
            calls.append((sequences, await logprobs(sequences, last)))
            return calls[-1][1]
        return await pair_accuracy(held_out, judge, tokenizer, recording)

    monkeypatch.setattr(rl.driver.sft, "pair_accuracy", recorded)
    config = tiny_config(tiny_model_dir, tmp_path / "run", steps=6, eval_every=6, eval_prompts=4,
                         data=DataConfig(train=str(tmp_path / "pairs.jsonl"), pairs_as_judge=True, train_on="last"),
                         judge=JudgeConfig(question=question),
                         algo={"loop": "sft", "loss_fn": "cross_entropy", "prompts_per_step": 8})
    check(config)
    history = rl.driver.sft.train(config, Digits(), shared_actors(config))
    losses = [record["loss"] for record in history if "loss" in record]
    assert losses[-1] < losses[0] / 2, losses
    assert len(calls) == 2 and "eval/accuracy" not in history[-1], "the pairs' accuracy, not the task's"
    # The final evaluation's logprobs are PEFT's for the run's last checkpoint; its accuracy is the share of the four
    # held-out pairs (drawn from the file's as rl.datasets does) whose chosen reply gets the higher P("Yes").
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      adapter_folder(tmp_path / "run"))
    sequences, logprobs = calls[-1]
    held_out = [PreferencePair(user(p["prompt"]), assistant(p["chosen"]), assistant(p["rejected"]))
                for p in held_out_split(pairs, 4)[1]]
    yes = tokenizer.encode("Yes", add_special_tokens=False)
    assert sequences == [chat_tokens(tokenizer, conversation[:-1]) + yes for pair in held_out
                         for conversation in pair_conversations(pair, JudgeConfig(question=question))]
    probabilities = []
    for sequence, judged in zip(sequences, logprobs, strict=True):
        with torch.no_grad():
            expected = model(torch.tensor([sequence])).logits[0, :-1].log_softmax(-1).gather(
                -1, torch.tensor(sequence[1:])[:, None])[:, 0]
        assert judged == pytest.approx(expected[-len(yes):].tolist(), rel=1e-3, abs=1e-4), "the verdict's alone"
        probabilities.append(math.exp(expected[-len(yes):].sum().item()))
    assert history[-1]["eval/pair_accuracy"] == sum(
        chosen > rejected for chosen, rejected in zip(probabilities[::2], probabilities[1::2], strict=True)) / 4


def test_a_judge_is_refused_where_it_would_judge_nothing(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, judge=JudgeConfig(adapter=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"judge\.adapter=.*nowhere.: \"base\", a PEFT adapter .* no such folder"):
        check(config)
    with pytest.raises(ValueError, match=r"judge.adapter=None: the judge's adapter folder or run folder, or base: "
                       r"recipe arithmetic_rl rewards with a judge's verdicts \(recipe arithmetic_judge trains one"):
        check(replace(config, judge=JudgeConfig(required=True)))
    with pytest.raises(ValueError, match=r"\(recipe arithmetic_preference trains one: rl-train "
                                         r"recipe=arithmetic_preference hydra.run.dir=outputs/judge"):
        check(replace(config, recipe="arithmetic_preference_rl",
                      judge=JudgeConfig(required=True, question=JUDGE_QUESTION_PAIRWISE_WITH_ANSWER)))
    base = replace(config, judge=JudgeConfig(adapter="base"))
    with pytest.raises(ValueError, match=r"algo.reward_coef=0.0: more than 0 with judge.adapter: it weighs"):
        check(replace(base, algo=replace(base.algo, reward_coef=0.0, kl_coef=1.0, teacher=str(tmp_path))))
    with pytest.raises(ValueError, match=r"judge.verdict=' ': the word the judge's reply starts with, such as Yes"):
        check(replace(base, judge=JudgeConfig(adapter="base", verdict=" ")))
    with pytest.raises(ValueError, match=r"judge.adapter='base': unset: the sft loop does not sample"):
        check(replace(base, algo=replace(base.algo, loop="sft", loss_fn="cross_entropy")))
    # A pairwise judge's SFT from preference pairs.
    pairs = replace(config, data=DataConfig(pairs_as_judge=True), judge=JudgeConfig(question="Better than {other}?"))
    with pytest.raises(ValueError, match=r"data.pairs_as_judge=True: false: it makes SFT.s examples, and this is the"):
        check(pairs)
    sft = replace(pairs, algo=replace(config.algo, loop="sft", loss_fn="cross_entropy"))
    check(sft)
    with pytest.raises(ValueError, match=r"judge.question='Is your answer correct\? Reply Yes or No.': a question "
                                         r"quoting \{other\}, the other reply of each pair"):
        check(replace(sft, judge=JudgeConfig()))
    with pytest.raises(ValueError, match=r"judge.question=.*: a question without \{answer\}: preference pairs"):
        check(replace(sft, judge=JudgeConfig(question="{answer} or {other}?")))
    with pytest.raises(ValueError, match=r"judge.negative='Yes': a word other than judge.verdict, such as No"):
        check(replace(sft, judge=JudgeConfig(question="Better than {other}?", negative="Yes")))
