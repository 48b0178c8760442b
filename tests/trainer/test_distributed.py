"""The trainer on two processes (torchrun, gloo, FSDP2) computes what one process computes.

Learner level (tests/utils/fsdp_driver.py, fixed samples): three steps of the policy's update on 1 and on 2
processes, LoRA (one micro-batch per rank) and full fine-tuning (several, unevenly many: stand-in passes) in float32: each step's loss and gradient norm within 1e-5, the
whole trainable weights after every step within 1e-5, the published version (gathered to rank 0) the
same files and tensors. A checkpoint written on 2 processes resumes on 1, and one written on 1 on 2,
and the next step equals the straight run's.

Run level (real services, `opd train --nproc 2`): a run killed after step 4 (checkpointed at 3) and
resumed on 2 processes, then continued to step 8 on 1 process from the 2-process checkpoint, equals a
straight one-process run record for record (1e-4) with its final weights within 1e-5.

The learning rate warms up over 3 optimizer steps and decays linearly after (the schedule's state travels
with a checkpoint). Adam's epsilon is 1e-3 here, not 1e-8: Adam's first steps move each weight by about lr * sign(gradient),
and a gradient that is 0 up to float32 noise (summed in another order on 2 ranks) then takes either sign;
with epsilon 1e-3 such a weight moves by noise * lr / 1e-3 instead. With 1e-8 the trajectories of 1 and
2 processes part by 1e-4 after one step of full fine-tuning (measured), through those weights alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from opd.trainer.checkpoint import read_trainable
from opd.trainer.config import build_config
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from tests.trainer.test_resume import kill_after

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TOLERANCE = 1e-5

def drive(out: Path, config: Path, nproc: int, *args: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-m", "tests.utils.fsdp_driver"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "tests.utils.fsdp_driver"]
    done = subprocess.run([*launch, str(out), str(config), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out

def policy_config(student_model: Path, tmp: Path, finetune: str, micro_batch_tokens: int = 64) -> Path:
    config = build_config({
        "student": {"model": str(student_model), "dtype": "float32", "device": "cpu", "finetune": finetune,
                    "micro_batch_tokens": micro_batch_tokens, "lora": {"rank": 4, "alpha": 8}},
        "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "prompts.jsonl"},
        "optimizer": {"lr": 0.01, "eps": 1e-3, "warmup_steps": 3, "decay": "linear"}, "substeps": 2, "steps": 4,
    }, environ={})
    path = tmp / f"{finetune}.json"
    path.write_text(config.model_dump_json())
    return path

def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out

# LoRA: each rank's share in one micro-batch; full: 20-token micro-batches, so the ranks run different numbers of
# them and the one with fewer runs stand-in passes (update.py) to keep FSDP's collectives paired, on a student
# whose output layer is its input embedding (tied, as SmolLM2's: one parameter in FSDP's root group).
MICRO_BATCH_TOKENS = {"lora": 64, "full": 20}

@pytest.fixture(scope="module", params=["lora", "full"])
def runs(request, student_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """(finetune, config, the 1-process run, the 2-process run): 3 steps each, state saved after step 2."""
    from tests.utils.tiny_models import build_llama

    tmp = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    if request.param == "full":
        student_model = build_llama(tmp / "tied", student_model, seed=2, layers=2, init_std=0.02, tied=True)
    config = policy_config(student_model, tmp, request.param, MICRO_BATCH_TOKENS[request.param])
    args = ("--steps", "3", "--save-after", "2", "--version-after", "3")
    return request.param, config, drive(tmp / "one", config, 1, *args), drive(tmp / "two", config, 2, *args)

def test_two_processes_train_as_one(runs, student_model: Path) -> None:
    from transformers import AutoTokenizer

    from tests.utils.fsdp_driver import samples_of

    finetune, _, one, two = runs
    a, b = json.loads((one / "steps.json").read_text()), json.loads((two / "steps.json").read_text())
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # warm-up over 3 optimizer steps, then linear decay over the run's 8 (4 steps x 2 substeps): each step's first
    assert [r["lr"] for r in a] == pytest.approx([0.01 / 3, 0.01, 0.01 * 4 / 5])
    vocab = min(len(AutoTokenizer.from_pretrained(student_model)), 400)
    for record in b:  # the work was split: every rank trained on a part, together on the whole step
        step_tokens = sum(len(s.prompt_ids) + len(s.token_ids) for s in samples_of(record["step"], vocab))
        assert 0 < record["rank_tokens/0"] < step_tokens and 0 < record["rank_tokens/1"] < step_tokens, record
        assert record["rank_tokens/0"] + record["rank_tokens/1"] == step_tokens
    assert "rank_tokens/0" not in a[0], "one process writes the records it always did"
    idle = sum(r["idle_micro_batches"] for r in b)
    assert (idle > 0) == (finetune == "full"), f"{idle} stand-in passes with {MICRO_BATCH_TOKENS[finetune]}-token micro-batches"
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "lr", "ratio_mean", "ratio_min", "ratio_max"):
            assert rb[key] == pytest.approx(ra[key], abs=TOLERANCE), (ra["step"], key, ra[key], rb[key])
        assert ra["skipped_updates"] == rb["skipped_updates"] == 0
    start = None
    for step in (1, 2, 3):
        wa, wb = torch.load(one / f"weights-{step}.pt"), torch.load(two / f"weights-{step}.pt")
        assert max_difference(wa, wb) < TOLERANCE, step
        start = start or wa
    moved = max_difference(start, torch.load(one / "weights-3.pt"))
    assert moved > 100 * TOLERANCE, "the weights moved well beyond the tolerance (the comparison means something)"
    files = sorted(p.name for p in (one / "version-3").iterdir())
    assert files == sorted(p.name for p in (two / "version-3").iterdir())
    assert ("adapter_model.safetensors" if finetune == "lora" else "model.safetensors") in files
    if finetune == "full":  # tied: the version holds the embedding once, and the 2-process one loads tied
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(two / "version-3")
        assert loaded.config.tie_word_embeddings and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        one_process = tensors(one / "version-3")["model.embed_tokens.weight"]
        assert (loaded.model.embed_tokens.weight.detach() - one_process).abs().max() < TOLERANCE
    assert max_difference(tensors(one / "version-3"), tensors(two / "version-3")) < TOLERANCE

@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, saved_on: int, resumed_on: int, tmp_path: Path) -> None:
    _, config, one, two = runs
    saved = (one, two)[saved_on - 1] / "ckpt-2"
    resumed = drive(tmp_path / "resumed", config, resumed_on, "--load", str(saved), "--first", "3", "--steps", "1")
    straight = json.loads((one / "steps.json").read_text())[2]
    record = json.loads((resumed / "steps.json").read_text())[0]
    assert record["step"] == 3
    for key in ("loss", "grad_norm"):
        assert record[key] == pytest.approx(straight[key], abs=TOLERANCE), key
    assert max_difference(torch.load(one / "weights-3.pt"), torch.load(resumed / "weights-3.pt")) < TOLERANCE

def train_process(config_file: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "opd", "train", str(config_file), "--no-progress", *args],
                            cwd=REPO, env=ENV, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

def finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    return log

def test_a_run_on_two_processes_resumes_and_continues_on_one(make_config, services, tmp_path: Path) -> None:
    common = dict(save_every=3, eval__every=3, optimizer__eps=1e-3)
    straight = make_config(name="straight", steps=8, output_dir=str(tmp_path / "straight"), **common)
    assert Trainer(straight).run() == "completed"

    run = make_config(name="fsdp", steps=6, output_dir=str(tmp_path / "fsdp"), **common)
    config_file = tmp_path / "fsdp.yaml"
    config_file.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    out = Path(run.output_dir)
    kill_after(train_process(config_file, "--nproc", "2"), out / "metrics.jsonl", 4)
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-000003"]
    log = finish(train_process(config_file, "--nproc", "2"))
    assert f"resuming from {out / 'checkpoints' / 'step-000003'}" in log, log[-3000:]
    assert "trainer process 0 of 2" in log, "two processes trained"
    log = finish(train_process(config_file, "--set", "steps=8"))  # one process, from the 2-process checkpoint
    assert f"resuming from {out / 'checkpoints' / 'step-000006'}" in log

    a, b = read_records(Path(straight.output_dir) / "metrics.jsonl"), read_records(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"], (ra["kind"], ra["step"])
        for key in ("teacher_kl", "entropy", "loss", "grad_norm", "ratio_mean"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["kind"], ra["step"], key)
    final = "step-000008"
    wa = read_trainable(Path(straight.output_dir) / "checkpoints" / final)
    wb = read_trainable(out / "checkpoints" / final)
    assert max_difference(wa, wb) < TOLERANCE
    assert any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k), "the adapter trained"

def bf16_config(student_model: Path, tmp: Path, finetune: str, precision: str = "mixed", lr: float = 1e-5) -> Path:
    config = build_config({
        "student": {"model": str(student_model), "dtype": "bfloat16", "precision": precision, "device": "cpu",
                    "finetune": finetune, "micro_batch_tokens": 64, "lora": {"rank": 4, "alpha": 8}},
        "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "prompts.jsonl"},
        "optimizer": {"lr": lr, "eps": 1e-3},
    }, environ={})
    path = tmp / f"bf16-{finetune}-{precision}.json"
    path.write_text(config.model_dump_json())
    return path

@pytest.mark.parametrize(("nproc", "precision"), [(2, "mixed"), (1, "mixed"), (1, "pure")])
def test_bf16_full_fine_tuning_keeps_float32_weights_unless_pure(nproc: int, precision: str, student_model: Path,
                                                                 tmp_path: Path) -> None:
    """bfloat16 is mixed precision on one process as on two (float32 weights, bf16 compute): a step at lr 1e-5
    moves nearly every weight; `precision: pure` keeps bf16 weights (spacing 1.2e-4 at 0.02) and most updates
    round away."""
    from safetensors.torch import load_file

    out = drive(tmp_path / "run", bf16_config(student_model, tmp_path, "full", precision), nproc, "--steps", "1",
                "--version-after", "1")
    after, before = torch.load(out / "weights-1.pt"), load_file(str(student_model / "model.safetensors"))
    assert {v.dtype for v in after.values()} == {torch.float32 if precision == "mixed" else torch.bfloat16}
    blocks = [k for k in after if "layers." in k]  # the embedding rows of tokens no sample holds get no gradient
    moved = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in blocks) / sum(after[k].numel() for k in blocks)
    assert moved > 0.9 if precision == "mixed" else moved < 0.5, f"{moved:.3f} of the weights moved"
    assert math.isfinite(json.loads((out / "steps.json").read_text())[0]["loss"])
    assert {v.dtype for v in tensors(out / "version-1").values()} == {torch.bfloat16}, "versions are written in bf16"

def test_bf16_lora_trains_alike_on_one_process_and_two(student_model: Path, tmp_path: Path) -> None:
    """LoRA in bfloat16: the frozen base in bf16, float32 adapters, bf16 compute (autocast on one process, FSDP's
    casts on two): two steps agree within bf16's resolution, and the adapters moved well beyond it."""
    config = bf16_config(student_model, tmp_path, "lora", lr=0.01)
    one, two = (drive(tmp_path / name, config, n, "--steps", "2") for name, n in (("one", 1), ("two", 2)))
    a, b = json.loads((one / "steps.json").read_text()), json.loads((two / "steps.json").read_text())
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-2, abs=1e-3), (ra, rb)
    wa, wb, start = torch.load(one / "weights-2.pt"), torch.load(two / "weights-2.pt"), torch.load(one / "weights-1.pt")
    assert {v.dtype for v in wa.values()} == {v.dtype for v in wb.values()} == {torch.float32}

    apart, moved = max_difference(wa, wb), max_difference(start, wa)
    assert apart < 1e-3 and moved > 5 * apart, (apart, moved)
