"""`opd up` checks its run config before it starts anything (issue 26): a bad run field is named within seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opd.common.errors import InvalidInput
from opd.common.process import free_port
from opd.up.config import load_stack


def stack_file(tmp_path: Path, run: dict) -> Path:
    """A stack whose models are still to be prepared and whose services are not running: only stand-ins exist."""
    config = {
        "workdir": str(tmp_path / "stack"),
        "teacher": {"model": {"prepare": "smollm2-135m-instruct"}, "port": free_port()},
        "student": {"model": {"prepare": "smollm2-135m-instruct", "layers": 12}, "port": free_port()},
        "trainer": {"port": free_port()},
        "run": run,
    }
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_bad_run_field_stops_opd_up_before_any_service_starts(tmp_path) -> None:
    path = stack_file(tmp_path, {"steps": 2, "sampling": {"max_tokens": 8}})
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "opd", "up", str(path), "--set", "run.steps=abc"],
                            capture_output=True, text=True, timeout=120, check=False)
    seconds, out = time.monotonic() - began, result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "run.steps" in out and "valid integer" in out, out
    assert seconds < 30, f"took {seconds:.0f}s: something started before the check"
    assert not (tmp_path / "stack").exists(), "no model was prepared and no service started (no workdir, no logs)"
    assert "ready" not in out and "all services stopped" not in out


@pytest.mark.parametrize(("sets", "named"), [
    (["run.steps=abc"], "run.steps: Input should be a valid integer"),
    (["run.sampling.max_tokenz=8"], "run.sampling.max_tokenz: unknown field"),
    (["run.substeps=5", "run.sampling.prompts_per_step=2", "run.sampling.samples_per_prompt=2"], "substeps: 5 substeps"),
    (["run.objective=sft"], "teacher_sampler_url"),
    (["run.dataset=prompts.jsonl"], "run.dataset: Input should be a valid dictionary"),
])
def test_the_trainers_refusals_are_named(tmp_path, sets: list[str], named: str) -> None:
    with pytest.raises(InvalidInput, match=named.replace(".", r"\.")):
        load_stack(stack_file(tmp_path, {}), sets)


def test_fields_opd_up_fills_in_later_need_not_be_given(tmp_path) -> None:
    """No student model, service URLs, folders or dataset: opd up fills them in; a dataset given is checked as given."""
    assert load_stack(stack_file(tmp_path, {})).run == {}
    with pytest.raises(InvalidInput, match=r"run\.dataset\.eval_size"):
        load_stack(stack_file(tmp_path, {"dataset": {"path": "mine.jsonl", "eval_size": 0}}))
