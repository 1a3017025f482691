"""The typed configuration of a run: the source of truth that Hydra's YAML groups fill in.

`configs/` holds one YAML file per choice of each group (model, algo, task, learner, sampler, cluster, logger)
and one per recipe; `rl-train recipe=NAME key=value ...` composes them and `load()` checks the result against
these dataclasses once (an unknown key or a wrong type is an error naming it). Each component then receives only
its own part.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct"
    dtype: str = "auto"
    """bfloat16 where the hardware computes in it natively, else float32 (`rl.models.resolve_dtype`)."""
    lora_rank: int = 16
    train_unembed: bool = True
    """Adapt the output layer (lm_head) too, as Tinker's LoraConfig does by default."""
    train_attn: bool = True
    """Adapt the attention projections (q, k, v, o)."""
    train_mlp: bool = True
    """Adapt the MLP projections (gate, up, down)."""
    max_model_len: int = 512
    chat_template: str | None = None
    """How chats become the model's tokens: None, the tokenizer's own template; for a base model that has none,
    plain (the text as it is, the end-of-sequence token after each reply), role_colon ("User: ...\\n\\nAssistant:
    ...": rl.chat.CHAT_TEMPLATES) or a Jinja file of your own."""
    adapter: str | None = None
    """A LoRA adapter to start from, with a fresh optimizer at step 0: a PEFT adapter folder (any run's checkpoint,
    what save_weights_for_sampler publishes, one from the HF hub saved locally) or a run's folder (its latest
    checkpoint). Its rank and target modules must be this run's (model.lora_rank, model.train_unembed); another
    alpha is rescaled to the same update. None: a new adapter (LoRA's B = 0: the base model)."""


@dataclass
class AlgoConfig:
    loop: str = "rl"
    """Which loop runs: rl, dpo or sft (rl/driver/)."""
    loss_fn: str = "importance_sampling"
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    learning_rate: float = 2e-4
    lr_schedule: str = "constant"
    """The learning rate over the run's steps: constant, or from learning_rate down towards 0 at the end, linearly or
    along a half cosine (tinker-cookbook's schedules; `rl.driver.run.adam_params`)."""
    warmup_steps: int = 0
    """The first warmup_steps steps rise linearly to learning_rate (step k at (k + 1) / (warmup_steps + 1) of it);
    lr_schedule then runs over the steps after them."""
    grad_clip_norm: float = 1.0
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the LoRA weights."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-12
    """Adam's settings, as Tinker's AdamParams defaults them (HF's Trainer names them so; its defaults are 0.9, 0.999
    and 1e-8)."""
    prompts_per_step: int = 16
    """RL: prompts sampled per step; DPO: pairs per step; SFT: conversations per step."""
    max_tokens: int = 32
    """Longest sampled answer, in rollouts and evaluation."""
    # RL
    group_size: int = 4
    temperature: float = 1.0
    normalize_std: bool = False
    """Divide group-relative advantages by the group's standard deviation."""
    kl_coef: float = 0.0
    """Per-token KL penalty against the reference (algo.reference, or a teacher: algo.teacher, algo.teacher_model),
    folded into the advantages (0: off)."""
    kl_discount: float = 0.0
    """A token's KL penalty as the discounted sum of the KL from it to its sequence's end, by this factor
    (tinker-cookbook's kl_discount_factor); 0: its own KL alone."""
    teacher: str | None = None
    """On-policy distillation: a LoRA adapter to learn from (model.adapter's forms; its own rank and target
    modules) on model.name, or on algo.teacher_model where given, held frozen as RL's KL reference, so each sampled
    token's advantage gains -kl_coef * (sampler logprob - teacher logprob), the teacher's per-token reverse KL
    (tinker-cookbook's on-policy distillation). With reward_coef=0 the teacher is the only signal; else it adds to
    the rewards'."""
    teacher_model: str | None = None
    """On-policy distillation from another model (a larger one of the same family, say): its name or HF folder,
    held in a learner of its own beside the run's (with learner.*'s resources); its tokenizer must be model.name's.
    The teacher is that model, or with algo.teacher an adapter on it."""
    reward_coef: float = 1.0
    """The weight of the group-relative advantages from the environment's rewards; 0 with a teacher: distillation
    alone (rewards and accuracy are still logged)."""
    off_policy: bool = False
    """Sample step k+1 while step k trains (one step behind; the importance ratio corrects)."""
    num_substeps: int = 1
    """Optimizer steps per RL step: its training sequences split in order into this many minibatches, each one
    forward_backward and optim_step (tinker-cookbook's num_substeps); the later ones train on samples of weights
    already updated, which the importance ratio (or ppo's clip) corrects."""
    reference: str = "start"
    """What DPO's loss and RL's kl_coef measure the policy against: start, the weights the run starts from
    (model.adapter's, held frozen in the learner as a run of its own; without one, the base model), as TRL's and
    the DPO paper's reference is the SFT policy; or base, the base model even when starting from an adapter.
    A teacher (algo.teacher, algo.teacher_model), where given, is RL's reference instead."""
    # DPO and SFT
    train_examples: int = 256
    """Size of the fixed training set drawn from the task, cycled through in shuffled epochs (a data file's
    examples are all used: data.train)."""

    @property
    def distills(self) -> bool:
        """Whether the run learns from a teacher: algo.teacher or algo.teacher_model given."""
        return self.teacher is not None or self.teacher_model is not None

    @property
    def pair_loss(self) -> bool:
        """Whether the loss reads (chosen, rejected) pairs (rl.losses.PAIR_LOSSES: dpo, ipo, simpo): the DPO loop's,
        and in RL each group's best and worst sample (online DPO)."""
        from rl.losses import PAIR_LOSSES

        return self.loss_fn in PAIR_LOSSES


