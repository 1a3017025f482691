"""Training losses: pure functions in one registry, chosen by name.

Every loss has the same signature: `loss(logprobs_D, inputs_D, config) -> (loss, metrics)`, where
`logprobs_D[d]` holds the current model's logprobs of datum d's target tokens ([T], or [T, K] for soft
targets), `inputs_D[d]` its other `loss_fn_inputs` as tensors, and `config` the `loss_fn_config` with defaults
filled in. Following Tinker, per-token terms are summed, not averaged: the caller chooses the normalisation
through weights and advantages. Losses over pairs of datums (DPO) see a batch whose length is even.

A batch split into micro-batches gives the same total loss and gradient as one pass, because every loss is a
sum over datums (or pairs). Metric keys are `name:reduction`; `sum` metrics add across micro-batches, `mean`
metrics are means over the datums (or pairs) the call saw, or, given as (value, weight), over what the loss counts
(PPO's clip fraction: the tokens that carry a gradient), so that neither depends on the micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Metrics = dict[str, float | tuple[float, float]]
LossFn = Callable[[list[Tensor], list[dict[str, Tensor]], dict[str, float]], tuple[Tensor, Metrics]]


@dataclass(frozen=True)
class LossSpec:
    """A loss and what it reads: its required and optional `loss_fn_inputs` and its config with defaults."""

    fn: LossFn
    inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config: dict[str, float] = field(default_factory=dict)
    datums_per_group: int = 1
    """2 for losses over consecutive (chosen, rejected) pairs: micro-batches never split a group."""
    reference_input: str | None = None
    """An input the learner may compute itself when absent: logprobs of the targets with the adapter off."""


def _token_weights(logprobs: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    weights = inputs.get("weights")
    return torch.ones_like(logprobs) if weights is None else weights


def cross_entropy(logprobs_D, inputs_D, config):
    """loss = -sum_t w_t * logp_t, with w = `weights` (any real numbers, negative ones included).

    Soft targets: `target_tokens` and `weights` of shape [T, K] give loss = -sum_{t,k} w_{t,k} logp_{t,k}.
    """
    loss = sum((-(inputs["weights"] * logprobs).sum() for logprobs, inputs in zip(logprobs_D, inputs_D,
                                                                                   strict=True)))
    return loss, {"loss:sum": loss.item()}


def _ratio(logprobs: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    return torch.exp(logprobs - inputs["logprobs"])


def importance_sampling(logprobs_D, inputs_D, config):
    """loss = -sum_t w_t * r_t * A_t, with r_t = exp(logp_t - q_t) and q = the sampler's `logprobs`.

    w = `weights` if given, else 1. The gradient is the policy gradient corrected for sampling from q.
    """
    loss = sum(-(_token_weights(lp, x) * _ratio(lp, x) * x["advantages"]).sum()
               for lp, x in zip(logprobs_D, inputs_D, strict=True))
    return loss, {"loss:sum": loss.item()}


def _clip_bounds(inputs: dict[str, Tensor], config: dict[str, float], like: Tensor) -> tuple[Tensor, Tensor]:
    """Clip bounds from the config, unless the datum brings its own (per datum or per token)."""
    return tuple(torch.as_tensor(inputs.get(name, config[name]), dtype=like.dtype, device=like.device)
                 for name in ("clip_low_threshold", "clip_high_threshold"))


def ppo(logprobs_D, inputs_D, config):
    """loss = -sum_t w_t * min(r_t * A_t, clip(r_t, low, high) * A_t), r_t = exp(logp_t - q_t).

    `low` and `high` bound the ratio itself (`clip_low_threshold`, `clip_high_threshold`; default 0.8, 1.2).
    """
    loss, clipped, tokens = 0.0, 0.0, 0.0
    for logprobs, inputs in zip(logprobs_D, inputs_D, strict=True):
        ratio, advantages = _ratio(logprobs, inputs), inputs["advantages"]
        low, high = _clip_bounds(inputs, config, ratio)
        clipped_ratio = torch.clamp(ratio, low, high)
        unclipped, clipped_term = ratio * advantages, clipped_ratio * advantages
        weights = _token_weights(logprobs, inputs)
        loss = loss - (weights * torch.minimum(unclipped, clipped_term)).sum()
        trained = (weights != 0) & (advantages != 0)  # the tokens that carry a gradient at all
        clipped += float((trained & (clipped_term < unclipped)).sum())  # those whose gradient the clip removes
        tokens += float(trained.sum())
    return loss, {"loss:sum": loss.item(), "clip_fraction:mean": (clipped / max(tokens, 1.0), tokens)}


def gspo(logprobs_D, inputs_D, config):
    """GSPO-token: PPO's clipped objective on one importance ratio per sequence (per datum), not per token.

    s = exp(mean_{t in M} (logp_t - q_t)), the geometric mean of the token ratios over the tokens M that
    `sequence_ratio_mask` marks (nonzero; without it, the tokens of nonzero weight). Every token carries s's
    value with its own logprob's gradient, s_t = sg[s] * exp(logp_t - sg[logp_t]), and
    loss = -sum_t w_t * min(s_t * A_t, clip(s_t, low, high) * A_t), so clipping keeps or drops whole sequences
    while per-token advantages still work. Bounds: `clip_low_threshold`, `clip_high_threshold` (default
    0.9997, 1.0004, the GSPO paper's: a sequence ratio moves far less than a token's).
    """
    loss, clipped, tokens = 0.0, 0.0, 0.0
    for logprobs, inputs in zip(logprobs_D, inputs_D, strict=True):
        weights, advantages = _token_weights(logprobs, inputs), inputs["advantages"]
        in_ratio = inputs.get("sequence_ratio_mask", weights) != 0
        log_ratio = (logprobs.detach() - inputs["logprobs"])[in_ratio].mean() if in_ratio.any() else 0.0
        ratio = torch.exp(log_ratio + logprobs - logprobs.detach())
        low, high = _clip_bounds(inputs, config, ratio)
        unclipped, clipped_term = ratio * advantages, torch.clamp(ratio, low, high) * advantages
        loss = loss - (weights * torch.minimum(unclipped, clipped_term)).sum()
        trained = (weights != 0) & (advantages != 0)
        clipped += float((trained & (clipped_term < unclipped)).sum())
        tokens += float(trained.sum())
    return loss, {"loss:sum": loss.item(), "clip_fraction:mean": (clipped / max(tokens, 1.0), tokens)}


def cispo(logprobs_D, inputs_D, config):
    """loss = -sum_t w_t * sg[clip(r_t, low, high)] * logp_t * A_t, sg = stop-gradient.

    The clipped importance weight scales a REINFORCE term; unlike PPO no token's gradient is dropped. Tinker's
    default bounds are one-sided, (0, 4): no lower bound, so a token whose ratio fell keeps its plain
    importance weight.
    """
    loss = 0.0
    for logprobs, inputs in zip(logprobs_D, inputs_D, strict=True):
        ratio = _ratio(logprobs, inputs).detach()
        low, high = _clip_bounds(inputs, config, ratio)
        weight = torch.clamp(ratio, low, high)
        loss = loss - (_token_weights(logprobs, inputs) * weight * logprobs * inputs["advantages"]).sum()
    return loss, {"loss:sum": loss.item()}


def dro(logprobs_D, inputs_D, config):
    """loss = -sum_t w_t * (logp_t * A_t - beta/2 * (logp_t - q_t)^2).

    The quadratic term keeps the policy near the sampler q; `beta` sets its strength.
    """
    beta = config["beta"]
    loss = sum(-(_token_weights(lp, x) * (lp * x["advantages"] - 0.5 * beta * (lp - x["logprobs"]) ** 2)).sum()
               for lp, x in zip(logprobs_D, inputs_D, strict=True))
    return loss, {"loss:sum": loss.item()}


PAIR_METRICS = ("dpo_accuracy:mean", "dpo_margin:mean", "dpo_chosen_reward:mean", "dpo_rejected_reward:mean")
"""What every pair loss reports (`_pair_metrics`), in its own units."""


def _pair_log_ratios(logprobs_D, inputs_D, *, reference: bool, average: bool) -> tuple[Tensor, Tensor]:
    """The chosen and the rejected datum's log-likelihood of each pair, over the tokens `weights` select (the
    reply), less the reference's (`ref_logprobs`) where `reference`; with `average`, per weighted token."""
    values = []
    for lp, x in zip(logprobs_D, inputs_D, strict=True):
        value = (x["weights"] * (lp - x["ref_logprobs"] if reference else lp)).sum()
        values.append(value / x["weights"].sum().clamp_min(1.0) if average else value)
    stacked = torch.stack(values)
    return stacked[0::2], stacked[1::2]


