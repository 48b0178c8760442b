"""`opd up` end to end on the tiny models: three real services, a real run, a clean stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from opd.common.process import free_port, port_free
from opd.trainer.summary import kl_change, kl_text

pytestmark = pytest.mark.slow


def marked_processes(mark: str) -> list[int]:
    """PIDs of live processes whose environment carries `mark` (children inherit it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stack_yaml(tmp_path: Path, teacher: Path, student: Path, steps: int = 2, ports: dict[str, int] | None = None) -> Path:
    ports = ports or {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about the {w} and the {v}."} for w, v in
            zip("boy house water land earth mother picture country".split(), "day line page world year home hand name".split())]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "workdir": str(tmp_path / "stack"),
        "teacher": {"model": {"path": str(teacher)}, "engine": "vllm", "port": ports.get("teacher", free_port()), "dtype": "float32",
                    "kv_cache_gib": 0.25},
        "student": {"model": {"path": str(student)}, "engine": "vllm", "port": ports.get("student", free_port()), "dtype": "float32",
                    "kv_cache_gib": 0.25},
        "trainer": {"port": ports.get("trainer", free_port())},
        "samples_to_show": 1,
        "run": {
            "steps": steps,
            "dataset": {"path": str(prompts), "eval_size": 2},
            "sampling": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_tokens": 8},
            "eval": {"every": 1, "max_tokens": 8},
            "optimizer": {"lr": 1e-3},
        },
    }
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def opd(*args: str, mark: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPD_TEST_MARK": mark, "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "opd", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def test_up_runs_a_distillation_and_leaves_nothing_behind(tmp_path, teacher_model, student_model) -> None:
    mark = uuid.uuid4().hex
    config = stack_yaml(tmp_path, teacher_model, student_model, steps=2)
    result = opd("up", str(config), mark=mark)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "step   1" in out and "step   2" in out and "teacher KL" in out
    assert "before" in out and "after" in out
    assert "state: completed after 2 steps" in out
    assert "all services stopped" in out
    stack = yaml.safe_load(config.read_text())
    assert (Path(stack["workdir"]) / "logs" / "teacher.log").stat().st_size > 0
    assert (Path(stack["workdir"]) / "run" / "teacher_kl.png").is_file()
    assert marked_processes(mark) == [], "opd up left processes running"
    for name in ("teacher", "student", "trainer"):
        assert port_free("127.0.0.1", stack[name]["port"]), f"{name}'s port is still held"


def first_of_two_replica_ports(taken: list[int]) -> int:
    """A free port P whose second replica's port, P+10, is free too and not among `taken`."""
    for _ in range(100):
        port = free_port()
        if port + 10 not in taken and port_free("127.0.0.1", port + 10):
            return port
    raise AssertionError("no free port P with P+10 free as well")


def test_up_runs_two_student_replicas_each_its_own_process(tmp_path, teacher_model, student_model) -> None:
    """`opd up --set student.replicas=2` (hf engines, to keep it quick) with the stack's single student port P:
    two student processes, on P and P+10, with logs of their own, the run gets both URLs as student_urls,
    each replica loads every version and samples, all stop at the end."""
    mark = uuid.uuid4().hex
    config = stack_yaml(tmp_path, teacher_model, student_model, steps=2)
    stack = yaml.safe_load(config.read_text())
    for service in ("teacher", "student"):
        stack[service]["engine"] = "hf"
    first = first_of_two_replica_ports([stack["teacher"]["port"], stack["trainer"]["port"]])
    stack["student"]["port"] = first  # one port, no replicas: the --set below makes two, as the docs say
    config.write_text(yaml.safe_dump(stack))
    result = opd("up", str(config), "--set", "student.replicas=2", mark=mark)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "state: completed after 2 steps" in out, out[-5000:]
    workdir = Path(stack["workdir"])
    urls = json.loads((workdir / "run" / "config.json").read_text())["student_urls"]
    ports = [first, first + 10]
    assert urls == [f"http://127.0.0.1:{port}" for port in ports]
    for name, url in zip(("student-1", "student-2"), urls, strict=True):
        assert f"ready {name} at {url}" in out
        log = (workdir / "logs" / f"{name}.log").read_text()
        assert log.count("POST /weights") >= 2 + 2 and "POST /rollouts" in log, f"{name} missed versions or samples"
    assert marked_processes(mark) == [], "opd up left processes running"
    assert all(port_free("127.0.0.1", port) for port in ports)


def test_up_refuses_a_taken_port_and_a_missing_model(tmp_path, teacher_model, student_model) -> None:
    mark = uuid.uuid4().hex
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = opd("up", str(stack_yaml(tmp_path, teacher_model, student_model, ports={"student": port})), mark=mark, timeout=120)
    assert result.returncode == 1
    assert f"port {port} (student) on 127.0.0.1 is taken" in result.stdout
    result = opd("up", str(stack_yaml(tmp_path, tmp_path / "nowhere", student_model)), mark=mark, timeout=120)
    assert result.returncode == 1 and "does not exist" in result.stdout
    assert marked_processes(mark) == []


def test_swapping_the_teacher_touches_only_the_teacher(tmp_path, teacher_model, student_model, other_tokenizer_model,
                                                         models_dir, tiny_tokenizer) -> None:
    """The same stack and run config against another teacher: one with the student's tokenizer trains, and so
    does one with another tokenizer, aligned on bytes (its records count the chunks)."""
    from tests.utils.tiny_models import build_llama

    second = build_llama(models_dir / "teacher-2", tiny_tokenizer, seed=11, layers=3, init_std=0.05)
    mark = uuid.uuid4().hex
    outputs = {}
    for name, teacher in (("same-tokenizer", second), ("other-tokenizer", other_tokenizer_model)):
        config = stack_yaml(tmp_path / name, teacher, student_model, steps=1)
        stack = yaml.safe_load(config.read_text())
        for service in ("teacher", "student"):
            stack[service]["engine"] = "hf"  # the swap is about configuration, not engines: keep it quick
        config.write_text(yaml.safe_dump(stack))
        result = opd("up", str(config), mark=mark)
        outputs[name] = (result.returncode, result.stdout + result.stderr)
    code, out = outputs["same-tokenizer"]
    assert code == 0 and "state: completed after 1 steps" in out, out[-3000:]
    code, out = outputs["other-tokenizer"]
    assert code == 0 and "state: completed after 1 steps" in out, out[-3000:]
    records = [json.loads(line) for line in next((tmp_path / "other-tokenizer").rglob("metrics.jsonl")).read_text().splitlines()]
    assert records and all(r["aligned_chunks"] > 0 for r in records), records
    same = next((tmp_path / "same-tokenizer").rglob("metrics.jsonl")).read_text()
    assert "aligned_chunks" not in same, "the student's tokenizer: token ids, as always"
    assert marked_processes(mark) == []


def test_stack_model_sources_are_validated() -> None:
    from pydantic import ValidationError

    from opd.up.config import ModelSource

    assert ModelSource(prepare="smollm2-135m-instruct", drop_layers="12-21").drop_layers == "12-21"
    for bad in ({"prepare": "smollm2-135m-instruct", "layers": 12, "drop_layers": "12-21"},
                {"path": "models/x", "drop_layers": "1"},
                {"prepare": "smollm2-135m-instruct", "drop_layers": "twelve"}):
        with pytest.raises(ValidationError):
            ModelSource(**bad)


def test_up_trains_on_two_trainer_processes(tmp_path, teacher_model, student_model) -> None:
    """`trainer: {nproc: 2}`: the trainer service runs under torchrun (FSDP2, gloo) and the run completes;
    opd up's stop reaches every rank (torchrun gives each a session of its own): nothing is left behind."""
    mark = uuid.uuid4().hex
    config = stack_yaml(tmp_path, teacher_model, student_model, steps=3)
    stack = yaml.safe_load(config.read_text())
    for service in ("teacher", "student"):
        stack[service]["engine"] = "hf"
    stack["trainer"]["nproc"] = 2
    stack["run"].update({"student": {"finetune": "full"}, "eval": {"every": 0}})
    config.write_text(yaml.safe_dump(stack))
    result = opd("up", str(config), mark=mark)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "state: completed after 3 steps" in out
    log = (Path(stack["workdir"]) / "logs" / "trainer.log").read_text()
    assert "trainer process 0 of 2" in log and "starting 2 trainer processes" in log, log[-3000:]
    records = [json.loads(line) for line in (Path(stack["workdir"]) / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert all(r["skipped_updates"] == 0 and r["grad_norm"] > 0 for r in records if r["kind"] == "train")
    assert marked_processes(mark) == [], "opd up left processes running"
    assert port_free("127.0.0.1", stack["trainer"]["port"])


def test_up_runs_two_teachers_each_its_own_process(tmp_path, teacher_model, student_model, models_dir,
                                                   tiny_tokenizer) -> None:
    """`teachers: {a: ..., b: ...}` (two models on the student's tokenizer, hf engines to keep it quick): a process
    each with its own log, the run names both by URL, each row is scored by the teacher its `teacher` field
    names, the report prints each teacher's held-out KL at every evaluation and before/after; all stop at the end."""
    from tests.utils.tiny_models import build_llama

    second = build_llama(models_dir / "teacher-b", tiny_tokenizer, seed=5)
    mark = uuid.uuid4().hex
    config = stack_yaml(tmp_path, teacher_model, student_model, steps=2)
    stack = yaml.safe_load(config.read_text())
    teacher = stack.pop("teacher")
    stack["student"]["engine"] = "hf"
    stack["teachers"] = {"a": {**teacher, "engine": "hf"},
                         "b": {**teacher, "engine": "hf", "model": {"path": str(second)}, "port": free_port()}}
    prompts = Path(stack["run"]["dataset"]["path"])
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    prompts.write_text("".join(json.dumps({**row, "teacher": "ab"[i % 2]}) + "\n" for i, row in enumerate(rows)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p, "teacher": t}) + "\n"
                                for p, t in (("Tell me about the sun.", "a"), ("Tell me about the moon.", "b"))))
    stack["run"]["dataset"] = {"path": str(prompts), "eval_path": str(held_out)}
    stack["run"]["teachers"] = {"b": {"teacher_prompt": {"system": "Answer in one word."}}}
    config.write_text(yaml.safe_dump(stack))
    result = opd("up", str(config), mark=mark)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "state: completed after 2 steps" in out, out[-5000:]
    workdir = Path(stack["workdir"])
    run = json.loads((workdir / "run" / "config.json").read_text())
    ports = {name: stack["teachers"][name]["port"] for name in "ab"}
    assert {name: t["urls"] for name, t in run["teachers"].items()} == {
        name: [f"http://127.0.0.1:{port}"] for name, port in ports.items()}
    assert run["teachers"]["b"]["teacher_prompt"]["system"] == "Answer in one word." and run.get("teacher_urls") is None
    for name in "ab":
        assert f"ready teacher-{name} at http://127.0.0.1:{ports[name]}" in out
        log = (workdir / "logs" / f"teacher-{name}.log").read_text()
        assert "POST /logprobs" in log, f"teacher {name} scored nothing"
    evals = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and all(isinstance(r.get(f"{key}/{name}"), float) for r in evals for name in "ab"
                         for key in ("teacher_kl", "teacher_kl_per_completion"))
    last = evals[-1]
    flat = " ".join(out.split())  # the eval lines are wider than the terminal: rich wraps them
    assert f"per teacher: a {kl_text(last, 'a')}; b {kl_text(last, 'b')} (step {last['step']})" in flat
    assert "teacher KL on held-out prompts per teacher" in out
    assert f"  a: {kl_change(evals[0], last, 'a')}" in out and f"  b: {kl_change(evals[0], last, 'b')}" in out
    assert f"teacher KL on held-out prompts, step 0 -> step {last['step']}: {kl_change(evals[0], last)}" in out
    assert marked_processes(mark) == [], "opd up left processes running"
    assert all(port_free("127.0.0.1", port) for port in ports.values())
