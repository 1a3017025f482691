"""Each loss against an independent calculation: a hand-written formula for the value, finite differences
(torch.autograd.gradcheck) and hand-derived gradients for the derivative."""

import math

import numpy as np
import pytest
import torch

from rl import losses
from rl.types import LossFnType


def _rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)


def _policy_batch():
    """Two datums of 4 and 3 tokens: current logprobs, the sampler's, advantages and weights."""
    logprobs_D = [(-_rand(0, 4).abs()).requires_grad_(), (-_rand(1, 3).abs()).requires_grad_()]
    inputs_D = [
        {"logprobs": lp.detach() + _rand(10 + i, len(lp), scale=0.3), "advantages": _rand(20 + i, len(lp)),
         "weights": torch.tensor([0.0, 1.0, 1.0, 0.5][: len(lp)], dtype=torch.float64)}
        for i, lp in enumerate(logprobs_D)
    ]
    return logprobs_D, inputs_D


def _numpy(tensors):
    return [t.detach().numpy() for t in tensors]


def _grads(loss_fn, logprobs_D, inputs_D, config):
    for lp in logprobs_D:
        lp.grad = None
    loss, _ = loss_fn(logprobs_D, inputs_D, config)
    loss.backward()
    return [lp.grad.clone() for lp in logprobs_D]


def _gradcheck(loss_fn, logprobs_D, inputs_D, config):
    def as_function(*logprobs):
        return loss_fn(list(logprobs), inputs_D, config)[0]

    assert torch.autograd.gradcheck(as_function, tuple(logprobs_D), eps=1e-6, atol=1e-6)


def test_registry_matches_the_api_type():
    assert set(losses.LOSSES) | set(losses.NOT_SUPPORTED) | {"custom"} == set(LossFnType.__args__)  # rl.custom_loss
    assert not set(losses.LOSSES) & set(losses.NOT_SUPPORTED)
    with pytest.raises(ValueError, match="loss_fn 'stable_reinforce' is not supported: its objective uses"):
        losses.resolve_config("stable_reinforce", None)


def test_cross_entropy_with_negative_weights():
    logprobs_D = [(-_rand(0, 5).abs()).requires_grad_()]
    weights = torch.tensor([0.0, 1.0, -0.5, 2.0, 1.0], dtype=torch.float64)
    inputs_D = [{"weights": weights}]
    loss, metrics = losses.cross_entropy(logprobs_D, inputs_D, {})
    expected = -sum(w * lp for w, lp in zip(weights.tolist(), logprobs_D[0].tolist(), strict=True))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics == {"loss:sum": pytest.approx(expected)}
    assert torch.allclose(_grads(losses.cross_entropy, logprobs_D, inputs_D, {})[0], -weights)
    _gradcheck(losses.cross_entropy, logprobs_D, inputs_D, {})


def test_cross_entropy_soft_targets():
    logprobs_D = [(-_rand(0, 3, 2).abs()).requires_grad_()]  # (T=3, K=2)
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]], dtype=torch.float64)
    loss, _ = losses.cross_entropy(logprobs_D, [{"weights": weights}], {})
    assert loss.item() == pytest.approx(float(-(weights.numpy() * logprobs_D[0].detach().numpy()).sum()))


def test_importance_sampling():
    logprobs_D, inputs_D = _policy_batch()
    loss, _ = losses.importance_sampling(logprobs_D, inputs_D, {})
    expected = 0.0
    for lp, x in zip(_numpy(logprobs_D), inputs_D, strict=True):
        expected -= (x["weights"].numpy() * np.exp(lp - x["logprobs"].numpy()) * x["advantages"].numpy()).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # d/dlogp of -w r A is -w r A (since dr/dlogp = r)
    for grad, lp, x in zip(_grads(losses.importance_sampling, logprobs_D, inputs_D, {}), logprobs_D, inputs_D,
                           strict=True):
        ratio = torch.exp(lp.detach() - x["logprobs"])
        assert torch.allclose(grad, -x["weights"] * ratio * x["advantages"])
    _gradcheck(losses.importance_sampling, logprobs_D, inputs_D, {})


