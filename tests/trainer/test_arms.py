"""The three arms end to end on a tiny model whose skill lives in a prompt.

The skill model (tests/utils/skill_model.py) begins its answers with one word
when its system message asks for it, and rarely otherwise. It serves as the
teacher, given that system message as the run's privileged context, and as the
student, which never sees it (hf engines, real processes, real HTTP). What
must hold (fixed seeds):
- opd raises the verifier's held-out accuracy from the student's base rate to
  most answers, and lowers the held-out teacher KL;
- rl and sft train without asking the teacher (no teacher KL, no scored
  tokens per step); sft's completions come from the teacher sampler given
  the context, so nearly all of them carry the skill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opd.common.process import ServiceProcess
from opd.trainer.config import RunConfig
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from tests.trainer.runs import base_run, build, hf_args, started
from tests.utils.skill_model import SKILL_CONTEXT, build_skill_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def skill_model(models_dir: Path, tiny_tokenizer: Path) -> Path:
    return build_skill_model(models_dir / "skill", tiny_tokenizer)


@pytest.fixture(scope="module")
def skill_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("skill-checkpoints")


@pytest.fixture(scope="module")
def skill_services(skill_model: Path, skill_root: Path, service_logs: Path) -> Iterator[dict[str, ServiceProcess]]:
    with started(service_logs, teacher=("skill-teacher", hf_args("teacher", skill_model)),
                 student=("skill-student", hf_args("student", skill_model, skill_root)),
                 sampler=("skill-teacher-sampler", hf_args("student", skill_model, skill_root / "unused"))) as running:
        yield running


@pytest.fixture
def skill_config(skill_services, skill_model: Path, skill_root: Path, prompts_file: Path, tmp_path: Path) -> Callable[..., RunConfig]:
    def make(**overrides) -> RunConfig:
        urls = {"teacher_urls": [skill_services["teacher"].url], "student_url": skill_services["student"].url,
                "teacher_sampler_url": skill_services["sampler"].url}
        return build(base_run(skill_model, prompts_file, tmp_path / "run", skill_root, urls), {
            "name": "skill",
            "teacher_prompt": {"system": SKILL_CONTEXT},
            "sampling": {"max_tokens": 4},
            "eval": {"every": 4, "samples_per_prompt": 4, "verifier": "tests.trainer.tasks:begins_with_the_skill_word"},
            "steps": 8,
            "save_every": 4,
            "seed": 5,
            "services": {"max_wait_s": 120},
        }, **overrides)

    return make


def run(config: RunConfig) -> tuple[list[dict], list[dict]]:
    assert Trainer(config).run() == "completed"
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def test_opd_moves_the_skill_from_the_teachers_prompt_into_the_student(skill_config) -> None:
    train, evals = run(skill_config(name="skill-opd"))
    accuracy = [round(e["accuracy"], 3) for e in evals]
    kl = [round(e["teacher_kl"], 3) for e in evals]
    print(f"held-out accuracy {accuracy}, teacher KL {kl}")
    assert accuracy[0] < 0.35, f"the student starts without the skill: {accuracy}"
    assert accuracy[-1] > 0.8 and accuracy[-1] > accuracy[0] + 0.45, f"held-out accuracy {accuracy}"
    assert kl[-1] < 0.5 * kl[0], f"held-out teacher KL {kl}"
    assert all(r["tokens_scored"] == r["tokens_sampled"] > 0 for r in train)


@pytest.mark.parametrize("objective", ["rl", "sft"])
def test_rl_and_sft_train_without_the_teacher(skill_config, objective: str) -> None:
    train, evals = run(skill_config(name=f"skill-{objective}", objective=objective, steps=2, eval__every=2))
    assert [e["step"] for e in evals] == [0, 2] and all("teacher_kl" in e and "accuracy" in e for e in evals)
    for r in train:
        assert "teacher_kl" not in r and r["tokens_scored"] == 0 and r["tokens_trained"] == r["tokens_sampled"] > 0
    if objective == "rl":
        assert all("reward_mean" in r for r in train)
    else:  # the teacher sampler got the privileged context: its completions carry the skill
        assert all(r["train_accuracy"] > 0.9 for r in train), [r["train_accuracy"] for r in train]
