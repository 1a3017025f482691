"""Multi-turn environments: episodes on a real engine (tiny model), their training sequences, limits, bad
environments, the tool layer, the shipped environments, and the RL loop on episodes of several turns."""

import asyncio
from dataclasses import dataclass, field, replace
from functools import partial

import pytest
from test_rl_loop import samples, tiny_config
from transformers import AutoTokenizer

from rl.chat import chat_tokens, completion_text, message_tokens
from rl.driver.episodes import Limits, episode_sequences, run_group
from rl.driver.rl import train
from rl.env import EnvGroup, StepResult
from rl.environments import CalculatorEnv, GuessNumberEnv, make_environment
from rl.sampler import SamplerPool
from rl.tasks import Digits
from rl.tools import CALCULATOR, calculate, call_tool
from rl.types import SamplingParams


@dataclass
class ScriptedEnv:
    """Asks for a number `turns` times; the reward is the share of digits in the last reply (Digits' reward)."""

    tokenizer: object
    turns: int = 3
    rerender: bool = False
    fail_at_turn: int | None = None
    bad_observation: object = None
    observation_words: int = 2
    taken: int = 0

    async def initial_observation(self):
        return chat_tokens(self.tokenizer, "Write a number like 12."), []

    async def step(self, action):
        if self.fail_at_turn == self.taken:
            raise KeyError("broken")
        self.taken += 1
        if self.taken == self.turns:
            reward = Digits().reward(None, completion_text(self.tokenizer, action))
            return StepResult(reward=reward, episode_done=True, metrics={"accuracy": float(reward == 1.0),
                                                                          "digits": reward})
        if self.bad_observation is not None:
            return StepResult(0.0, False, next_observation=self.bad_observation)
        if self.rerender:  # its own history format: a fresh prompt each turn
            return StepResult(0.0, False, next_prompt=chat_tokens(self.tokenizer, f"Turn {self.taken}: a number?"))
        words = " ".join(["Another"] * self.observation_words)
        return StepResult(0.0, False, next_observation=message_tokens(self.tokenizer, {"role": "user",
                                                                                       "content": words}))