def test_importance_sampling_without_weights_weighs_every_token_once():
    logprobs_D, inputs_D = _policy_batch()
    unweighted = [{k: v for k, v in x.items() if k != "weights"} for x in inputs_D]
    ones = [{**x, "weights": torch.ones_like(x["advantages"])} for x in inputs_D]
    assert losses.importance_sampling(logprobs_D, unweighted, {})[0].item() == pytest.approx(
        losses.importance_sampling(logprobs_D, ones, {})[0].item())


def test_ppo_value_and_gradient_at_both_clip_bounds():
    # Tokens: ratio above high with A>0 (clipped), below low with A<0 (clipped), below low with A>0 (not
    # clipped: min picks the unclipped term), inside the bounds (not clipped).
    sampler = torch.zeros(4, dtype=torch.float64)
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.1], dtype=torch.float64)
    logprobs_D = [torch.log(ratios).requires_grad_()]
    advantages = torch.tensor([2.0, -1.0, 3.0, -0.5], dtype=torch.float64)
    inputs_D = [{"logprobs": sampler, "advantages": advantages}]
    config = losses.resolve_config("ppo", None)
    assert config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    loss, metrics = losses.ppo(logprobs_D, inputs_D, config)
    expected_terms = [min(1.5 * 2.0, 1.2 * 2.0), min(0.5 * -1.0, 0.8 * -1.0), min(0.5 * 3.0, 0.8 * 3.0),
                      min(1.1 * -0.5, 1.1 * -0.5)]
    assert loss.item() == pytest.approx(-sum(expected_terms))
    assert metrics["clip_fraction:mean"] == (pytest.approx(2 / 4), 4)  # a mean over the 4 trained tokens
    grad = _grads(losses.ppo, logprobs_D, inputs_D, config)[0]
    expected_grad = torch.tensor([0.0, 0.0, -0.5 * 3.0, -1.1 * -0.5], dtype=torch.float64)
    assert torch.allclose(grad, expected_grad)
    # Away from the kinks, the gradient matches finite differences.
    logprobs_D, inputs_D = _policy_batch()
    _gradcheck(losses.ppo, logprobs_D, inputs_D, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})


def test_ppo_with_weights_matches_a_hand_calculation():
    logprobs_D, inputs_D = _policy_batch()  # weights 0, 1, 1, 0.5: a token of weight 0 counts for nothing
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    loss, metrics = losses.ppo(logprobs_D, inputs_D, config)
    expected, clipped, tokens = 0.0, 0, 0
    for lp, x in zip(_numpy(logprobs_D), inputs_D, strict=True):
        ratio = np.exp(lp - x["logprobs"].numpy())
        advantage, weight = x["advantages"].numpy(), x["weights"].numpy()
        expected -= (weight * np.minimum(ratio * advantage, np.clip(ratio, 0.9, 1.1) * advantage)).sum()
        trained = (weight != 0) & (advantage != 0)
        clipped += int((trained & (ratio * advantage > np.clip(ratio, 0.9, 1.1) * advantage)).sum())
        tokens += int(trained.sum())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clip_fraction:mean"] == (pytest.approx(clipped / tokens), tokens)


def test_ppo_per_datum_clip_bounds_override_the_config():
    logprobs_D = [torch.log(torch.tensor([1.5], dtype=torch.float64)).requires_grad_()]
    inputs_D = [{"logprobs": torch.zeros(1, dtype=torch.float64), "advantages": torch.ones(1, dtype=torch.float64),
                 "clip_high_threshold": torch.tensor([1.4], dtype=torch.float64)}]
    loss, _ = losses.ppo(logprobs_D, inputs_D, losses.resolve_config("ppo", {"clip_high_threshold": 1.2}))
    assert loss.item() == pytest.approx(-1.4)