def _pair_metrics(loss: Tensor, margins: Tensor, chosen: Tensor, rejected: Tensor) -> Metrics:
    """The pair losses' metrics, means over pairs: accuracy (margin > 0), the margin, and the chosen and rejected
    implicit rewards, each in its loss's own units."""
    margins, chosen, rejected = margins.detach(), chosen.detach(), rejected.detach()
    means = ((margins > 0).double().mean(), margins.mean(), chosen.mean(), rejected.mean())
    return {"loss:sum": loss.item(), **{key: value.item() for key, value in zip(PAIR_METRICS, means, strict=True)}}


def dpo(logprobs_D, inputs_D, config):
    """Sigmoid DPO over consecutive (chosen, rejected) datums, summed over pairs.

    For a pair: reward_c = sum_t w_t (logp_t - ref_t) over the chosen datum, reward_r likewise over the
    rejected one, and loss = -logsigmoid(beta * (reward_c - reward_r)). `weights` select the response tokens
    (1) from the prompt (0); `ref_logprobs` are the reference model's logprobs of the same targets.
    `label_smoothing` e (conservative DPO, as TRL's): each preference is taken as wrong with probability e, loss =
    -(1 - e) * logsigmoid(m) - e * logsigmoid(-m), m = beta * (reward_c - reward_r); 0 is plain DPO.
    Metrics (means over pairs): accuracy (reward_c > reward_r), margin (m), and the chosen and rejected rewards,
    each scaled by beta as in the DPO paper.
    """
    beta, smoothing = config["beta"], config["label_smoothing"]
    chosen, rejected = _pair_log_ratios(logprobs_D, inputs_D, reference=True, average=False)
    margins = beta * (chosen - rejected)
    loss = -((1 - smoothing) * F.logsigmoid(margins) + smoothing * F.logsigmoid(-margins)).sum()
    return loss, _pair_metrics(loss, margins, beta * chosen, beta * rejected)


