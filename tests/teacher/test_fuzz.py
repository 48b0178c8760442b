"""schemathesis against the teacher's OpenAPI document: the hf engine on the
tiny teacher, no API key (so the document declares none), small limits,
about FUZZ_SECONDS of requests. No server error, every answer as documented,
invalid requests refused, and the service serves normally afterwards. /render
and the vLLM- and SGLang-compatible routes are in the document, so they are
fuzzed too."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from opd.common.client import TeacherClient
from tests.utils.fuzz import FUZZ_SECONDS, fuzz
from tests.utils.services import running

pytestmark = pytest.mark.slow
LIMITS = {"OPD_TEACHER_MAX_SEQUENCES": "8", "OPD_TEACHER_MAX_REQUEST_TOKENS": "2048"}


def test_fuzzing_finds_no_server_error(teacher_model: Path, tmp_path: Path) -> None:
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    with running("teacher-hf", args, log_dir=tmp_path, env=LIMITS) as proc:
        run = fuzz(proc.url, tmp_path / "fuzz", seconds=FUZZ_SECONDS)
        assert run.returncode == 0, run.output[-8000:]
        assert run.cases >= 10, run.output[-3000:]  # hundreds on an idle machine; a few dozen under heavy load
        assert proc.alive() and httpx.get(proc.url + "/health").status_code == 200
        assert len(TeacherClient(proc.url).logprobs([{"token_ids": [5, 6, 7]}]).results[0].logprobs) == 2
        # /render and the vLLM- and SGLang-compatible routes are in the document, so the fuzzer sent them requests too.
        log = proc.log_file.read_text()
        for route in ("POST /render", "GET /v1/models", "POST /v1/completions", "POST /generate"):
            assert f'"{route} HTTP/1.1"' in log, route
