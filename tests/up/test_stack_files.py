"""The stack files opd ships: `opd up` with no argument runs the skill demo, and runs it from any folder."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from opd.up.config import DEFAULT_CONFIG, load_stack
from opd.up.runner import PACKAGE_DIR, Stack, data_path


def test_the_default_stack_is_the_skill_demo() -> None:
    stack = load_stack(None)
    assert DEFAULT_CONFIG.name == "skill.yaml"
    assert stack.run["teacher_prompt"]["system"] and stack.run["eval"]["verifier"]
    assert stack.run["steps"] * 30 < 600, "the demo must fit 10 minutes on a 2-core machine at ~30 s a step"


def test_every_shipped_stack_file_validates() -> None:
    for name in ("skill.yaml", "heal.yaml", "answer_format.yaml"):
        load_stack(DEFAULT_CONFIG.parent / name)


def test_a_relative_dataset_path_is_found_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = "services/data/questions/train.jsonl"
    assert Path(data_path(shipped)) == PACKAGE_DIR / "data/questions/train.jsonl" and Path(data_path(shipped)).is_file()
    (tmp_path / "services/data/questions").mkdir(parents=True)
    (tmp_path / shipped).write_text('{"prompt": "mine"}\n')
    assert data_path(shipped) == shipped, "a file in the working folder wins over the shipped one"
    assert data_path("no/such/file.jsonl") == "no/such/file.jsonl", "a missing file keeps its name for the error"
    assert data_path(str(tmp_path / shipped)) == str(tmp_path / shipped)


def test_the_run_opd_up_submits_names_the_shipped_data_absolutely(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    stack = Stack(load_stack(None), Console())
    stack.url = lambda name: f"http://{name}"  # no process is started
    run = stack.run_config("student-model")
    assert Path(run["dataset"]["path"]).is_absolute() and Path(run["dataset"]["path"]).is_file()
    assert Path(run["dataset"]["eval_path"]).is_file()
