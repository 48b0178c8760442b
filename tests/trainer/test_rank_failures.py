"""The trainer on two processes when one fails (distributed.py, choice 4), through `open_policy` and `follow`
as the trainer service drives them (tests/utils/leader_driver.py), with real failures where they can be had
and OPD_FAILPOINT (failpoints.py) where they cannot:

- failures every process gets past keep the processes together, and the next call works: a policy one
  process cannot open (failpoint), a checkpoint folder every process finds empty, a version folder only
  rank 0 cannot write (after the collective that gathers the weights);
- a process that fails between two FSDP collectives (failpoint, rank 0 or rank 1) ends every process within
  seconds of the grace (OPD_FAILURE_GRACE_S=6 there), where before the others waited out gloo's 30 minutes;
  when it is rank 0, the call fails after half the grace (a service marks its run failed then).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.test_distributed import ENV, REPO, policy_config

pytestmark = pytest.mark.slow


def launch(out: Path, config: Path, failpoint: str, timeout: float, grace: float) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "tests.utils.leader_driver", str(out), str(config), "go-on"]
    env = {**ENV, "OPD_FAILPOINT": failpoint, "OPD_FAILURE_GRACE_S": str(grace)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_failures_every_process_gets_past_keep_the_processes_together(student_model: Path, tmp_path: Path) -> None:
    config = policy_config(student_model, tmp_path, "lora")
    # The grace is long: rank 0 still loading its policy when rank 1's open failed is not a process left waiting.
    done = launch(tmp_path / "out", config, "open:1", timeout=300, grace=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    outcomes = json.loads((tmp_path / "out" / "outcomes.json").read_text())
    assert [o["call"] for o in outcomes] == ["open", "open", "load_state", "save_version", "train", "close"]
    refused, opened, load, version, train, close = outcomes
    assert refused["error"] == "TrainerProcessError", refused
    assert "trainer process 1" in refused["message"] and "OPD_FAILPOINT" in refused["message"], refused
    assert opened.get("ok") and close.get("ok"), outcomes
    assert load["error"] == "FileNotFoundError", load  # rank 0's own error: every rank had it
    assert version["error"] in ("NotADirectoryError", "FileExistsError"), version  # rank 0's alone
    assert train.get("ok") and math.isfinite(train["loss"]), train


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_failing_between_collectives_ends_every_process_in_seconds(rank: int, student_model: Path, tmp_path: Path) -> None:
    config = policy_config(student_model, tmp_path, "full")
    began = time.monotonic()
    # A 6 s grace: rank 0 fails its call at 3 s, seconds before the others give up (gloo's own wait: 30 minutes).
    done = launch(tmp_path / "out", config, f"forward:{rank}", timeout=240, grace=6)
    took = time.monotonic() - began
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-4000:]
    log = done.stdout + done.stderr
    # A watchdog ended the processes: the one that gave up on the collective, or the one whose peer was gone.
    assert "exits: " in log, log[-4000:]
    outcomes = tmp_path / "out" / "outcomes.json"
    if rank == 0:  # rank 0 failed the call itself after half the grace, and sent nothing more
        train = next(o for o in json.loads(outcomes.read_text()) if o["call"] == "train")
        assert train["error"] == "TrainerProcessError" and "the other processes wait inside train" in train["message"], train
        assert "trainer process 0: train: Failpoint: OPD_FAILPOINT" in train["message"], train
    else:  # rank 0 waited in the collective until its watchdog ended it; rank 1 logged its own failure
        assert not outcomes.exists()
        assert "Failpoint: OPD_FAILPOINT: trainer process 1" in log, log[-4000:]
    print(f"failed on rank {rank}: every process ended {took:.1f} s after the launch")


def test_the_service_on_two_processes_fails_the_run_when_rank_0_fails_mid_step(make_config, tmp_path: Path) -> None:
    """`opd trainer serve --nproc 2`, rank 0 failing in its first forward pass (failpoint): GET /runs/{id} says
    failed, with the error, half a grace later, and every process has ended within 60 s."""
    import httpx

    from opd.common.process import ServiceProcess, free_port

    key, port = "k", free_port()
    env = {"OPD_API_KEY": key, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "OPD_FAILPOINT": "forward:0", "OPD_FAILURE_GRACE_S": "10"}
    proc = ServiceProcess("trainer", ["trainer", "serve", "--port", str(port), "--nproc", "2", "--runs-dir",
                                      str(tmp_path / "runs")], port, log_file=tmp_path / "trainer.log", env=env)
    proc.start()
    try:
        proc.wait_ready(timeout=180, api_key=key)
        data = make_config(steps=3, eval__every=0).model_dump(mode="json")
        del data["output_dir"]
        with httpx.Client(base_url=proc.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            run_id = http.post("/runs", json=data).json()["id"]
            deadline = time.monotonic() + 240
            while (status := http.get(f"/runs/{run_id}").json())["state"] != "failed":
                assert status["state"] in ("starting", "running"), status
                assert time.monotonic() < deadline, "the run is still running"
                time.sleep(0.2)
        failed_at = time.monotonic()
        assert "Failpoint" in status["error"] and "wait inside train" in status["error"], status["error"]
        while proc.alive() and time.monotonic() < failed_at + 60:
            time.sleep(0.5)
        assert not proc.alive(), "the trainer's processes still run 60 s after the failure"
        assert proc.proc is not None and proc.proc.returncode != 0
    finally:
        proc.stop()