def test_cispo_weights_a_reinforce_term_by_the_clipped_stopped_ratio():
    logprobs_D, inputs_D = _policy_batch()
    assert losses.resolve_config("cispo", None) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}  # both bounds bite on this batch
    loss, _ = losses.cispo(logprobs_D, inputs_D, config)
    expected, expected_grads = 0.0, []
    for lp, x in zip(_numpy(logprobs_D), inputs_D, strict=True):
        clipped = np.clip(np.exp(lp - x["logprobs"].numpy()), 0.8, 1.2)
        w, a = x["weights"].numpy(), x["advantages"].numpy()
        expected -= (w * clipped * lp * a).sum()
        expected_grads.append(-w * clipped * a)  # the clipped weight is a constant to the gradient
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for grad, expected_grad in zip(_grads(losses.cispo, logprobs_D, inputs_D, config), expected_grads, strict=True):
        assert np.allclose(grad.numpy(), expected_grad)


def test_gspo_clips_one_ratio_per_sequence():
    # Sequence 1: tokens 1-3 in the ratio (mask), log-ratios 0.3, -0.1, 0.4 -> s = exp(0.2), above high = 1.1 with
    # advantages of both signs. Sequence 2: no mask, so the tokens of nonzero weight; log-ratios 0.02, 0.04 ->
    # s = exp(0.03), inside the bounds.
    config = losses.resolve_config("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    sampler_1 = torch.tensor([-1.0, -2.0, -0.5, -1.5], dtype=torch.float64)
    sampler_2 = torch.tensor([-0.7, -0.2, -0.9], dtype=torch.float64)
    logprobs_D = [(sampler_1 + torch.tensor([5.0, 0.3, -0.1, 0.4], dtype=torch.float64)).requires_grad_(),
                  (sampler_2 + torch.tensor([0.0, 0.02, 0.04], dtype=torch.float64)).requires_grad_()]
    advantages_1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    advantages_2 = torch.tensor([0.0, -1.0, 3.0], dtype=torch.float64)
    inputs_D = [{"logprobs": sampler_1, "advantages": advantages_1,
                 "sequence_ratio_mask": torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)},
                {"logprobs": sampler_2, "advantages": advantages_2,
                 "weights": torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)}]
    loss, metrics = losses.gspo(logprobs_D, inputs_D, config)
    s1, s2 = math.exp(0.2), math.exp(0.03)
    terms_1 = [min(s1 * a, min(s1, 1.1) * a) for a in (0.0, 1.0, -2.0, 0.5)]
    terms_2 = [0.0] + [s2 * a for a in (-1.0, 3.0)]  # weight 0 on the first token
    assert loss.item() == pytest.approx(-(sum(terms_1) + sum(terms_2)), rel=1e-12)
    assert metrics["clip_fraction:mean"] == (pytest.approx(2 / 5), 5), "sequence 1's positive advantages are clipped"
    # d/dlogp_t of s_t * A_t is s * A_t (s carries no gradient of its own); a clipped term has none.
    grads = _grads(losses.gspo, logprobs_D, inputs_D, config)
    assert torch.allclose(grads[0], torch.tensor([0.0, 0.0, 2.0 * s1, 0.0], dtype=torch.float64))
    assert torch.allclose(grads[1], torch.tensor([0.0, s2, -3.0 * s2], dtype=torch.float64))


def test_dro():
    logprobs_D, inputs_D = _policy_batch()
    config = losses.resolve_config("dro", {"beta": 0.5})
    loss, _ = losses.dro(logprobs_D, inputs_D, config)
    expected = 0.0
    for lp, x in zip(_numpy(logprobs_D), inputs_D, strict=True):
        q, a, w = x["logprobs"].numpy(), x["advantages"].numpy(), x["weights"].numpy()
        expected -= (w * (lp * a - 0.25 * (lp - q) ** 2)).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for grad, lp, x in zip(_grads(losses.dro, logprobs_D, inputs_D, config), logprobs_D, inputs_D, strict=True):
        assert torch.allclose(grad, -x["weights"] * (x["advantages"] - 0.5 * (lp.detach() - x["logprobs"])))
    _gradcheck(losses.dro, logprobs_D, inputs_D, config)


