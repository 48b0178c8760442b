"""The three arms' losses (opd, rl, sft) on hand-made tensors, against plain loops,
and each arm's choice of rewards and loss inside one update of a real tiny student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd.trainer import loss as L
from opd.trainer.config import ConfigError, build_config
from opd.trainer.objectives import accuracies, step_counts, step_rewards
from opd.trainer.rollouts import Sample, kl_summary
from opd.trainer.update import advantages, chunk_loss
from tests.trainer.test_loss import completion, loop_loss, make_batch


def test_rl_advantage_is_the_centred_reward_on_every_completion_token() -> None:
    spans, _, _, _, mask = make_batch(8)
    rewards = torch.tensor([1.0, 0.0, 0.25, -2.0])
    adv = L.reward_advantages(rewards, mask)
    for b, span in enumerate(spans):
        assert completion(adv[b].tolist(), span) == [rewards[b].item()] * span[1]
    assert torch.all(adv[mask == 0] == 0)


@pytest.mark.parametrize("seed", [0, 9])
def test_rl_loss_matches_loops(seed: int) -> None:
    spans, theta, sampling, _, mask = make_batch(seed)
    raw = [1.0, 0.0, 0.0, 1.0]  # two prompts of two samples each: verifier rewards
    centred = torch.cat([L.group_centered(torch.tensor(raw[:2])), L.group_centered(torch.tensor(raw[2:]))])
    assert centred.tolist() == [0.5, -0.5, -0.5, 0.5]
    adv = L.reward_advantages(centred, mask)
    n = int(mask.sum())
    got = L.importance_sampling_loss(theta, sampling, adv, mask, n)
    loop_adv = [[centred[b].item()] * span[1] for b, span in enumerate(spans)]
    assert got.item() == pytest.approx(loop_loss(theta.tolist(), sampling.tolist(), loop_adv, spans), rel=1e-5)


@pytest.mark.parametrize("seed", [1, 2])
def test_sft_loss_is_the_mean_negative_log_likelihood(seed: int) -> None:
    spans, theta, _, _, mask = make_batch(seed)
    n = int(mask.sum())
    expected = -sum(sum(completion(theta[b].tolist(), span)) for b, span in enumerate(spans)) / n
    got = L.sft_loss(theta, mask, n)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    leaf = torch.where(mask.bool(), theta, torch.zeros_like(theta)).requires_grad_(True)
    L.sft_loss(leaf, mask, n).backward()
    assert torch.allclose(leaf.grad, -mask / n), "every real token pulled up equally, nothing else touched"


def samples_by_hand() -> list[Sample]:
    """Two prompts x two samples; per-token sampler and teacher logprobs chosen by hand."""
    spec = [  # group, prompt ids, completion ids, sampling logprobs, teacher logprobs, text
        (0, [1, 20, 21], [30, 31, 2], [-1.0, -0.5, -0.2], [-0.4, -0.5, -1.0], "yes indeed"),
        (0, [1, 20, 21], [40, 2], [-2.0, -0.1], [-3.0, -0.1], "no"),
        (1, [1, 22], [30, 2], [-0.3, -0.3], [-0.3, -0.9], "yes"),
        (1, [1, 22], [41, 42, 43, 2], [-1.5, -1.0, -0.7, -0.2], [-2.5, -1.0, -0.2, -0.2], "maybe"),
    ]
    return [Sample(g, pr, tok, sl, text, "stop", {"prompt": "q"}, teacher_logprobs=tl) for g, pr, tok, sl, tl, text in spec]


def says_yes(row: dict, text: str) -> bool:
    return text.startswith("yes")


def test_each_arm_takes_its_own_rewards() -> None:
    samples = samples_by_hand()
    assert step_rewards("opd", samples, None, says_yes) == (None, None), "opd learns from the teacher alone"
    assert step_rewards("sft", samples, None, says_yes) == (None, None)
    raw, centred = step_rewards("rl", samples, None, says_yes)
    assert raw == [1.0, 0.0, 1.0, 0.0] and centred == [0.5, -0.5, 0.5, -0.5]
    raw, centred = step_rewards("rl", samples, lambda row, text: len(text), says_yes)
    assert raw == [10.0, 2.0, 3.0, 5.0] and centred == [4.0, -4.0, -1.0, 1.0], "a reward_fn goes before the verifier"
    counts = step_counts("rl", samples, says_yes)
    assert counts == {"tokens_sampled": 11, "tokens_scored": 0, "tokens_trained": 11, "train_accuracy": 0.5}
    assert step_counts("opd", samples, None)["tokens_scored"] == 11
    measured = step_counts("opd", samples, says_yes, {"long": lambda row, text: len(text) > 2})
    assert measured["train_accuracy"] == 0.5 and measured["train_accuracy_long"] == 0.75
    assert accuracies(samples, None, {"all": lambda row, text: True}) == {"accuracy_all": 1.0}
    assert accuracies([], says_yes, {}) == {"accuracy": 0.0}
    unscored = [Sample(s.group, s.prompt_ids, s.token_ids, s.sampling_logprobs, s.text, "stop", s.row) for s in samples]
    assert "teacher_kl" not in kl_summary(unscored) and kl_summary(samples)["teacher_kl"] == pytest.approx(2.3 / 11)


@pytest.fixture(scope="module")
def policy_of(student_model: Path):
    from opd.trainer.policy import Policy

    made = {}

    def make(objective: str):
        config = build_config({
            "student": {"model": str(student_model), "finetune": "full", "device": "cpu", "torch_threads": 1},
            "teacher_urls": "http://t", "student_url": "http://s", "teacher_sampler_url": "http://ts",
            "dataset": {"path": "d.jsonl"}, "objective": objective, "eval": {"verifier": "tests.trainer.test_objectives:says_yes"},
        }, environ={})
        if "policy" not in made:
            made["policy"] = Policy(config)
        return made["policy"], config

    return make


@pytest.mark.parametrize("objective", ["opd", "rl", "sft"])
def test_one_update_uses_the_arms_loss(policy_of, objective: str) -> None:
    policy, config = policy_of(objective)
    samples = samples_by_hand()
    _, rewards = step_rewards(objective, samples, None, says_yes)
    adv = advantages(samples, config, rewards)
    n = sum(len(s.token_ids) for s in samples)
    got, _ = chunk_loss(policy, samples, adv, config, n)
    with torch.no_grad():
        theta = policy.logprobs([s.prompt_ids + s.token_ids for s in samples], [len(s.prompt_ids) for s in samples])
    total = 0.0
    for s, th in zip(samples, theta, strict=True):
        for t, logp in enumerate(th.tolist()):
            if objective == "sft":
                total += logp  # log-likelihood of the given tokens, no ratio, no teacher
            else:
                a = -(s.sampling_logprobs[t] - s.teacher_logprobs[t]) if objective == "opd" else {0: 0.5, 1: -0.5}[
                    int(not says_yes({}, s.text))]
                total += torch.exp(torch.tensor(logp - s.sampling_logprobs[t])).item() * a
    assert got.item() == pytest.approx(-total / n, rel=1e-4)


def test_arms_refuse_configs_they_cannot_run() -> None:
    base = {"student": {"model": "m"}, "teacher_urls": "http://t", "student_url": "http://s", "dataset": {"path": "d"}}
    with pytest.raises(ConfigError, match="objective sft: give teacher_sampler_url"):
        build_config(base, ["objective=sft"], environ={})
    with pytest.raises(ConfigError, match="objective rl: give reward_fn or eval.verifier"):
        build_config(base, ["objective=rl"], environ={})
    with pytest.raises(ConfigError, match="objective"):
        build_config(base, ["objective=ppo"], environ={})
    assert build_config(base, ["objective=rl", "eval.verifier=a.b:c"], environ={}).objective == "rl"
