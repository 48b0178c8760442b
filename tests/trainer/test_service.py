"""The trainer service as a real process (`opd trainer serve`) over real HTTP:
POST /runs, GET /runs/{id} and /metrics, stop, 409 when busy, 422 naming the
field, 404, auth and probes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from opd.common.process import ServiceProcess, free_port
from opd.trainer.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
KEY = "trainer-key"


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    port = free_port()
    proc = ServiceProcess("trainer", ["trainer", "serve", "--port", str(port), "--runs-dir", str(runs)], port,
                          log_file=runs / "trainer.log", env={"OPD_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"})
    proc.start()
    try:
        proc.wait_ready(timeout=120, api_key=KEY)
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture
def http(trainer_url: str):
    with httpx.Client(base_url=trainer_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def body(make_config, **overrides) -> dict:
    data = make_config(**overrides).model_dump(mode="json")
    del data["output_dir"]  # the service puts the run under its runs dir
    return data


def wait_state(http: httpx.Client, run_id: str, states: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"/runs/{run_id}").json()
        if status["state"] in states:
            return status
        assert status["state"] != "failed", status["error"]
        assert time.monotonic() < deadline, f"run still {status['state']} after {timeout:.0f}s"
        time.sleep(0.2)


def test_invalid_config_is_a_422_naming_the_field(http: httpx.Client, make_config) -> None:
    bad = body(make_config)
    bad["sampling"]["max_tokens"] = 0
    r = http.post("/runs", json=bad)
    assert r.status_code == 422 and r.json()["detail"].startswith("sampling.max_tokens:")
    missing = body(make_config)
    del missing["student"]["model"]
    r = http.post("/runs", json=missing)
    assert r.status_code == 422 and "student.model: Field required" in r.json()["detail"]
    r = http.post("/runs", json={**body(make_config), "stepz": 3})
    assert r.status_code == 422 and "stepz: unknown field" in r.json()["detail"]


def test_run_lifecycle_busy_stop_and_metrics(http: httpx.Client, make_config) -> None:
    r = http.post("/runs", json=body(make_config, name="svc", steps=200, eval__every=0, save_every=100))
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    busy = http.post("/runs", json=body(make_config, name="svc2", steps=1))
    assert busy.status_code == 409 and run_id in busy.json()["detail"]

    deadline = time.monotonic() + 240
    while (status := http.get(f"/runs/{run_id}").json())["step"] < 2:
        assert status["state"] in ("starting", "running"), status
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["latest"]["teacher_kl"] > 0 and status["policy_version"] >= 1

    stop = http.post(f"/runs/{run_id}/stop")
    assert stop.status_code == 202 and stop.json()["state"] in ("stopping", "stopped")
    final = wait_state(http, run_id, {"stopped"})
    assert 2 <= final["step"] < 200 and final["finished_at"] is not None
    checkpoint = latest_checkpoint(final["output_dir"])
    assert checkpoint is not None and checkpoint.name == f"step-{final['step']:06d}", "a stop checkpoints its last step"

    records = http.get(f"/runs/{run_id}/metrics").json()["records"]
    assert [r["step"] for r in records] == list(range(1, final["step"] + 1))
    assert all(r["kind"] == "train" for r in records)
    assert run_id in [run["id"] for run in http.get("/runs").json()["runs"]]

    # Not busy any more: the next run is accepted and completes.
    r = http.post("/runs", json=body(make_config, name="svc3", steps=2, eval__every=2))
    assert r.status_code == 201, r.text
    done = wait_state(http, r.json()["id"], {"completed"})
    assert done["step"] == 2 and done["latest_eval"]["teacher_kl"] > 0
    assert Path(done["output_dir"], "teacher_kl.png").is_file()
    assert "opd_trainer_active_runs 0.0" in http.get("/metrics").text


def test_unknown_run_auth_and_probes(http: httpx.Client, trainer_url: str) -> None:
    assert http.get("/runs/nope").status_code == 404
    assert "GET /runs" in http.post("/runs/nope/stop").json()["detail"]
    assert httpx.get(trainer_url + "/runs").status_code == 401
    assert httpx.get(trainer_url + "/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200


def test_info_over_the_client_and_its_key(trainer_url: str) -> None:
    """GET /info of the served trainer, through TrainerClient.info(): its defaults, and 401 without the key."""
    from opd.common.client import TrainerClient
    from opd.common.errors import ServiceError

    info = TrainerClient(trainer_url, api_key=KEY).info()
    assert info.service == "trainer" and info.nproc == 1 and info.max_runs == 1 and info.active_runs == 0
    assert Path(info.runs_dir).is_dir() and info.limits["max_pending"] == 64
    assert httpx.get(trainer_url + "/info").status_code == 401
    with pytest.raises(ServiceError, match="401"):
        TrainerClient(trainer_url, retries=0).info()