def test_dpo_matches_the_standard_sigmoid_dpo_formula():
    # Two pairs; prompt tokens (weight 0) must not count.
    lengths = [5, 4, 3, 6]
    logprobs_D = [(-_rand(30 + i, n).abs()).requires_grad_() for i, n in enumerate(lengths)]
    inputs_D = [{"weights": torch.tensor([0.0, 0.0] + [1.0] * (n - 2), dtype=torch.float64),
                 "ref_logprobs": -_rand(40 + i, n).abs()} for i, n in enumerate(lengths)]
    beta = 0.3
    loss, metrics = losses.dpo(logprobs_D, inputs_D, {"beta": beta, "label_smoothing": 0.0})

    def sequence_logp(values, weights):  # log pi(y|x) of the response
        return float((values * weights).sum())

    expected_losses, margins = [], []
    for c, r in ((0, 1), (2, 3)):
        pi_c = sequence_logp(logprobs_D[c].detach().numpy(), inputs_D[c]["weights"].numpy())
        pi_r = sequence_logp(logprobs_D[r].detach().numpy(), inputs_D[r]["weights"].numpy())
        ref_c = sequence_logp(inputs_D[c]["ref_logprobs"].numpy(), inputs_D[c]["weights"].numpy())
        ref_r = sequence_logp(inputs_D[r]["ref_logprobs"].numpy(), inputs_D[r]["weights"].numpy())
        logits = beta * ((pi_c - pi_r) - (ref_c - ref_r))  # Rafailov et al. 2023, eq. 7
        expected_losses.append(math.log1p(math.exp(-logits)))
        margins.append(logits)
    assert loss.item() == pytest.approx(sum(expected_losses), rel=1e-12)
    assert metrics["dpo_margin:mean"] == pytest.approx(np.mean(margins))
    assert metrics["dpo_accuracy:mean"] == pytest.approx(np.mean([m > 0 for m in margins]))
    # The gradient of -logsigmoid(z) in z is -sigmoid(-z): on a chosen response token it is -beta*sigmoid(-z).
    grads = _grads(losses.dpo, logprobs_D, inputs_D, {"beta": beta, "label_smoothing": 0.0})
    sigmoid = 1 / (1 + math.exp(margins[0]))
    assert torch.allclose(grads[0], -beta * sigmoid * inputs_D[0]["weights"])
    assert torch.allclose(grads[1], beta * sigmoid * inputs_D[1]["weights"])
    _gradcheck(losses.dpo, logprobs_D, inputs_D, {"beta": beta, "label_smoothing": 0.0})
    # Label smoothing e: -(1 - e) log sigmoid(z) - e log sigmoid(-z) per pair (conservative DPO).
    smoothed, _ = losses.dpo(logprobs_D, inputs_D, {"beta": beta, "label_smoothing": 0.2})
    assert smoothed.item() == pytest.approx(sum(0.8 * math.log1p(math.exp(-z)) + 0.2 * math.log1p(math.exp(z))
                                                for z in margins), rel=1e-12)
    _gradcheck(losses.dpo, logprobs_D, inputs_D, {"beta": beta, "label_smoothing": 0.2})


