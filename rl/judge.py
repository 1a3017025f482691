"""Rewards from a judge: a model asked, after each episode's last reply, whether the reply is right; the episode's
reward is the probability that it answers with the verdict (RLAIF, a generative verifier).

The judge reads the episode as the policy wrote it: the last turn's prompt (the whole conversation so far) and
reply, token for token (a reply cut off by a limit is closed with the end-of-turn token), then a user message,
`judge.question` (which may quote the episode's reference answer), and the generation prompt of its own reply. Its
reward is P(verdict | all that), the verdict's tokens' logprobs summed and exponentiated: computed by the learner in
one pass without gradients, exact rather than sampled (each distinct sequence once), and in [0, 1], so every group
whose replies the judge tells apart has something to learn from. The judge is the base model, or an adapter on it
held frozen beside the run's own (a PEFT adapter folder, or a run folder: its latest checkpoint), such as one
trained by SFT on replies labelled right or wrong (docs/recipes.md).

A question that quotes {other} makes the judge pairwise (a preference model, as tinker-cookbook's RLHF): each reply
is compared with each other reply of its group, quoted in the question, and its reward is the mean over those
rivals of P(verdict), "is yours better than this one?". Every ordered pair is asked, so each reply is judged in the
same place against every rival, and a judge's preference for the first or the quoted reply favours none. A group
of G replies costs G x (G - 1) judged sequences; those of one reply share its prompt and reply (computed once).

A pairwise judge learns from preference pairs (SFT with data.pairs_as_judge, recipe preference_model_jsonl): each
pair gives two conversations, the chosen reply asked judge.question about the rejected one (verdict judge.verdict)
and the rejected about the chosen (judge.negative); held out, the share of pairs whose chosen reply it prefers.

The environment's own reward is kept as the metric env/task_reward, and its accuracy still scores evaluation: a
policy that learns to please the judge without getting answers right shows it there. Each evaluation's answers are
judged too: by a judge that is not pairwise, eval/judge_reward, the mean P(verdict) of those answers; by a pairwise
judge, eval/win_rate, how often it prefers each answer to the run's first evaluation's answer to the same problem
(the policy against where it started, as InstructGPT's win rate against its SFT model): the held-out measure where
the problems have no answers to check (RLHF on your prompts).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rl.chat import chat_tokens, completion_text, message_tokens
from rl.config import JudgeConfig
from rl.datasets import Messages, PreferencePair, assistant, user


def verdict_tokens(tokenizer, verdict: str) -> list[int]:
    """The tokens the judge's reply must start with, as the chat template's generation prompt is followed."""
    tokens = tokenizer.encode(verdict, add_special_tokens=False)
    if not tokens:
        raise ValueError(f"judge.verdict={verdict!r}: it encodes to no tokens")
    return tokens


def judge_question(question: str, reference: str | None, other: str | None = None) -> str:
    """`question` with {answer} replaced by `reference`, the reference answer (an episode's `Episode.reference`),
    and {other} by `other`, a rival reply's text: the judge's question in RL and in its training conversations."""
    if "{answer}" in question:
        if reference is None:
            raise ValueError(f"judge.question={question!r} quotes {{answer}}, the reference answer, but this "
                             "environment's episodes give none (a task's give their problem's answer; an "
                             "environment's Env may give one as `reference`)")
        question = question.replace("{answer}", reference)
    return question if other is None else question.replace("{other}", other)


def judge_sequence(tokenizer, prompt: list[int], reply: list[int], question: str, verdict: list[int]) -> list[int]:
    """The tokens the judge scores: the last turn's prompt and reply, closed by the end-of-turn token where a limit
    cut it off, the judge's question as the user's next message, then the verdict as the start of its reply."""
    closed = reply if reply and reply[-1] == tokenizer.eos_token_id else [*reply, tokenizer.eos_token_id]
    return [*prompt, *closed, *message_tokens(tokenizer, {"role": "user", "content": question}), *verdict]


def verdict_probability(logprobs: list[float], verdict_length: int) -> float:
    """P(verdict) from a judged sequence's logprobs (of each token after the first): its last tokens' summed."""
    return math.exp(sum(logprobs[-verdict_length:]))


@dataclass(frozen=True)
class Reply:
    """What the judge reads of an episode: its last turn's prompt and reply (tokens), and its reference answer."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    reference: str | None

    @classmethod
    def of(cls, episode) -> Reply:
        turn = episode.turns[-1]
        return cls(tuple(turn.prompt), tuple(turn.action.tokens), episode.reference)

    def sequence(self, judge: JudgeConfig, tokenizer, verdict: list[int], other: Reply | None = None,
                 ) -> tuple[int, ...]:
        """The judged sequence of this reply, with `other`'s text quoted as {other} (a pairwise judge)."""
        question = judge_question(judge.question, self.reference,
                                  None if other is None else completion_text(tokenizer, list(other.tokens)))
        return tuple(judge_sequence(tokenizer, list(self.prompt), list(self.tokens), question, verdict))


Logprobs = Callable[[list[list[int]], int], Awaitable[list[list[float]]]]
"""(sequences, last) -> the judge's logprobs of each sequence's last `last` tokens (`rl.driver.run.Run.judge_logprobs`):
the verdict's, the only ones read."""


async def verdict_probabilities(groups: list[list], judge: JudgeConfig, tokenizer, logprobs: Logprobs,
                                ) -> list[list[float]]:
    """The judge's P(verdict) for each episode's last reply, group by group; with a pairwise question the mean of
    those with each other reply of the group quoted as {other}."""
    verdict = verdict_tokens(tokenizer, judge.verdict)
    replies_G = [[Reply.of(episode) for episode in group] for group in groups]
    if judge.pairwise:
        asked_G = [[[reply.sequence(judge, tokenizer, verdict, other) for j, other in enumerate(replies) if j != i]
                    for i, reply in enumerate(replies)] for replies in replies_G]
    else:
        asked_G = [[[reply.sequence(judge, tokenizer, verdict)] for reply in replies] for replies in replies_G]
    probability = await verdict_probability_of(
        [asked for asked_E in asked_G for sequences in asked_E for asked in sequences], len(verdict), logprobs)
    return [[sum(probability[s] for s in sequences) / len(sequences) for sequences in asked_E] for asked_E in asked_G]


async def verdict_probability_of(sequences: list[tuple[int, ...]], verdict_length: int, logprobs: Logprobs,
                                 ) -> dict[tuple[int, ...], float]:
    """P(verdict) for each of the judged `sequences`, each distinct one asked once: a group's replies often agree
    word for word (more so as training converges)."""
    distinct = list(dict.fromkeys(sequences))
    judged = await logprobs([list(sequence) for sequence in distinct], verdict_length) if distinct else []
    return {sequence: verdict_probability(logprobs_T, verdict_length)
            for sequence, logprobs_T in zip(distinct, judged, strict=True)}


async def win_rate(replies: list[Reply], baselines: list[Reply], judge: JudgeConfig, tokenizer,
                   logprobs: Logprobs) -> float:
    """How often a pairwise judge prefers each of `replies` to the baseline reply to the same problem (the run's
    first evaluation's): for each, the mean of P(verdict) for it asked about the baseline and 1 - P(verdict) for the
    baseline asked about it. Both orders, so a lean towards the first or the quoted reply cancels; a reply equal to
    its baseline scores 0.5 without being asked."""
    verdict = verdict_tokens(tokenizer, judge.verdict)
    asked = [(reply.sequence(judge, tokenizer, verdict, baseline), baseline.sequence(judge, tokenizer, verdict, reply))
             for reply, baseline in zip(replies, baselines, strict=True) if reply.tokens != baseline.tokens]
    probability = await verdict_probability_of([s for pair in asked for s in pair], len(verdict), logprobs)
    ties = len(replies) - len(asked)
    return (0.5 * ties + sum(probability[ours] + 1 - probability[theirs] for ours, theirs in asked) / 2) / len(replies)


async def judge_episodes(groups: list[list], judge: JudgeConfig, tokenizer, logprobs: Logprobs) -> None:
    """Replaces each episode's rewards by the judge's P(verdict) for its last reply (on its last turn; the others'
    and the group's become 0), keeping what the environment gave as the last turn's metric `task_reward`."""
    probabilities_G = await verdict_probabilities(groups, judge, tokenizer, logprobs)
    for group, probabilities in zip(groups, probabilities_G, strict=True):
        for episode, probability in zip(group, probabilities, strict=True):
            episode.turns[-1].metrics["task_reward"] = episode.total_reward
            for turn in episode.turns:
                turn.reward = 0.0
            episode.group_reward = 0.0
            episode.turns[-1].reward = probability


def pair_conversations(pair: PreferencePair, judge: JudgeConfig) -> list[Messages]:
    """A preference pair as a pairwise judge's two training conversations: the prompt, the chosen reply, judge.question
    quoting the rejected reply's last message as {other}, and judge.verdict; then the same with the replies swapped
    and judge.negative."""
    def asked(reply: Messages, other: Messages, verdict: str) -> Messages:
        return [*pair.prompt, *reply, *user(judge_question(judge.question, None, other[-1]["content"])),
                *assistant(verdict)]

    return [asked(pair.chosen, pair.rejected, judge.verdict), asked(pair.rejected, pair.chosen, judge.negative)]


async def pair_accuracy(pairs: list[PreferencePair], judge: JudgeConfig, tokenizer, logprobs: Logprobs) -> float:
    """The share of `pairs` whose chosen reply the judge prefers: P(verdict) for the chosen reply asked about the
    rejected one above P(verdict) for the rejected reply asked about the chosen one (the sequences RL's pairwise
    rewards read)."""
    verdict = verdict_tokens(tokenizer, judge.verdict)
    sequences = [chat_tokens(tokenizer, conversation[:-1]) + verdict
                 for pair in pairs for conversation in pair_conversations(pair, judge)]
    probabilities = [verdict_probability(judged, len(verdict)) for judged in await logprobs(sequences,
                                                                                            len(verdict))]
    return sum(chosen > rejected for chosen, rejected in zip(probabilities[::2], probabilities[1::2],
                                                              strict=True)) / len(pairs)
