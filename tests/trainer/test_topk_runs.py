"""The teacher's top-k in a run (issue 41): `loss.distill` topk_forward / topk_reverse and their mix with the
sampled-token loss, from the config through scoring and the update to the records.

- set-up refusals, at the unit level: a top-k loss with objective rl or sft, a top_k outside 1..20 or above a
  teacher's advertised max_top_k, a weight outside [0, 1]; stock teachers are allowed (both return top-k), and
  so are teachers of another tokenizer (test_topk_aligned.py);
- scoring asks the teacher for top_k only with a top-k loss (the default request is what it always was) and
  keeps exactly k distinct ids per token;
- the update in-process on the tiny student, the teacher's top-k from the tiny teacher's hf engine: finite
  losses and the top-k statistics; `sampled` is unchanged to the bit (a top-k loss at weight 0 gives today's
  loss and gradient exactly, and the sampled records gain no field);
- short real runs (hf teacher and student services, real HTTP) with topk_forward and with a topk_reverse mix:
  they complete, the records carry topk_kl / topk_mass / topk_misses / topk_unaligned / sampled_loss, finite,
  topk_unaligned 0 (a teacher of the student's tokenizer), and the teacher
  was asked top_k (the update refuses a sample without the teacher's top-k; the access log shows the requests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd.common import protocol as p
from opd.common.process import ServiceProcess
from opd.common.settings import StudentSettings
from opd.student.engine import Sampling
from opd.student.hf_engine import HFRolloutEngine
from opd.teacher.engine import ScoreJob
from opd.trainer import topk as T
from opd.trainer.config import ConfigError, RunConfig, build_config
from opd.trainer.loop import Trainer, asked_top_k, check_top_k
from opd.trainer.metrics import read_records
from opd.trainer.policy import Policy
from opd.trainer.rollouts import Sample, ScoreMismatch, keep_topk, score_chunk
from opd.trainer.update import accumulate, advantages, train_on
from tests.trainer.runs import base_run, build, hf_args, started

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [100, 7, 200, 9, 31, 2], [300, 301]]
TOPK_FIELDS = {"topk_kl", "topk_mass", "topk_misses", "topk_unaligned", "sampled_loss"}


def config(**overrides) -> RunConfig:
    data = {"student": {"model": "m", "dtype": "float32", "device": "cpu", "finetune": "full"},
            "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "p.jsonl"},
            "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 12}, "optimizer": {"lr": 1e-3},
            "teacher_sampler_url": "http://sampler", "reward_fn": "m:f"}
    return build_config(data, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()], environ={})


# ------------------------------------------------------------------ set-up refusals
@pytest.mark.parametrize("objective", ["rl", "sft"])
def test_a_topk_loss_needs_objective_opd(objective: str) -> None:
    with pytest.raises(ConfigError, match="loss.distill topk_forward: .*objective opd"):
        config(objective=objective, loss__distill="topk_forward")
    assert config(objective=objective).loss.distill == "sampled"


@pytest.mark.parametrize(("field", "value"), [("top_k", 0), ("top_k", 21), ("topk_weight", 1.5),
                                              ("topk_weight", -0.1), ("distill", "topk")])
def test_bad_topk_settings_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        config(**{f"loss__{field}": value})


def info(**limits: int) -> p.ServiceInfo:
    return p.ServiceInfo(service="teacher", model="t", engine="hf", vocab_size=512, tokenizer_fingerprint="",
                         max_model_len=64, limits=limits)


def test_top_k_above_a_teachers_limit_is_refused_at_set_up() -> None:
    run = config(loss__distill="topk_reverse", loss__top_k=8)
    assert asked_top_k(run) == 8 and asked_top_k(config(loss__top_k=8)) == 0
    check_top_k(run, {"default": [info(max_top_k=20)]})
    check_top_k(run, {"default": [info()]})  # a stock server advertises none: allowed (vLLM, SGLang return top-k)
    with pytest.raises(ConfigError, match=r"loss.top_k: 8 .*teacher at http://teacher returns \(max_top_k 4"):
        check_top_k(run, {"default": [info(max_top_k=4)]})
    check_top_k(config(loss__top_k=8), {"default": [info(max_top_k=4)]})  # sampled asks no top-k


@pytest.mark.parametrize("protocol", ["openai", "sglang"])
def test_stock_teachers_may_serve_a_topk_loss(protocol: str) -> None:
    assert config(teacher_protocol=protocol, loss__distill="topk_forward").loss.top_k == 8


# ------------------------------------------------------------------ scoring
def scored(logprobs: list[float], top: list[list[tuple[int, float]]] | None) -> p.SequenceLogprobs:
    rows = None if top is None else [[p.TopLogprob(token_id=i, logprob=lp) for i, lp in row] for row in top]
    return p.SequenceLogprobs(token_ids=[1, 2, 3], start=1, logprobs=logprobs, top_logprobs=rows)


class FakeRemote:
    def __init__(self, top: list[list[tuple[int, float]]] | None) -> None:
        self.top, self.calls = top, []

    def score(self, *args, **kwargs) -> p.LogprobsResponse:
        self.calls.append((args, kwargs))
        return p.LogprobsResponse(model="t", results=[scored([-0.5, -0.25], self.top)], usage=p.Usage())


def sample() -> Sample:
    return Sample(0, [1], [2, 3], [-0.4, -0.3], "ab", "stop", {})


def test_scoring_asks_top_k_only_for_a_topk_loss() -> None:
    remote, s = FakeRemote(None), sample()
    score_chunk(remote, [s], "default")  # type: ignore[arg-type]
    assert remote.calls[0][1] == {} and s.teacher_topk_ids is None  # the call it always was
    remote, s = FakeRemote([[(2, -0.5), (9, -1.5)], [(3, -0.25), (2, -2.0)]]), sample()
    score_chunk(remote, [s], "default", 2)  # type: ignore[arg-type]
    assert remote.calls[0][1] == {"top_k": 2}
    assert s.teacher_logprobs == [-0.5, -0.25]
    assert s.teacher_topk_ids == [[2, 9], [3, 2]] and s.teacher_topk_logprobs == [[-0.5, -1.5], [-0.25, -2.0]]


@pytest.mark.parametrize("top", [None, [[(2, -0.5), (9, -1.5)]], [[(2, -0.5), (9, -1.5)], [(3, -0.2)]],
                                 [[(2, -0.5), (9, -1.5)], [(3, -0.2), (3, -0.2)]]])
def test_a_teacher_topk_of_another_shape_is_refused(top: list | None) -> None:
    with pytest.raises(ScoreMismatch, match="top"):
        keep_topk(sample(), scored([-0.5, -0.25], top), 2)


# ------------------------------------------------------------------ the update, in-process
@pytest.fixture(scope="module")
def topk_samples(student_model: Path, hf_engine) -> list[Sample]:
    """The tiny student's samples (top-p 0.9, temperature 0.8) with the tiny teacher's logprobs and top-8."""
    engine = HFRolloutEngine(StudentSettings(model=str(student_model), engine="hf", dtype="float32", device="cpu"))
    groups = engine.sample_sync(PROMPTS, Sampling(n=2, max_tokens=12, temperature=0.8, top_p=0.9, seed=5))
    samples = [Sample(i, prompt, s.token_ids, s.logprobs, s.text, s.finish_reason, {})
               for i, (prompt, group) in enumerate(zip(PROMPTS, groups, strict=True)) for s in group]
    jobs = [ScoreJob(s.prompt_ids + s.token_ids, len(s.prompt_ids)) for s in samples]
    for s, out in zip(samples, hf_engine.score_sync(jobs, top_k=8), strict=True):
        s.teacher_logprobs = out.logprobs
        s.teacher_topk_ids = [[i for i, _ in row] for row in out.top_logprobs]
        s.teacher_topk_logprobs = [[lp for _, lp in row] for row in out.top_logprobs]
    return samples


def run_config(student_model: Path, **overrides) -> RunConfig:
    return config(student__model=str(student_model), sampling__temperature=0.8, sampling__top_p=0.9,
                  teacher_sampler_url="null", reward_fn="null", **overrides)


def gradients(student_model: Path, samples: list[Sample], run: RunConfig) -> tuple[float, list[dict], dict]:
    policy = Policy(run)
    loss, stats, _ = accumulate(policy, samples, advantages(samples, run, None), run)
    return loss, stats, {n: q.grad.clone() for n, q in policy.model.named_parameters() if q.grad is not None}


def test_sampled_is_unchanged_to_the_bit(student_model: Path, topk_samples: list[Sample]) -> None:
    """A top-k loss at weight 0 is today's loss and gradient exactly; its record adds the top-k fields, the
    sampled run's record adds none."""
    loss, stats, grads = gradients(student_model, topk_samples, run_config(student_model))
    loss0, stats0, grads0 = gradients(student_model, topk_samples,
                                      run_config(student_model, loss__distill="topk_forward", loss__topk_weight=0))
    assert loss0 == loss and grads0.keys() == grads.keys()
    assert all(torch.equal(grads0[n], g) for n, g in grads.items())
    assert set(stats[0]) == {"ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "tokens"}
    assert set(stats0[0]) == set(stats[0]) | TOPK_FIELDS and stats0[0]["sampled_loss"] == loss
    update = train_on(Policy(run_config(student_model)), topk_samples, run_config(student_model))
    assert not TOPK_FIELDS & set(update)


@pytest.mark.parametrize(("distill", "weight"), [("topk_forward", 1.0), ("topk_reverse", 1.0), ("topk_reverse", 0.5)])
def test_topk_losses_train(student_model: Path, topk_samples: list[Sample], distill: str, weight: float) -> None:
    """Finite losses over the student's full distribution (its nucleus at top-p 0.9 would make forward KL
    infinite), the loss the mix of the two parts, and the statistics of the top-k."""
    run = run_config(student_model, loss__distill=distill, loss__topk_weight=weight, substeps=2)
    policy = Policy(run)
    update = train_on(policy, topk_samples, run)
    assert update["skipped_updates"] == 0 and math.isfinite(update["loss"]) and update["grad_norm"] > 0
    assert update["topk_kl"] > 0 and 0 < update["topk_mass"] <= 1
    tokens = sum(len(s.token_ids) for s in topk_samples)
    ids = [i for s in topk_samples for i in s.teacher_topk_ids]
    misses = sum(t not in row for s in topk_samples for t, row in zip(s.token_ids, s.teacher_topk_ids, strict=True))
    assert update["topk_misses"] == misses and len(ids) == tokens and update["topk_unaligned"] == 0
    # the loss is the mix of the sampled part and the mean bucket KL (each substep's, averaged over the two)
    if weight == 1.0:
        assert update["loss"] == pytest.approx(update["topk_kl"], rel=0.2)
    else:
        assert update["sampled_loss"] != update["loss"]


def test_the_topk_loss_is_the_bucket_kl_of_the_full_distribution(student_model: Path, topk_samples: list[Sample]) -> None:
    """The chunk's top-k loss equals topk.py's forward KL over buckets built by hand from the student's full
    log-softmax at the sampling temperature (no nucleus) and the teacher's top-k."""
    run = run_config(student_model, loss__distill="topk_forward")
    policy = Policy(run)
    loss, _, _ = accumulate(policy, topk_samples, advantages(topk_samples, run, None), run)
    expected, tokens = 0.0, sum(len(s.token_ids) for s in topk_samples)
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        for s in topk_samples:
            ids = torch.tensor([s.prompt_ids + s.token_ids])
            logits = policy.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1: -1].float() / 0.8
            logq = T.student_buckets(torch.log_softmax(logits, -1)[None], torch.tensor([s.teacher_topk_ids]))
            logp = T.teacher_buckets(torch.tensor([s.teacher_topk_logprobs]), vocab_size=vocab)
            expected += float(T.topk_forward_kl(logq, logp, torch.ones(1, len(s.token_ids))).sum())
    assert loss == pytest.approx(expected / tokens, rel=1e-4)


