"""benchmarks/step_time.py's command line: paths are absolute before any row runs in another folder (issue 26)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "benchmarks" / "step_time.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_relative_paths_are_made_absolute_from_the_starting_folder(step_time, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = step_time.parse_args(["--trl-python", ".venv-trl/bin/python", "--workdir", "work", "--tokenizer", "tok"])
    assert args.trl_python == tmp_path / ".venv-trl/bin/python"
    assert args.workdir == tmp_path / "work" and args.tokenizer == tmp_path / "tok"


def test_a_venv_python_symlink_is_not_followed_out_of_its_venv(step_time, tmp_path, monkeypatch) -> None:
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / "venv/bin/python").symlink_to("/usr/bin/python3")
    monkeypatch.chdir(tmp_path)
    assert step_time.parse_args(["--trl-python", "venv/bin/python"]).trl_python == tmp_path / "venv/bin/python"


def test_defaults_come_from_the_preset(step_time) -> None:
    args = step_time.parse_args(["--rows", "default, trl", "--steps", "3"])
    assert args.rows == ["default", "trl"] and args.steps == 3 and args.prompts == step_time.PRESETS["heal"]["prompts"]
    assert args.trl_python.is_absolute()


def test_an_unknown_row_is_refused(step_time) -> None:
    with pytest.raises(SystemExit):
        step_time.parse_args(["--rows", "nope"])