@dataclass
class TaskConfig:
    name: str = "addition"
    format_reward: float = 0.2
    """Training-only reward for the right format with a wrong answer (0 turns shaping off)."""


@dataclass
class DataConfig:
    train: str | None = None
    """A file of your own examples (.jsonl, .json, .parquet or .arrow; or a folder of them, or a pattern such as
    `data/train-*.parquet`), which the loop trains on instead of the task's: problems with reference answers for
    RL, conversations for SFT, preference pairs for DPO (rl/datasets.py has the formats). None: the task's."""
    eval: str | None = None
    """Held-out examples in the same format (RL evaluates the first eval_prompts of each data source among them,
    logged apart as eval/SOURCE/accuracy where there are several; SFT and DPO all of them); None:
    eval_prompts of data.train's, which are then not trained on (none with eval_every=0). With steps=0 it may be
    given alone: the starting weights are evaluated on it."""
    fields: dict[str, str] = field(default_factory=dict)
    """Your files' names for the format's fields, where they differ: `data.fields={prompt:question,answer:solution}`
    (a dotted name reaches into a nested object: `reward_model.ground_truth`); a field not named keeps its name."""
    answer_format: str = "answer_line"
    """RL on your problems: how a completion's final answer is found, and the reference's where it is a whole
    solution (rl.answers.ANSWER_FORMATS): answer_line (the first line after the last 'Answer:'), boxed (the last
    \\boxed{...}, as MATH's solutions give it, compared as text), math (the same, compared as mathematics by
    math-verify: 0.5 is \\frac{1}{2}), gsm8k (the first line after the last '####', as GSM8K's)."""
    reward_fn: str | None = None
    """RL on your problems: a Python function that scores each completion instead of the reference's match:
    "path/to/file.py:name" or "package.module:name", called as verl calls its custom reward function
    (name(data_source=, solution_str=, ground_truth=, extra_info=); rl.answers.custom_score), returning a number (or a
    dict whose "score" is one): the reward, and the held-out accuracy's score. None: data.answer_format's match."""
    reward_workers: int = 0
    """How many processes score completions with data.reward_fn at once (rl/reward_workers.py): for a scorer that
    runs code or calls a judge. 0: it scores in the driver, one completion at a time, with no time limit."""
    reward_timeout: float = 60.0
    """With data.reward_workers: seconds a completion's scoring may take; past them its process is killed (with what
    it started) and replaced, and the completion scores 0 (env/reward_timeout: the share of such completions)."""
    train_on: str = "all"
    """SFT: which assistant messages of a conversation are trained: "all", or "last" (the reply a conversation
    ends with, the others being context: a judge's verdict on a reply it was shown, rl.tasks.AdditionJudge)."""
    instruction: str | None = None
    """RL on your problems: text added after a space to each problem's (last) user message, such as how to give the
    answer: `data.instruction='Put the final answer within \\boxed{}.'`. None: the prompts as they are."""
    pairs_as_judge: bool = False
    """SFT: train a pairwise judge on preference pairs (data.train's, in DPO's format, or the task's): each pair is
    two conversations, the chosen reply then judge.question quoting the rejected one ({other}) and judge.verdict, and
    the reverse with judge.negative (rl.judge.pair_conversations); held out, eval/pair_accuracy. Recipe
    preference_model_jsonl; its run folder is then a judge.adapter for RL."""
    required: bool = False
    """Set by a recipe that trains on your file alone (rl_jsonl, sft_jsonl, dpo_jsonl): data.train must be given."""

    @property
    def given(self) -> bool:
        """Whether the run reads your files rather than the task's examples (data.eval alone: with steps=0)."""
        return self.train is not None or self.eval is not None