# ------------------------------------------------------------------ short real runs
@pytest.fixture(scope="module")
def topk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("topk-checkpoints")


@pytest.fixture(scope="module")
def topk_services(teacher_model: Path, student_model: Path, topk_root: Path,
                  service_logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    """An hf teacher and student on the tiny models, for this module's two runs."""
    with started(service_logs, teacher=("topk-teacher", hf_args("teacher", teacher_model)),
                 student=("topk-student", hf_args("student", student_model, topk_root))) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize(("distill", "weight"), [("topk_forward", 1.0), ("topk_reverse", 0.5)])
def test_a_short_topk_run(topk_services, topk_root: Path, student_model: Path, prompts_file: Path, tmp_path: Path,
                          distill: str, weight: float) -> None:
    urls = {"teacher_urls": [topk_services["teacher"].url], "student_url": topk_services["student"].url}
    run = build(base_run(student_model, prompts_file, tmp_path / "run", topk_root, urls),
                {"name": f"topk-{distill}", "steps": 2, "eval": {"every": 0},
                 "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_tokens": 8},
                 "loss": {"distill": distill, "top_k": 8, "topk_weight": weight}})
    teacher_log = topk_services["teacher"].log_file
    asked_before = teacher_log.read_text().count("/logprobs")
    assert Trainer(run).run() == "completed"
    train = [r for r in read_records(Path(run.output_dir) / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert TOPK_FIELDS <= r.keys() and all(math.isfinite(r[k]) for k in (*TOPK_FIELDS, "loss")), r
        assert r["topk_kl"] > 0 and 0 < r["topk_mass"] <= 1 and 0 <= r["topk_misses"] <= r["tokens"]
        assert r["topk_unaligned"] == 0
    assert teacher_log.read_text().count("/logprobs") >= asked_before + 2  # one scoring request per step at least
