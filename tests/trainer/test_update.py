"""The trainer's update on a real tiny student in-process (no services):
top-p sampling stays on-policy, micro-batches accumulate the gradient of one
batch, and a non-finite step is skipped.

The samples come from the student's own hf rollout engine, which reports the
logprobs of the distribution it drew from (after temperature and top-p), as
the vLLM engine does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd.common.settings import StudentSettings
from opd.student.engine import Sampling
from opd.student.hf_engine import HFRolloutEngine
from opd.trainer.config import RunConfig, build_config
from opd.trainer.policy import Policy
from opd.trainer.rollouts import Sample
from opd.trainer.update import accumulate, advantages, train_on

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 200, 9, 31, 2], [300, 301]]


def config(student_model: Path, **overrides) -> RunConfig:
    data = {"student": {"model": str(student_model), "dtype": "float32", "device": "cpu", "finetune": "full"},
            "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "p.jsonl"},
            "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 12}, "optimizer": {"lr": 1e-3}}
    return build_config(data, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()], environ={})


def sampled(student_model: Path, temperature: float, top_p: float, seed: int = 0) -> list[Sample]:
    engine = HFRolloutEngine(StudentSettings(model=str(student_model), engine="hf", dtype="float32", device="cpu"))
    groups = engine.sample_sync(PROMPTS, Sampling(n=2, max_tokens=12, temperature=temperature, top_p=top_p, seed=seed))
    return [Sample(i, prompt, s.token_ids, s.logprobs, s.text, s.finish_reason, {}, [x - 0.5 for x in s.logprobs])
            for i, (prompt, group) in enumerate(zip(PROMPTS, groups, strict=True)) for s in group]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.7), (0.8, 0.9)])
def test_top_p_samples_train_on_policy(student_model: Path, temperature: float, top_p: float) -> None:
    """The trainer scores the nucleus the student sampled from: the importance ratio is 1 at every token.
    Scored at top-p 1, the ratio would be the nucleus mass Z < 1 (shown below), which scales the
    importance-sampling gradient by Z and zeroes PPO's gradient on negative advantages once Z < 1 - clip."""
    samples = sampled(student_model, temperature, top_p)
    run = config(student_model, sampling__temperature=temperature, sampling__top_p=top_p)
    update = train_on(Policy(run), samples, run)
    assert 0.9999 < update["ratio_min"] <= update["ratio_max"] < 1.0001, update

    policy = Policy(run)
    with torch.no_grad():
        full = policy.logprobs([s.prompt_ids + s.token_ids for s in samples], [len(s.prompt_ids) for s in samples],
                               temperature, top_p=1.0)
    mass = torch.cat([lp - torch.tensor(s.sampling_logprobs) for lp, s in zip(full, samples, strict=True)]).exp()
    assert mass.max() < 1.0001 and mass.min() < 0.95, "top-p cut off part of the mass somewhere"


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_non_finite_loss_leaves_the_weights_alone(student_model: Path, bad: float) -> None:
    """One teacher logprob that is NaN (or -inf: an infinite reverse KL) makes the loss and the gradient
    non-finite: the optimizer step is skipped and reported, weights and optimizer state stay untouched,
    and the next finite step trains as usual."""
    run = config(student_model, substeps=2)
    policy = Policy(run)
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    samples = sampled(student_model, 1.0, 1.0)
    poisoned = [Sample(s.group, s.prompt_ids, s.token_ids, s.sampling_logprobs, s.text, s.finish_reason, s.row,
                       list(s.teacher_logprobs)) for s in samples]
    poisoned[0].teacher_logprobs[1] = bad  # the first substep's chunk; the second is clean
    update = train_on(policy, poisoned, run)
    after = dict(policy.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values()), "no NaN reached the weights"
    assert update["skipped_updates"] == 1 and not torch.isfinite(torch.tensor(update["loss"]))
    assert policy.scheduler.last_epoch == 1, "one update taken, one skipped"

    clean = Policy(run)  # the same start, only the clean second substep applied
    half = len(samples) // 2
    train_on(clean, samples[half:], config(student_model, substeps=1))
    for name, p in clean.model.named_parameters():
        assert torch.equal(p, after[name]), name
    assert any(not torch.equal(before[k], after[k]) for k in before), "the clean substep trained"


def test_micro_batches_accumulate_the_gradient_of_one_batch(student_model: Path) -> None:
    """The same samples in one forward, or in micro-batches of at most two sequences, give the same loss and
    gradient: each micro-batch's loss is normalised by the whole chunk's tokens, so their sum is the chunk's."""
    samples = sampled(student_model, 1.0, 1.0, seed=3)
    longest = max(len(s.prompt_ids) + len(s.token_ids) for s in samples)
    results = []
    for budget in (100_000, 2 * longest):
        run = config(student_model, student__micro_batch_tokens=budget)
        policy = Policy(run)
        loss, stats, _ = accumulate(policy, samples, advantages(samples, run, None), run)
        grads = {name: p.grad.clone() for name, p in policy.model.named_parameters() if p.grad is not None}
        results.append((loss, len(stats), grads))
    (loss_one, forwards_one, grads_one), (loss_micro, forwards_micro, grads_micro) = results
    assert forwards_one == 1 and forwards_micro >= len(samples) // 2
    assert loss_micro == pytest.approx(loss_one, rel=1e-5) and loss_one != 0
    assert grads_one.keys() == grads_micro.keys() and len(grads_one) > 0
    for name, g in grads_one.items():
        assert torch.allclose(grads_micro[name], g, rtol=1e-4, atol=1e-7), name


def test_a_runs_torch_threads_end_with_its_policy(student_model: Path) -> None:
    """`student.torch_threads` is process-wide: a trainer service that ran one run with it gives the next run
    its own thread count back when the run's policy closes."""
    before = torch.get_num_threads()
    policy = Policy(config(student_model, student__torch_threads=before + 1))
    assert torch.get_num_threads() == before + 1
    policy.close()
    assert torch.get_num_threads() == before
