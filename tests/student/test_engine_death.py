"""A student whose vLLM engine dies exits, so that its supervisor restarts it.

The real service runs the tiny student on vLLM's CPU build; the test SIGKILLs
its engine-core process (as the OOM killer would) and watches the service.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.utils.engine_death import assert_exited_for_its_engine
from tests.utils.services import running

pytestmark = pytest.mark.slow
BODY = {"prompts": [{"token_ids": [5, 6, 7, 8]}], "n": 2, "max_tokens": 4, "seed": 1}


def test_student_exits_when_its_engine_dies(student_model: Path, tmp_path: Path) -> None:
    # float32: on this CPU build a bfloat16 worker was seen dying of SIGILL at its first forward now and then.
    args = ["student", "serve", "--model", str(student_model), "--engine", "vllm", "--dtype", "float32",
            "--checkpoint-root", str(tmp_path)]
    with running("student-vllm", args, log_dir=tmp_path) as proc:
        assert httpx.post(proc.url + "/rollouts", json=BODY, timeout=60).status_code == 200
        assert_exited_for_its_engine(proc, lambda: httpx.post(proc.url + "/rollouts", json=BODY, timeout=30), "student",
                                     "rollouts")