JUDGE_QUESTION = "Is your answer correct? Reply Yes or No."
JUDGE_QUESTION_WITH_ANSWER = "The right answer is {answer}. Is your answer correct? Reply Yes or No."
"""A judge's question that quotes the reference answer (a reference-guided judge, as general-verifier's): it compares
rather than solves, and it accepts a right answer in any form (seven, 7.0) where a rule-based match may not."""
JUDGE_QUESTION_PAIRWISE = ("Another answer to the same question was:\n{other}\nIs your answer better than that one? "
                           "Reply Yes or No.")
JUDGE_QUESTION_PAIRWISE_WITH_ANSWER = ("The right answer is {answer}. Another answer was:\n{other}\nIs your answer "
                                       "better than that one? Reply Yes or No.")
"""A pairwise judge's questions (a preference model): {other} quotes another reply of the same group."""


@dataclass
class JudgeConfig:
    adapter: str | None = None
    """RL: rewards from a judge instead of the environment (rl/judge.py): its adapter on model.name (a PEFT adapter
    folder, or a run folder: its latest checkpoint, such as recipe arithmetic_judge's), or "base": the base model
    itself. None: the environment's rewards."""
    question: str = JUDGE_QUESTION
    """The user's message after each episode's last reply, asking the judge for its verdict; {answer} in it is the
    episode's reference answer (its problem's: JUDGE_QUESTION_WITH_ANSWER, recipe arithmetic_judge_rl). {other} in
    it makes the judge pairwise: it quotes another reply of the group, each in turn, and the reward is the mean
    P(verdict) over them (JUDGE_QUESTION_PAIRWISE, recipe arithmetic_preference_rl)."""
    verdict: str = "Yes"
    """The start of the judge's reply whose probability is the episode's reward."""
    negative: str = "No"
    """The verdict a pairwise judge learns after the rejected reply of a preference pair (data.pairs_as_judge)."""
    required: bool = False
    """Set by a recipe that rewards with a judge (arithmetic_judge_rl): judge.adapter must be given."""

    @property
    def pairwise(self) -> bool:
        """Whether the judge compares each reply with the others of its group (its question quotes {other})."""
        return "{other}" in self.question

    @property
    def quotes_answer(self) -> bool:
        """Whether the judge's question quotes the reference answer ({answer}): its problems need one."""
        return "{answer}" in self.question


@dataclass
class EnvConfig:
    name: str = "task"
    """What the RL loop rolls out: "task" (the task group's task, one turn per episode) or an environment of
    rl/environments.py (calculator, guess_number), which replaces the task."""
    params: dict[str, Any] = field(default_factory=dict)
    """The environment's own settings (its dataclass fields, e.g. max_number for guess_number)."""
    max_turns: int = 8
    """An episode that reaches it ends with stop "max_turns"."""
    max_sampled_tokens: int | None = None
    """Sampled tokens per episode (None: max_turns * algo.max_tokens); the episode then ends with that stop."""
    advantage: str = "episode"
    """episode: each action token carries the episode's total reward relative to its group; reward_to_go: the
    reward from its turn on, relative to the same group mean."""
    truncated: str = "train"
    """An episode ended by a limit (turns, sampled tokens, context) is trained ("train") or left out ("drop")."""


