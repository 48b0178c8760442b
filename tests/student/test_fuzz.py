"""schemathesis against the student's OpenAPI document: the hf engine on the
tiny student, small limits (so every generated request is cheap), an API key,
about FUZZ_SECONDS of requests. No server error, every answer as documented,
invalid requests refused, and the service serves normally afterwards."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from opd.common.client import StudentClient
from tests.utils.fuzz import FUZZ_SECONDS, fuzz
from tests.utils.services import running

pytestmark = pytest.mark.slow
KEY = "fuzz-key"
LIMITS = {"OPD_STUDENT_MAX_TOKENS": "8", "OPD_STUDENT_MAX_PROMPTS": "2", "OPD_STUDENT_MAX_ROLLOUTS": "4"}


def test_fuzzing_finds_no_server_error(student_model: Path, checkpoint_root: Path, tmp_path: Path) -> None:
    args = ["student", "serve", "--model", str(student_model), "--engine", "hf", "--dtype", "float32",
            "--device", "cpu", "--checkpoint-root", str(checkpoint_root)]
    with running("student-hf", args, log_dir=tmp_path, env=LIMITS, api_key=KEY) as proc:
        run = fuzz(proc.url, tmp_path / "fuzz", seconds=FUZZ_SECONDS, api_key=KEY)
        assert run.returncode == 0, run.output[-8000:]
        assert run.cases >= 10, run.output[-3000:]  # hundreds on an idle machine; a few dozen under heavy load
        assert proc.alive() and httpx.get(proc.url + "/health").status_code == 200
        out = StudentClient(proc.url, api_key=KEY).rollouts({"prompts": [{"text": "The boy"}], "n": 2, "max_tokens": 8})
        assert len(out.rollouts) == 2