def test_ipo_and_simpo_match_their_papers_formulas_over_each_replys_mean_token():
    # Two pairs of replies of different lengths; prompt tokens (weight 0) count neither in the sums nor the lengths.
    lengths = [5, 4, 3, 6]
    logprobs_D = [(-_rand(50 + i, n).abs()).requires_grad_() for i, n in enumerate(lengths)]
    inputs_D = [{"weights": torch.tensor([0.0, 0.0] + [1.0] * (n - 2), dtype=torch.float64),
                 "ref_logprobs": -_rand(60 + i, n).abs()} for i, n in enumerate(lengths)]

    def mean_reply(values, index):  # a reply's mean over its n - 2 tokens
        return float(np.asarray(values)[2:].mean())

    pi = [mean_reply(lp.detach().numpy(), i) for i, lp in enumerate(logprobs_D)]
    ref = [mean_reply(x["ref_logprobs"].numpy(), i) for i, x in enumerate(inputs_D)]
    # IPO (Azar et al. 2023, eq. 17, per-token means as TRL): (h - 1/(2 tau))^2, h the log-ratio difference.
    tau = 0.25
    h = [(pi[c] - ref[c]) - (pi[r] - ref[r]) for c, r in ((0, 1), (2, 3))]
    loss, metrics = losses.ipo(logprobs_D, inputs_D, {"beta": tau})
    assert loss.item() == pytest.approx(sum((value - 1 / (2 * tau)) ** 2 for value in h), rel=1e-12)
    assert metrics["dpo_margin:mean"] == pytest.approx(np.mean(h))
    assert metrics["dpo_accuracy:mean"] == np.mean([value > 0 for value in h])
    assert metrics["dpo_chosen_reward:mean"] == pytest.approx(np.mean([pi[0] - ref[0], pi[2] - ref[2]]))
    # d loss / d logp_t on a chosen reply token: 2 (h - 1/(2 tau)) / (reply length).
    grads = _grads(losses.ipo, logprobs_D, inputs_D, {"beta": tau})
    assert torch.allclose(grads[0], 2 * (h[0] - 2) / 3 * inputs_D[0]["weights"])
    assert torch.allclose(grads[3], -2 * (h[1] - 2) / 4 * inputs_D[3]["weights"])
    _gradcheck(losses.ipo, logprobs_D, inputs_D, {"beta": tau})
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (mean logp_c - mean logp_r) - gamma); no reference.
    beta, gamma = 2.0, 0.7
    loss, metrics = losses.simpo(logprobs_D, [{"weights": x["weights"]} for x in inputs_D],
                                 {"beta": beta, "gamma": gamma})
    z = [beta * (pi[c] - pi[r]) - gamma for c, r in ((0, 1), (2, 3))]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-value)) for value in z), rel=1e-12)
    assert metrics["dpo_margin:mean"] == pytest.approx(np.mean([value + gamma for value in z]))
    assert metrics["dpo_rejected_reward:mean"] == pytest.approx(beta * np.mean([pi[1], pi[3]]))
    _gradcheck(losses.simpo, logprobs_D, [{"weights": x["weights"]} for x in inputs_D], {"beta": beta, "gamma": gamma})
    assert losses.PAIR_LOSSES == ("dpo", "ipo", "simpo")
    assert losses.resolve_config("simpo", None) == {"beta": 2.0, "gamma": 1.0}
    assert losses.LOSSES["simpo"].reference_input is None and losses.LOSSES["ipo"].reference_input == "ref_logprobs"


def test_resolve_config_names_what_is_wrong():
    assert losses.resolve_config("dpo", {"beta": "0.5"}) == {"beta": 0.5, "label_smoothing": 0.0}
    with pytest.raises(ValueError, match="loss_fn 'mse' is unknown"):
        losses.resolve_config("mse", None)
    with pytest.raises(ValueError, match=r"loss_fn_config\['clip'\] is not used by ppo"):
        losses.resolve_config("ppo", {"clip": 0.2})
    with pytest.raises(ValueError, match=r"loss_fn_config\['beta'\] must be a number"):
        losses.resolve_config("dro", {"beta": "high"})
    with pytest.raises(ValueError, match="takes no config"):
        losses.resolve_config("cross_entropy", {"beta": 1.0})


def test_merge_metrics_by_reduction():
    parts = [({"loss:sum": 1.0, "acc:mean": 1.0, "lo:min": 3.0, "hi:max": 1.0}, 3),
             ({"loss:sum": 2.0, "acc:mean": 0.0, "lo:min": 2.0, "hi:max": 5.0}, 1)]
    assert losses.merge_metrics(parts) == {"loss:sum": 3.0, "acc:mean": 0.75, "lo:min": 2.0, "hi:max": 5.0}
    # A mean the loss gives with its own weight (a clip fraction over 3 trained tokens, then over 1) is weighted by
    # it, not by the datums; a micro-batch with nothing to weigh counts for nothing.
    parts = [({"clip_fraction:mean": (2 / 3, 3.0)}, 1), ({"clip_fraction:mean": (0.0, 1.0)}, 5),
             ({"clip_fraction:mean": (0.0, 0.0)}, 2)]
    assert losses.merge_metrics(parts) == {"clip_fraction:mean": pytest.approx(2 / 4)}
    assert losses.merge_metrics([({"clip_fraction:mean": (0.0, 0.0)}, 2)]) == {"clip_fraction:mean": 0.0}