@dataclass
class LearnerConfig:
    num_cpus: float = 1
    num_gpus: float | None = None
    """None: a share of the Ray cluster's GPUs (a whole one where there are enough; `rl.devices`), none without."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the learner needs, e.g. {learner_node: 1} to pin it to nodes that offer it."""
    micro_batch_tokens: int = 512
    """Tokens per forward/backward pass, padding included (rl.learner.batch.micro_batches): what a pass keeps alive for
    backward grows with it (about 1.3 MB a token for SmolLM2-135M in bf16)."""
    threads: int | None = None
    """torch's CPU threads in the learner; None: every core of its node (learner and samplers take turns in an
    on-policy loop, so each may use them all while it works), half the driver machine's off-policy or shared by a
    sweep's runs (they overlap)."""
    max_restarts: int = 3
    """Times a learner that dies (its process or node lost) is restarted within a run, from the last checkpoint."""
    batch_runs: bool = True
    """A learner shared by a sweep's runs (`sweep.share=true`) computes their concurrent forward_backward calls in
    one pass (rl.learner.batching). 4 runs of the main job's size on an H200: 1.03x the time of a call per run at
    512 micro-batch tokens, 0.70x at 2,048, 0.60x at 16k; 8 runs at 512: 0.81x; on a 2-core CPU 0.95x
    (docs/benchmarks.md). False: one call per run, in arrival order."""


@dataclass
class SamplerConfig:
    replicas: int = 1
    num_cpus: float = 1
    num_gpus: float | None = None
    """Each replica's; None: a share of the Ray cluster's GPUs if vLLM is its CUDA build (`rl.devices`), else none."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each replica needs (node labels, as for the learner)."""
    publish_mode: str = "merge"
    """merge: the run's adapter folded into its replicas' weights (base-model speed); adapter: LoRA hot-loading."""
    threads: int | None = None
    """Each replica's CPU threads; None: every core of the driver's machine (on-policy, the learner and the
    samplers take turns), half of them off-policy or shared by a sweep's runs (they overlap); replicas that share a
    machine, or nodes unlike the driver's, need it set."""
    kv_cache_gib: float | None = None
    """Each replica's KV cache in GiB, held from start to end; None: 1 on CPU (or VLLM_CPU_KVCACHE_SPACE), and on
    a GPU what vLLM sizes from its gpu_memory_utilization. A recipe that knows its sequences can hold less: the
    cache only has to fit the sequences sampled at once (more queue, never fail)."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """None starts Ray in this process; "auto" or "ray://HOST:PORT" joins a running cluster."""
    num_cpus: int | None = None
    """CPUs of the in-process Ray (None: all of this machine's)."""
    placement_strategy: str = "PACK"
    """How a run's placement group lays out its bundles (learner, then one per sampler replica): PACK, SPREAD,
    STRICT_PACK or STRICT_SPREAD."""
    placement_timeout_s: float = 120
    """How long to wait for the cluster to have room for the whole run before saying what is missing."""


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"
    """"offline" writes a local wandb run; "online" syncs; "disabled" turns wandb off. WANDB_MODE overrides."""
    project: str = "rl"
    group: str | None = None
    train_groups: int = 1
    """Groups of each RL step's rollout written to samples.jsonl as text, with rewards and advantages (every
    evaluation's episodes are written too); 0: none."""


@dataclass
class SweepConfig:
    share: bool = True
    """In a sweep (`rl-train -m`), runs on the same base model with the same learner and sampler settings share
    one learner and one sampler pool (rl/sweep.py), which serves their weights in their publish mode (merge: one
    run's version at a time); false: each run gets its own, and the runs go side by side as the cluster has room
    (on a cluster with room for every run's own actors, the faster choice). Each run's result is what it is
    alone either way (docs/sweeps.md)."""


@dataclass
class TrainConfig:
    recipe: str = "arithmetic_rl"
    steps: int = 30
    """Optimizer steps; 0: evaluate the starting weights (the base model's, or model.adapter's) and stop."""
    seed: int = 0
    eval_every: int = 5
    """Greedy held-out evaluation every N steps and after the last; 0: never (benchmarks)."""
    eval_prompts: int = 32
    """Held-out problems per evaluation (addition holds out 32 of its 100 sums)."""
    eval_samples: int = 1
    """Answers per held-out problem at each evaluation: 1, greedy by default; k > 1 (with eval_temperature > 0) gives
    eval/accuracy as the mean over all k (mean@k) and eval/pass@k, the share of problems with a right one."""
    eval_temperature: float = 0.0
    """The evaluation's sampling temperature: 0 answers greedily."""
    checkpoint_every: int = 10
    """Resumable checkpoints every N steps (and after the last); 0: after the last only."""
    checkpoint_keep: int | None = None
    """The last N resumable checkpoints kept, each older one deleted once a newer one is written and state.json names
    it (as HF's save_total_limit); None: all."""
    resume: bool = False
    """Continue the run in output_dir, or else the latest run of this recipe, from its last checkpoint."""
    output_dir: str = "outputs/run"
    storage_uri: str | None = None
    """Where checkpoints are kept beyond the learner's node: an fsspec URL (s3://bucket/runs, gs://...,
    file:///shared/runs), so a learner restarted on another node finds them. None: output_dir/checkpoints on the
    learner's node only."""
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def held_out_examples(self) -> int:
        """How many of data.train's examples are held out when data.eval is not given: eval_prompts, none with
        eval_every=0 (the run evaluates nothing)."""
        return self.eval_prompts if self.eval_every else 0


def hydra_schema(config_type: type) -> DictConfig:
    """A config dataclass as Hydra's schema: every key typed, with its default. Its maps (dict fields) take new keys
    from the command line, `learner.resources='{learner_node: 1}'` as docs/cluster.md shows, which Hydra's struct
    mode would refuse; the rest stays closed, so a misspelt key is still an error."""
    schema = OmegaConf.structured(config_type)

    def open_maps(node: DictConfig) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                open_maps(child)
            elif isinstance(child, DictConfig):
                OmegaConf.set_struct(child, False)

    open_maps(schema)
    return schema


def load(composed: DictConfig) -> TrainConfig:
    """Checks a composed Hydra config against `TrainConfig`; a ValueError names an unknown or mistyped key."""
    unknown = _unknown_keys(OmegaConf.to_container(composed, resolve=False), TrainConfig)
    if unknown:
        key, known = unknown[0]
        raise ValueError(f"bad configuration at {key}: not a known key (known here: {', '.join(known)})")
    schema = OmegaConf.structured(TrainConfig)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, composed))
    except Exception as error:  # omegaconf raises several types; all mean "this config is wrong"
        key = getattr(error, "full_key", None) or "?"
        reason = str(error).splitlines()[0]
        raise ValueError(f"bad configuration at {key}: {reason}") from None