def ipo(logprobs_D, inputs_D, config):
    """IPO (Azar et al., 2023) over consecutive (chosen, rejected) datums, summed over pairs.

    For a pair: h = the chosen datum's log ratio to the reference per reply token, sum_t w_t (logp_t - ref_t) /
    sum_t w_t, less the rejected one's (averaged over tokens, as TRL's loss_type="ipo"), and loss =
    (h - 1 / (2 beta))^2: a squared loss that pulls the margin to 1 / (2 beta) rather than pushing it on without
    bound, as DPO's may on preferences it already satisfies. Metrics as dpo's: margin h, rewards the mean log
    ratios.
    """
    chosen, rejected = _pair_log_ratios(logprobs_D, inputs_D, reference=True, average=True)
    margins = chosen - rejected
    loss = ((margins - 1 / (2 * config["beta"])) ** 2).sum()
    return loss, _pair_metrics(loss, margins, chosen, rejected)


def simpo(logprobs_D, inputs_D, config):
    """SimPO (Meng et al., 2024) over consecutive (chosen, rejected) datums, summed over pairs: no reference.

    For a pair: a_c and a_r, the chosen and rejected datum's mean logprob per reply token (the policy's own
    length-normalised reward), and loss = -logsigmoid(beta * (a_c - a_r) - gamma), `gamma` a target margin (the
    paper's beta 2.0 and gamma / beta 0.5 by default). It needs no reference logprobs, so no reference pass.
    Metrics as dpo's: margin beta * (a_c - a_r), rewards beta * a.
    """
    beta = config["beta"]
    chosen, rejected = _pair_log_ratios(logprobs_D, inputs_D, reference=False, average=True)
    margins = beta * (chosen - rejected)
    loss = -F.logsigmoid(margins - config["gamma"]).sum()
    return loss, _pair_metrics(loss, margins, beta * chosen, beta * rejected)