@dataclass(frozen=True)
class Scripted:
    name: str = "scripted"
    options: dict = field(default_factory=dict)

    def groups(self, count, *, seed, split, group_size, tokenizer):
        return [EnvGroup(partial(ScriptedEnv, tokenizer, **self.options), group_size) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def pool(ray_local, tiny_model_dir):
    pool = SamplerPool(str(tiny_model_dir), max_model_len=256, max_lora_rank=8, dtype="float32")
    yield pool
    pool.shutdown()


def limits(tokenizer, **fields) -> Limits:
    return replace(Limits(max_tokens=6, max_turns=8, max_sampled_tokens=100, context=256,
                          vocab_size=len(tokenizer)), **fields)


def episodes(pool, tokenizer, group_size=4, seed=5, **options):
    builder = Scripted(options={key: value for key, value in options.items() if key != "limits"}).groups(
        1, seed=0, split="train", group_size=group_size, tokenizer=tokenizer)[0]
    return asyncio.run(run_group(pool, builder, name="scripted", where="test", model_path=None,
                                 params=SamplingParams(temperature=1.0, seed=seed),
                                 limits=options.get("limits", limits(tokenizer))))


def test_episodes_train_exactly_the_sampled_and_observation_tokens(pool, tokenizer):
    group = episodes(pool, tokenizer)
    observation = message_tokens(tokenizer, {"role": "user", "content": "Another Another"})
    for episode in group:
        assert episode.stop == "done" and len(episode.turns) == 3 and episode.rerendered_turns == 0
        first, second, third = episode.turns
        assert second.prompt == first.prompt + first.action.tokens + observation, "built from tokens"
        assert third.prompt == second.prompt + second.action.tokens + observation
        [sequence] = episode_sequences(episode, [1.0, 1.0, 1.0])
        assert sequence.tokens == third.prompt + third.action.tokens
        actions = [token for token, action in zip(sequence.tokens, sequence.actions, strict=True) if action]
        assert actions == first.action.tokens + second.action.tokens + third.action.tokens
        sampled = [lp for lp, action in zip(sequence.logprobs, sequence.actions, strict=True) if action]
        assert sampled == [lp for turn in episode.turns for lp in turn.action.logprobs], "the sampler's logprobs"
        assert all(lp == 0.0 for lp, action in zip(sequence.logprobs, sequence.actions, strict=True) if not action)
    assert len({tuple(episode.turns[1].action.tokens) for episode in group}) > 1, "each episode its own seed"
    again = episodes(pool, tokenizer)
    assert [[t.action.tokens for t in e.turns] for e in again] == [[t.action.tokens for t in e.turns] for e in group]


def test_limits_end_episodes_with_their_flag(pool, tokenizer):
    [turns] = episodes(pool, tokenizer, group_size=1, turns=100, limits=limits(tokenizer, max_turns=2))
    assert (turns.stop, len(turns.turns)) == ("max_turns", 2)
    [budget] = episodes(pool, tokenizer, group_size=1, limits=limits(tokenizer, max_sampled_tokens=1))
    assert (budget.stop, len(budget.turns), len(budget.turns[0].action.tokens)) == ("max_sampled_tokens", 1, 1)
    [context] = episodes(pool, tokenizer, group_size=1, observation_words=300)
    assert (context.stop, len(context.turns)) == ("context", 1), "the next prompt would not fit in 256 tokens"


def test_a_re_rendering_environment_is_detected(pool, tokenizer):
    [episode] = episodes(pool, tokenizer, group_size=1, rerender=True)
    assert episode.rerendered_turns == 2
    sequences = episode_sequences(episode, [1.0, 1.0, 1.0])
    assert [s.tokens for s in sequences] == [turn.prompt + turn.action.tokens for turn in episode.turns]


def test_a_bad_environment_is_named_with_its_episode_and_turn(pool, tokenizer):
    with pytest.raises(RuntimeError, match=r"environment 'scripted' raised in test, episode 0, turn 1: step: "
                                           r"KeyError\('broken'\)"):
        episodes(pool, tokenizer, group_size=1, fail_at_turn=1)
    with pytest.raises(ValueError, match=r"environment 'scripted', test, episode 0, turn 0: next_observation: not "
                                         r"a list of token ids below \d+: 'Higher.'"):
        episodes(pool, tokenizer, group_size=1, bad_observation="Higher.")
    with pytest.raises(ValueError, match=r"episode 0: the initial observation has \d+ tokens, no room in the "
                                         r"context of 8 \(model.max_model_len\)"):
        episodes(pool, tokenizer, group_size=1, limits=limits(tokenizer, context=8))


def test_tool_calls_and_their_errors_become_observations():
    def call(arguments: str):
        return call_tool([CALCULATOR], f"Let me see. <tool_call>{arguments}</tool_call>")

    assert call('{"name": "calculator", "arguments": {"expression": "123 + 456 + 789"}}').content == "1368"
    assert call('{"name": "calculator", "arguments": {"expression": "123 + 456 + 789"}}').valid
    assert call('{"name": "calculator", "arguments": {"expression": "7/2"}}').content == "3.5"
    for arguments, error in [('{"name": "calculator"', "not JSON"), ('{"name": "search", "arguments": {}}',
                                                                      "unknown tool 'search'"),
                             ('{"name": "calculator", "arguments": {"expr": "1"}}', "'expression' is a required"),
                             ('{"name": "calculator", "arguments": {"expression": "1/0"}}', "division by zero"),
                             ('{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}',
                              "not arithmetic")]:
        result = call(arguments)
        assert not result.valid and result.content.startswith("error: ") and error in result.content, result
    assert call_tool([CALCULATOR], "Answer: 12") is None
    assert call_tool([CALCULATOR], '<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}').valid
    with pytest.raises(ValueError, match="not arithmetic"):
        calculate("open('x')")


def test_the_calculator_and_guess_number_environments(tokenizer):
    def reply(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]

    async def play():
        calculator = CalculatorEnv([123, 456, 789], tokenizer)
        prompt, _ = await calculator.initial_observation()
        assert tokenizer.decode(prompt).endswith("What is 123 + 456 + 789? Use the calculator.<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
        called = await calculator.step(reply('<tool_call>{"name": "calculator", "arguments": {"expression": '
                                             '"123+456+789"}}</tool_call>'))
        assert not called.episode_done and called.next_observation == message_tokens(
            tokenizer, {"role": "tool", "content": "1368"})
        broken = await calculator.step(reply("<tool_call>{calculator}</tool_call>"))
        assert "error: the tool call is not JSON" in tokenizer.decode(broken.next_observation)
        final = await calculator.step(reply("Answer: 1368"))
        assert final.episode_done and final.reward == 1.0
        assert final.metrics == {"accuracy": 1.0, "tool_calls": 2, "used_tool": 1.0, "valid_call_rate": 0.5}
        wrong = await CalculatorEnv([1, 2, 3], tokenizer, call_reward=0.1).step(reply("Answer: 7"))
        assert wrong.episode_done and wrong.reward == 0.0 and wrong.metrics["used_tool"] == 0.0
        tried = CalculatorEnv([1, 2, 3], tokenizer, call_reward=0.1)
        await tried.step(reply('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2+3"}}</tool_call>'))
        assert (await tried.step(reply("Answer: 7"))).reward == 0.1, "a valid call, then a wrong answer"
        shown = tokenizer.decode((await CalculatorEnv([1, 2, 3], tokenizer).initial_observation())[0])
        assert shown.count("<tool_call>") == 1 + 3 and "Answer: 824" in shown and "1 + 2 + 3" in shown, shown

        game = GuessNumberEnv(secret=6, max_number=8, guesses=4, tokenizer=tokenizer)
        assert (await game.step(reply("4"))).next_observation == message_tokens(tokenizer, {"role": "user",
                                                                                             "content": "Higher."})
        assert "Reply with one number." in tokenizer.decode((await game.step(reply("no idea"))).next_observation)
        found = await game.step(reply("6"))
        assert found.episode_done and found.reward == pytest.approx(1.0 - 0.5 * 2 / 3) and found.metrics == {
            "accuracy": 1.0, "guesses": 3, "well_formed": pytest.approx(2 / 3)}
        lost = GuessNumberEnv(secret=6, max_number=8, guesses=2, tokenizer=tokenizer, format_reward=0.2)
        await lost.step(reply("9"))  # out of range: not well formed
        last = await lost.step(reply("7"))
        assert last.episode_done and last.reward == pytest.approx(0.2 * 0.5) and last.metrics["accuracy"] == 0.0

    asyncio.run(play())
    with pytest.raises(ValueError, match="env.params for guess_number: .*unexpected keyword argument 'maximum'"):
        make_environment("guess_number", {"maximum": 3})


def test_guess_number_evaluates_each_secret_once(tokenizer):
    game = make_environment("guess_number", {"max_number": 8})

    def secrets(count: int, split: str, seed: int = 0) -> list[int]:
        return [group.make_env().secret for group in game.groups(count, seed=seed, split=split, group_size=1,
                                                                  tokenizer=tokenizer)]

    assert sorted(secrets(8, "eval")) == list(range(1, 9))  # a greedy policy's exact success over the secrets
    assert len(set(secrets(5, "eval"))) == 5 and secrets(5, "eval") == secrets(5, "eval")
    assert secrets(8, "eval", seed=1) != secrets(8, "eval")  # the seed shuffles them
    assert len(set(secrets(32, "train"))) < 32  # training draws with repeats
    with pytest.raises(ValueError, match=r"guess_number has 8 games .*\(eval_prompts <= 8\)"):
        secrets(9, "eval")


MULTI_TURN = {"steps": 4, "eval_every": 4, "eval_prompts": 4, "algo": {"prompts_per_step": 4, "group_size": 4}}


def test_the_rl_loop_trains_on_episodes_and_resumes_in_the_middle_exactly(shared_actors, tiny_model_dir, tmp_path):
    environment = Scripted(options={"turns": 2})
    interrupted = tiny_config(tiny_model_dir, tmp_path / "resumed", **MULTI_TURN, checkpoint_every=2)
    shared = shared_actors(interrupted)
    straight = train(tiny_config(tiny_model_dir, tmp_path / "straight", **MULTI_TURN), environment, shared)
    train(replace(interrupted, steps=2), environment, shared)  # stops after step 1, as if killed there
    resumed = train(replace(interrupted, resume=True), environment, shared)
    for record in straight[::4]:  # the environment's metrics, averaged over each evaluation's episodes
        evaluated = [line for line in samples(tmp_path / "straight")
                     if line["split"] == "eval" and line["step"] == record["step"]]
        assert len(evaluated) == 4 and record["eval/digits"] == pytest.approx(
            sum(line["metrics"]["digits"] for line in evaluated) / 4, abs=1e-12), record
    for record in straight[:4]:
        assert record["env/turns"] == 2.0 and record["env/stop_max_turns"] == 0.0 and record["datums"] > 0, record
        # The tokens trained are the tokens sampled: the learner's logprobs of them match the sampler's (fp32).
        assert record["kl/sampler_vs_learner_sq"] < 1e-6, record
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4], "no step lost or counted twice"
    keys = ("reward/mean", "loss", "grad_norm:mean", "tokens/sampled", "tokens/prompt", "env/accuracy",
            "sampler/weights_step", "tokens_total/sampled")
    for expected, actual in zip(straight[:4], resumed[:4], strict=True):
        assert [actual[k] for k in keys] == pytest.approx([expected[k] for k in keys], rel=1e-5, abs=1e-6)
    assert resumed[4]["eval/accuracy"] == straight[4]["eval/accuracy"]


def test_kl_penalty_and_one_step_off_policy_on_episodes_of_two_turns(ray_local, tiny_model_dir, tmp_path):
    # Merge mode (tiny_config's): a replica serves one weight version, so step k+1's episodes, second turns
    # included, must all come from step k's weights before step k's are published.
    algo = {"kl_coef": 0.1, "off_policy": True, "loss_fn": "cispo", "prompts_per_step": 4, "group_size": 4}
    history = train(tiny_config(tiny_model_dir, tmp_path, steps=3, eval_every=0, algo=algo),
                    Scripted(options={"turns": 2}))
    steps = history[:3]
    assert [r["sampler/weights_step"] for r in steps] == [0, 0, 1], "step k+1 samples the weights of step k"
    assert all(r["env/turns"] == 2.0 for r in steps)
    assert abs(steps[0]["kl/sampler_vs_reference"]) < 1e-4, "the first episodes come from the base model itself"
    assert steps[2]["kl/sampler_vs_reference"] > 1e-3, "after two updates the sampler has moved from the base"
    assert all(r["time/reference_s"] > 0 for r in steps), "the base model's logprobs are a phase of their own"
    # Agreement of the learner's logprobs of the action tokens with the sampler's: exact while both hold the same
    # weights (step 0), apart once the learner holds weights the sampler lacks (a step of lag).
    assert steps[0]["kl/sampler_vs_learner_sq"] < 1e-6 and steps[2]["kl/sampler_vs_learner_sq"] > 1e-4, steps
    # Steps 1 and 2 wait only for what is left of a rollout started during the previous step: their throughput
    # counts the rollout's own seconds, not that wait (which gave tens of millions of tokens/s).
    assert all(0 < r["throughput/sampled_tokens_per_s"] < 1e6 for r in steps), steps