def _unknown_keys(node: dict, schema: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of `node` that `schema` (a dataclass) lacks, with the keys it has; Hydra's `+key=` adds them."""
    types = typing.get_type_hints(schema)
    unknown = []
    for key, value in node.items():
        if key not in types:
            unknown.append((prefix + key, list(types)))
        elif dataclasses.is_dataclass(types[key]) and isinstance(value, dict):
            unknown += _unknown_keys(value, types[key], f"{prefix}{key}.")
    return unknown


LOOPS = ("rl", "dpo", "sft")
LR_SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
"""algo.lr_schedule: the learning rate's factor at `progress` = step / steps (`rl.driver.run.adam_params`)."""
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
WANDB_MODES = ("offline", "online", "disabled")


def check(config: TrainConfig) -> None:
    """Refuses a configuration that cannot run as asked, before anything starts; the ValueError names every bad
    value (its key, the value, and what it must be)."""
    problems = [f"{key}={value!r}: {rule}" for key, value, rule in _problems(config)]
    if problems:
        raise ValueError("bad configuration:\n  " + "\n  ".join(problems))


AT_LEAST_1 = (lambda value: value >= 1, "at least 1")
NOT_NEGATIVE = (lambda value: value >= 0, "0 or more")
POSITIVE = (lambda value: value > 0, "more than 0")
BETA = (lambda value: 0 <= value < 1, "from 0 up to, not including, 1")
UNSET_OR_AT_LEAST_1 = (lambda value: value is None or value >= 1, "unset or at least 1")
UNSET_OR_POSITIVE = (lambda value: value is None or value > 0, "unset or more than 0")
GPUS = (lambda value: value is None or (value >= 0 and (value <= 1 or value == int(value))),
        "unset (a share of the cluster's GPUs), a fraction of one GPU from 0 to 1, or a whole number")


def one_of(*choices: str) -> tuple:
    return (lambda value: value in choices), f"one of {', '.join(choices)}"


def _rules(config: TrainConfig) -> dict[str, tuple]:
    """Each key's rule: (whether a value keeps it, what it must be)."""
    from rl import losses
    from rl.answers import ANSWER_FORMATS
    from rl.environments import ENVIRONMENTS
    from rl.models import DTYPES
    from rl.sampler.replica import PUBLISH_MODES
    from rl.tasks import TASKS

    rules = {
        "steps": (NOT_NEGATIVE[0], "0 (evaluate only) or more"), "seed": NOT_NEGATIVE,
        "eval_every": (NOT_NEGATIVE[0], "0 (never) or more"),
        "checkpoint_every": (NOT_NEGATIVE[0], "0 (the last step only) or more"),
        "checkpoint_keep": (UNSET_OR_AT_LEAST_1[0], "unset (all kept) or at least 1"),
        "model.dtype": one_of(*DTYPES), "model.lora_rank": AT_LEAST_1, "algo.loop": one_of(*LOOPS),
        "algo.loss_fn": one_of(*losses.LOSSES), "algo.learning_rate": POSITIVE,
        "algo.lr_schedule": one_of(*LR_SCHEDULES), "algo.warmup_steps": NOT_NEGATIVE,
        "algo.reference": one_of("start", "base"),
        "algo.weight_decay": NOT_NEGATIVE, "algo.adam_beta1": BETA, "algo.adam_beta2": BETA,
        "algo.adam_epsilon": POSITIVE,
        "algo.grad_clip_norm": (NOT_NEGATIVE[0], "0 (no clipping) or more"), "algo.prompts_per_step": AT_LEAST_1,
        "algo.max_tokens": AT_LEAST_1, "algo.num_substeps": AT_LEAST_1,
        "algo.kl_coef": (NOT_NEGATIVE[0], "0 (off) or more"), "algo.reward_coef": NOT_NEGATIVE,
        "algo.kl_discount": BETA,
        "algo.train_examples": AT_LEAST_1, "task.name": one_of(*TASKS),
        "data.answer_format": one_of(*ANSWER_FORMATS), "data.reward_workers": NOT_NEGATIVE,
        "data.reward_timeout": POSITIVE, "data.train_on": one_of("all", "last"),
        "judge.verdict": (lambda value: bool(value.strip()), "the word the judge's reply starts with, such as Yes"),
        "judge.negative": (lambda value: bool(value.strip()) and value != config.judge.verdict,
                           "a word other than judge.verdict, such as No"),
        "eval_prompts": AT_LEAST_1,
        "eval_samples": AT_LEAST_1, "eval_temperature": NOT_NEGATIVE,
        "learner.num_cpus": NOT_NEGATIVE, "learner.num_gpus": GPUS, "learner.micro_batch_tokens": AT_LEAST_1,
        "learner.threads": UNSET_OR_AT_LEAST_1, "learner.max_restarts": NOT_NEGATIVE,
        "sampler.replicas": AT_LEAST_1, "sampler.num_cpus": NOT_NEGATIVE, "sampler.num_gpus": GPUS,
        "sampler.publish_mode": one_of(*PUBLISH_MODES), "sampler.threads": UNSET_OR_AT_LEAST_1,
        "sampler.kv_cache_gib": UNSET_OR_POSITIVE,
        "cluster.placement_strategy": one_of(*PLACEMENT_STRATEGIES), "cluster.placement_timeout_s": POSITIVE,
        "logger.wandb_mode": one_of(*WANDB_MODES),
        "logger.train_groups": NOT_NEGATIVE, "env.name": one_of("task", *ENVIRONMENTS),
        "env.max_turns": AT_LEAST_1, "env.max_sampled_tokens": UNSET_OR_AT_LEAST_1,
        "env.advantage": one_of("episode", "reward_to_go"), "env.truncated": one_of("train", "drop"),
    }
    if config.algo.loop == "rl":
        if config.algo.reward_coef:
            rules["algo.group_size"] = (lambda value: value >= 2, "at least 2: advantages are relative to the "
                                                                  "group, so a group of one never trains")
        rules["algo.temperature"] = (lambda value: value > 0, "more than 0: greedy samples of a prompt are all "
                                                              "alike, so their advantages are all 0")
    return rules


def _problems(config: TrainConfig) -> list[tuple[str, object, str]]:
    """(key, value, rule) for each value that breaks its rule or does not fit the values beside it."""
    from rl import losses
    from rl.answers import reward_function
    from rl.chat import CHAT_TEMPLATES
    from rl.datasets import data_files

    found = []
    for key, (keeps, rule) in _rules(config).items():
        value = _value(config, key)
        if not keeps(value):
            found.append((key, value, rule))
    algo = config.algo
    if config.data.given and config.env.name != "task":
        key = "data.train" if config.data.train is not None else "data.eval"
        found.append((key, _value(config, key), f"unset: env {config.env.name} makes its own problems"))
    if config.eval_samples > 1 and config.eval_temperature == 0:
        found.append(("eval_temperature", 0.0, f"more than 0 with eval_samples={config.eval_samples}: greedy answers "
                      "to a problem are all alike"))
    evaluating = config.steps == 0  # data.eval alone is enough
    if evaluating and not config.eval_every:
        found.append(("steps", 0, "at least 1 with eval_every=0: steps=0 only evaluates, and eval_every=0 turns "
                      "evaluation off"))
    if config.data.required and config.data.train is None and not (evaluating and config.data.eval):
        found.append(("data.train", None, f"a file of your examples: recipe {config.recipe} trains on your own "
                      "data (data.train=FILE: .jsonl, .json, .parquet, .arrow; rl/datasets.py has the formats)"))
    for key, unset in (("data.fields", {}), ("data.answer_format", "answer_line"), ("data.instruction", None),
                       ("data.reward_fn", None)):
        value = _value(config, key)
        if value != unset and not config.data.given:
            found.append((key, value, "unset without data.train or data.eval: it applies to your files"))
        elif value != unset and key != "data.fields" and algo.loop != "rl":
            found.append((key, value, f"unset: it applies to RL problems, and the {algo.loop} loop has none"))
    if config.data.reward_workers and config.data.reward_fn is None:
        found.append(("data.reward_workers", config.data.reward_workers, "0 without data.reward_fn: the processes "
                      "run your function"))
    if config.data.reward_fn is not None:
        try:
            reward_function(config.data.reward_fn)
        except ValueError as error:
            found.append(("data.reward_fn", config.data.reward_fn, str(error).split(": ", 1)[1]))
    if not (config.model.train_attn or config.model.train_mlp or config.model.train_unembed):
        found.append(("model.train_attn", False, "true, or model.train_mlp or model.train_unembed: an adapter of no "
                      "layer trains nothing"))
    template = config.model.chat_template
    if template is not None and template not in CHAT_TEMPLATES and not Path(template).is_file():
        found.append(("model.chat_template", template, f"unset (the tokenizer's own), {', '.join(CHAT_TEMPLATES)}, "
                      "or a Jinja file, but there is no such file"))
    for key in ("model.adapter", "algo.teacher"):
        path = _value(config, key)
        if path is not None and not Path(path).is_dir():
            found.append((key, path, "a PEFT adapter folder or a run folder, but there is no such folder"))
    judge = config.judge.adapter
    if judge not in (None, "base") and not Path(judge).is_dir():
        found.append(("judge.adapter", judge, '"base", a PEFT adapter folder or a run folder, but there is no such '
                      "folder"))
    if judge is None and config.judge.required:
        # The recipe that trains such a judge: a pairwise one from your pairs where the run reads your file.
        trains = ("arithmetic_judge" if not config.judge.pairwise else
                  "preference_model_jsonl data.train=FILE" if config.data.required else "arithmetic_preference")
        found.append(("judge.adapter", None, f"the judge's adapter folder or run folder, or base: recipe "
                      f"{config.recipe} rewards with a judge's verdicts (recipe {trains.split()[0]} trains one: "
                      f"rl-train recipe={trains} hydra.run.dir=outputs/judge, then judge.adapter=outputs/judge)"))
    if judge is not None and algo.loop != "rl":
        found.append(("judge.adapter", judge, f"unset: the {algo.loop} loop does not sample, so there is nothing to "
                      "judge"))
    elif judge is not None and not algo.reward_coef:
        found.append(("algo.reward_coef", algo.reward_coef, "more than 0 with judge.adapter: it weighs the judge's "
                      "rewards"))
    if config.data.pairs_as_judge and algo.loop != "sft":
        found.append(("data.pairs_as_judge", True, f"false: it makes SFT's examples, and this is the {algo.loop} loop"))
    elif config.data.pairs_as_judge and not config.judge.pairwise:
        found.append(("judge.question", config.judge.question, "a question quoting {other}, the other reply of each "
                      "pair, with data.pairs_as_judge (rl.config.JUDGE_QUESTION_PAIRWISE)"))
    elif config.data.pairs_as_judge and config.judge.quotes_answer:
        found.append(("judge.question", config.judge.question, "a question without {answer}: preference pairs give "
                      "no reference answer"))
    if config.data.train_on != "all" and algo.loop != "sft":
        found.append(("data.train_on", config.data.train_on, f"all: it chooses what SFT trains, and this is the "
                      f"{algo.loop} loop"))
    teacher_key = "algo.teacher" if algo.teacher is not None else "algo.teacher_model"
    if algo.distills and algo.loop != "rl":
        found.append((teacher_key, _value(config, teacher_key), f"unset: the {algo.loop} loop does not sample, and "
                      "distillation learns from the teacher's logprobs of the student's own samples"))
    elif algo.distills and not algo.kl_coef:
        found.append(("algo.kl_coef", algo.kl_coef, "more than 0 with a teacher: it weighs the teacher's per-token "
                      "KL, the signal that distillation learns from"))
    if algo.loop == "rl" and algo.pair_loss:
        for key, value, unset, why in (
                ("algo.kl_coef", algo.kl_coef, 0, "its reference is in the loss, weighed by beta"),
                ("algo.num_substeps", algo.num_substeps, 1, "a step's pairs train in one update"),
                ("algo.reward_coef", algo.reward_coef, 1, "the rewards only rank each group's samples")):
            if value != unset:
                found.append((key, value, f"{unset} with a loss over pairs ({algo.loss_fn}): {why}"))
    if algo.loop == "rl" and not algo.reward_coef and not algo.distills:
        found.append(("algo.teacher", None, "an adapter to distill from (a PEFT adapter folder, or a run folder: its "
                      "latest checkpoint), or algo.teacher_model a model, with algo.reward_coef=0: with neither "
                      "rewards nor a teacher there is nothing to learn"))
    for key in ("data.train", "data.eval"):
        path = _value(config, key)
        try:
            if path is not None:
                data_files(path, key=key)
        except ValueError as error:
            found.append((key, path, "a .jsonl, .json, .parquet or .arrow file, a folder of them or a pattern that "
                          f"matches them: {str(error).split(': ', 1)[1]}"))
    if config.data.eval is not None and config.data.train is None and not evaluating:
        found.append(("data.eval", config.data.eval, "unset, or given with data.train (held-out examples of your own "
                      "data), or with steps=0 (evaluate only)"))
    if config.env.name != "task" and algo.loop != "rl":
        found.append(("env.name", config.env.name, f"task: the {algo.loop} loop trains on a task's problems"))
    if config.model.max_model_len <= algo.max_tokens:
        found.append(("model.max_model_len", config.model.max_model_len,
                      f"more than algo.max_tokens ({algo.max_tokens}), so a prompt fits beside the answer"))
    if algo.loss_fn in losses.LOSSES:
        policy_losses = [name for name, spec in losses.LOSSES.items() if "advantages" in spec.inputs]
        pairs = ", ".join(losses.PAIR_LOSSES)
        wanted = {"rl": [*policy_losses, *losses.PAIR_LOSSES], "dpo": list(losses.PAIR_LOSSES),
                  "sft": ["cross_entropy"]}.get(algo.loop, [algo.loss_fn])
        what = {"rl": f"a policy loss (one that reads advantages: {', '.join(policy_losses)}), or a loss over pairs "
                      f"({pairs}: each group's best and worst sample, online DPO)",
                "dpo": f"a loss over preference pairs ({pairs})"}.get(algo.loop, wanted[0])
        if algo.loss_fn not in wanted:
            found.append(("algo.loss_fn", algo.loss_fn, f"the {algo.loop} loop trains with {what}"))
        try:
            losses.resolve_config(algo.loss_fn, algo.loss_fn_config)
        except ValueError as error:
            found.append(("algo.loss_fn_config", algo.loss_fn_config, str(error)))
    return found


def _value(config: TrainConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
