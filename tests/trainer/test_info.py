"""The trainer's GET /info (in process): what its settings say, the runs in progress, and the API key it needs,
like the teacher's and the student's."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi.testclient import TestClient

from opd.common import protocol as p
from opd.common.settings import TrainerSettings
from opd.trainer.app import build_app, package_version

KEY = "info-key"


def test_info_answers_the_settings_and_the_runs_in_progress(tmp_path) -> None:
    settings = TrainerSettings(api_key=KEY, runs_dir=str(tmp_path / "runs"), max_runs=3, nproc=2, max_pending=7,
                               max_body_bytes=4096)
    with TestClient(build_app(settings)) as client:
        assert client.get("/info").status_code == 401
        assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        info = p.TrainerInfo.model_validate(client.get("/info", headers=auth).json())
        assert info == p.TrainerInfo(version=package_version(), nproc=2, runs_dir=str(tmp_path / "runs"), max_runs=3,
                                     active_runs=0, limits={"max_pending": 7, "max_body_bytes": 4096})
        assert info.service == "trainer" and info.version, "an installed opd knows its version"
        runs = client.app.state.runs.runs  # type: ignore[attr-defined]
        runs.update(busy=SimpleNamespace(active=True, alignment={"default": "bytes", "b": "ids"}),
                    setting_up=SimpleNamespace(active=True, alignment=None),
                    done=SimpleNamespace(active=False, alignment={"default": "ids"}))
        try:
            answer = client.get("/info", headers=auth).json()
            assert answer["active_runs"] == 2
            # how each run in progress scores its teachers, once it knows (set up); none for runs that ended
            assert answer["alignment"] == {"busy": {"default": "bytes", "b": "ids"}}
        finally:
            runs.clear()
        operation = client.get("/openapi.json", headers=auth).json()["paths"]["/info"]["get"]
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/TrainerInfo")
        assert "401" in operation["responses"]


def test_info_needs_no_key_when_none_is_set(tmp_path) -> None:
    with TestClient(build_app(TrainerSettings(runs_dir=str(tmp_path)))) as client:
        answer = client.get("/info")
    assert answer.status_code == 200 and answer.json()["max_runs"] == 1 and answer.json()["nproc"] == 1