_POLICY_INPUTS = ("target_tokens", "logprobs", "advantages")
_PER_DATUM_CLIP = ("weights", "clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, inputs=("target_tokens", "weights")),
    "importance_sampling": LossSpec(importance_sampling, inputs=_POLICY_INPUTS, optional_inputs=("weights",)),
    "ppo": LossSpec(ppo, inputs=_POLICY_INPUTS, optional_inputs=_PER_DATUM_CLIP,
                    config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "gspo": LossSpec(gspo, inputs=_POLICY_INPUTS, optional_inputs=(*_PER_DATUM_CLIP, "sequence_ratio_mask"),
                     config={"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004}),
    "cispo": LossSpec(cispo, inputs=_POLICY_INPUTS, optional_inputs=_PER_DATUM_CLIP,
                      config={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": LossSpec(dro, inputs=_POLICY_INPUTS, optional_inputs=("weights",), config={"beta": 0.1}),
    "dpo": LossSpec(dpo, inputs=("target_tokens", "weights"), optional_inputs=("ref_logprobs",),
                    config={"beta": 0.1, "label_smoothing": 0.0}, datums_per_group=2, reference_input="ref_logprobs"),
    "ipo": LossSpec(ipo, inputs=("target_tokens", "weights"), optional_inputs=("ref_logprobs",),
                    config={"beta": 0.1}, datums_per_group=2, reference_input="ref_logprobs"),
    "simpo": LossSpec(simpo, inputs=("target_tokens", "weights"), config={"beta": 2.0, "gamma": 1.0},
                      datums_per_group=2),
}
PAIR_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.datums_per_group == 2)
"""The losses over (chosen, rejected) pairs: the DPO loop's, and RL's on each group's best and worst sample."""


NOT_SUPPORTED = {
    "stable_reinforce": "its objective uses information Tinker records at sampling time (record_stability_info) "
                        "and does not document; use cispo or ppo for off-policy RL",
}
"""Losses the SDK names that are refused here, and why."""


def resolve_config(loss_fn: str, config: dict[str, float | str] | None) -> dict[str, float]:
    """The loss's config with defaults filled in; a ValueError names an unknown loss, key or non-number."""
    if loss_fn in NOT_SUPPORTED:
        raise ValueError(f"loss_fn {loss_fn!r} is not supported: {NOT_SUPPORTED[loss_fn]}")
    if loss_fn not in LOSSES:
        raise ValueError(f"loss_fn {loss_fn!r} is unknown; known losses: {', '.join(LOSSES)}")
    defaults = LOSSES[loss_fn].config
    resolved = dict(defaults)
    for key, value in (config or {}).items():
        if key not in defaults:
            takes = ", ".join(defaults) or "no config"
            raise ValueError(f"loss_fn_config[{key!r}] is not used by {loss_fn} (it takes {takes})")
        try:
            resolved[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
    return resolved


def merge_metrics(parts: list[tuple[Metrics, int]]) -> dict[str, float]:
    """Combines the metrics of micro-batches, each given with the number of datums (or pairs) it covered: a mean
    is weighted by that number, or by its own weight where the loss gave one."""
    merged: dict[str, float] = {}
    for key in parts[0][0]:
        values = [metrics[key] if isinstance(metrics[key], tuple) else (metrics[key], count)
                  for metrics, count in parts]
        reduction = key.rsplit(":", 1)[1]
        if reduction == "sum":
            merged[key] = sum(value for value, _ in values)
        elif reduction == "mean":
            total = sum(weight for _, weight in values)
            merged[key] = sum(value * weight for value, weight in values) / total if total else 0.0
        elif reduction == "min":
            merged[key] = min(value for value, _ in values)
        elif reduction == "max":
            merged[key] = max(value for value, _ in values)
        else:
            raise ValueError(f"metric {key!r} has no known reduction (sum, mean, min, max)")
    return merged
