"""A teacher whose vLLM engine dies exits, so that its supervisor restarts it.

The real service runs the tiny teacher on vLLM's CPU build under `opd up`'s
supervisor; the test SIGKILLs its engine-core process (as the OOM killer
would) and watches the service exit, then the supervisor start it again.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from opd.common.engine_watch import EXIT_CODE
from opd.up.config import RestartPolicy
from opd.up.supervisor import Supervisor
from tests.utils.engine_death import assert_exited_for_its_engine
from tests.utils.services import running

pytestmark = pytest.mark.slow
BODY = {"sequences": [{"token_ids": [5, 6, 7, 8, 9], "start": 2}]}


def test_a_teacher_whose_engine_died_exits_and_the_supervisor_restarts_it(teacher_model: Path, tmp_path: Path) -> None:
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "vllm", "--dtype", "float32"]
    reports: list[str] = []
    with running("teacher-vllm", args, log_dir=tmp_path) as proc:
        assert httpx.post(proc.url + "/logprobs", json=BODY, timeout=60).status_code == 200
        supervisor = Supervisor([proc], RestartPolicy(max_restarts=1, backoff_s=0.1), report=reports.append,
                                startup_timeout_s=300).start()
        try:
            first = proc.proc.pid
            # It answers 503 or nothing, and exits with EXIT_CODE (the supervisor then starts another).
            assert_exited_for_its_engine(proc, lambda: httpx.post(proc.url + "/logprobs", json=BODY, timeout=30),
                                         "teacher", "results")
            deadline = time.monotonic() + 360
            while supervisor.generation("teacher-vllm") < 1:
                assert supervisor.failure is None, supervisor.failure
                assert time.monotonic() < deadline, f"not restarted in time: {reports}"
                time.sleep(0.2)
        finally:
            supervisor.close()
        assert proc.proc.pid != first
        assert httpx.post(proc.url + "/logprobs", json=BODY, timeout=60).status_code == 200
    assert f"teacher-vllm exited with code {EXIT_CODE}" in reports[0], reports
