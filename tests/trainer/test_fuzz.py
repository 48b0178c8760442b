"""schemathesis against the trainer's OpenAPI document, about FUZZ_SECONDS of
requests: no server error, every answer as documented, invalid run configs
refused with a 422, and the service serves normally afterwards.

A valid generated run config must not start a run: it could name any folder
as its output_dir. So one run of ours holds the service's only run slot
(max_runs 1) the whole time: it waits for services that are not there. Every
valid config the fuzzer posts is then a documented 409, and every invalid one
a 422; the run is stopped at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from opd.common.process import free_port
from tests.utils.fuzz import FUZZ_SECONDS, fuzz
from tests.utils.services import running

pytestmark = pytest.mark.slow
KEY = "fuzz-key"


def holder(student_model: Path, tmp_path: Path) -> dict:
    """A run that waits (up to ten minutes) for a teacher and a student nobody started."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n' * 4)
    return {
        "name": "holder", "student": {"model": str(student_model), "device": "cpu"},
        "teacher_urls": [nowhere], "student_url": nowhere, "dataset": {"path": str(tmp_path / "prompts.jsonl")},
        "output_dir": str(tmp_path / "holder"), "checkpoint_root": str(tmp_path / "checkpoints"),
        "services": {"max_wait_s": 600, "max_backoff_s": 1},
    }


def test_fuzzing_finds_no_server_error(student_model: Path, tmp_path: Path) -> None:
    args = ["trainer", "serve", "--runs-dir", str(tmp_path / "runs")]
    with running("trainer", args, log_dir=tmp_path, api_key=KEY, env={"OPD_TRAINER_MAX_RUNS": "1"}) as proc:
        http = httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        created = http.post("/runs", json=holder(student_model, tmp_path))
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        run = fuzz(proc.url, tmp_path / "fuzz", seconds=FUZZ_SECONDS, api_key=KEY)
        assert run.returncode == 0, run.output[-8000:]
        assert run.cases >= 10, run.output[-3000:]  # hundreds on an idle machine; a few dozen under heavy load
        # The stateful phase may stop the holder and start a valid run of its own: every run must stop on request.
        runs = [r["id"] for r in http.get("/runs").json()["runs"]]
        assert run_id in runs
        deadline = time.monotonic() + 60
        for rid in runs:
            assert http.post(f"/runs/{rid}/stop").status_code == 202
            while http.get(f"/runs/{rid}").json()["state"] not in ("stopped", "failed", "completed"):
                assert time.monotonic() < deadline, f"run {rid} did not stop"
                time.sleep(0.2)
        assert proc.alive() and http.get("/health").status_code == 200
