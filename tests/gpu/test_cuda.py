"""The hf engines and `opd up` on a CUDA GPU (marker `gpu`; skipped where CUDA is absent).

- Scoring and sampling on CUDA in float32 against a float32 forward on the CPU.
- A LoRA swap on CUDA: the merged adapter samples what peft on the CPU scores.
- A tiny `opd up` with hf engines on CUDA runs to completion.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from opd.common.settings import StudentSettings, TeacherSettings
from opd.student.engine import Sampling
from tests.student.conftest import Reference, save_lora
from tests.up.test_up import opd, stack_yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATOL = 1e-3  # float32 on CUDA against float32 on the CPU: different kernels, same function


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory, student_model: Path) -> Path:
    root = tmp_path_factory.mktemp("gpu-checkpoints")
    save_lora(student_model, root / "lora-a", seed=5)
    return root


@pytest.fixture(scope="module")
def student(student_model: Path, lora_root: Path):
    from opd.student.hf_engine import HFRolloutEngine

    settings = StudentSettings(model=str(student_model), engine="hf", dtype="float32", device="cuda",
                               checkpoint_root=str(lora_root), max_lora_rank=16)
    return HFRolloutEngine(settings)


def prompts_of(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in ["The boy went home", "Where is the water?", "Write about the old man"]]


def max_error(reference: Reference, version: str, prompts: list[list[int]], groups) -> float:
    worst = 0.0
    for prompt, group in zip(prompts, groups, strict=True):
        for s in group:
            ref = reference.logprobs(version, prompt, s.token_ids)
            worst = max(worst, (torch.tensor(s.logprobs) - ref).abs().max().item())
    return worst


def test_teacher_scores_on_cuda_as_float32_on_the_cpu(teacher_model: Path, hf_engine) -> None:
    from opd.teacher.engine import HFScoringEngine, ScoreJob

    cuda = HFScoringEngine(TeacherSettings(model=str(teacher_model), engine="hf", dtype="float32", device="cuda"))
    assert cuda.model.device.type == "cuda"
    tok = cuda.tokenizer
    jobs = [ScoreJob(tok.encode(t), 2) for t in ["The boy went home to his mother.", "Where is the water? Here.", "Hi"]]
    on_cuda, on_cpu = cuda.score_sync(jobs, top_k=3), hf_engine.score_sync(jobs, top_k=3)
    for a, b in zip(on_cuda, on_cpu, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL)


def test_student_samples_on_cuda_what_the_cpu_scores(student, student_model: Path, lora_root: Path) -> None:
    assert student.graphs is not None  # the CUDA graph path
    prompts = prompts_of(student.tokenizer)
    groups = student.sample_sync(prompts, Sampling(n=4, max_tokens=16, temperature=1.0, seed=0))
    assert not student.graphs.failed
    assert all(len(s.token_ids) > 0 for g in groups for s in g)
    assert max_error(Reference(student_model, lora_root), "base", prompts, groups) < ATOL
    again = student.sample_sync(prompts, Sampling(n=4, max_tokens=16, temperature=1.0, seed=0))
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in groups]


def test_lora_swap_on_cuda(student_model: Path, lora_root: Path) -> None:
    """One engine, one batch shape: the swap makes its one decoder capture its graph again."""
    import asyncio

    from opd.student.hf_engine import HFRolloutEngine

    student = HFRolloutEngine(StudentSettings(model=str(student_model), engine="hf", dtype="float32", device="cuda",
                                              checkpoint_root=str(lora_root), max_lora_rank=16))
    prompts = prompts_of(student.tokenizer)
    before = student.sample_sync(prompts, Sampling(n=2, max_tokens=12, temperature=0.0))
    asyncio.run(student.load_lora(lora_root / "lora-a", 1))
    after = student.sample_sync(prompts, Sampling(n=2, max_tokens=12, temperature=0.0))
    assert [s.token_ids for g in after for s in g] != [s.token_ids for g in before for s in g]
    assert max_error(Reference(student_model, lora_root), "lora-a", prompts, after) < ATOL
    assert student.graphs is not None and not student.graphs.failed and len(student.graphs.idle) == 1


def test_tiny_opd_up_on_cuda(tmp_path: Path, teacher_model: Path, student_model: Path) -> None:
    import yaml

    config = stack_yaml(tmp_path, teacher_model, student_model, steps=3)
    stack = yaml.safe_load(config.read_text())
    for service in ("teacher", "student"):
        stack[service]["engine"] = "hf"
    stack["run"]["student"] = {"device": "cuda"}
    config.write_text(yaml.safe_dump(stack))
    result = opd("up", str(config), mark=uuid.uuid4().hex)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "state: completed after 3 steps" in out
    log = (Path(stack["workdir"]) / "logs" / "student.log").read_text()
    assert "without graphs" not in log
