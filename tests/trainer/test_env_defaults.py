"""A trainer service's OPD_TRAIN_* variables fill what a posted run config leaves out (compose relies on it)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from opd.common.settings import TrainerSettings
from opd.trainer.app import build_app
from opd.trainer.config import RunConfig


def test_environment_fills_gaps_and_the_config_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_TRAIN_TEACHER_URLS", "http://teacher:8001")
    monkeypatch.setenv("OPD_TRAIN_STUDENT_URL", "http://student:8002")
    monkeypatch.setenv("OPD_TRAIN_STUDENT__MODEL", "/data/models/student")
    monkeypatch.setenv("OPD_TRAIN_CHECKPOINT_ROOT", "/data/checkpoints")
    config = RunConfig.model_validate({"dataset": {"path": "prompts.jsonl"}, "student": {"finetune": "full"}})
    assert config.teacher_urls == ("http://teacher:8001",)
    assert config.student_url == "http://student:8002"
    assert config.student.model == "/data/models/student" and config.student.finetune == "full"
    assert config.checkpoint_root == "/data/checkpoints"
    mine = RunConfig.model_validate({"dataset": {"path": "p.jsonl"}, "teacher_urls": ["http://other:9000"]})
    assert mine.teacher_urls == ("http://other:9000",)


def test_without_defaults_a_missing_field_is_a_422_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("OPD_TRAIN_TEACHER_URLS", "OPD_TRAIN_STUDENT_URL", "OPD_TRAIN_STUDENT__MODEL"):
        monkeypatch.delenv(name, raising=False)
    with TestClient(build_app(TrainerSettings(runs_dir=str(tmp_path)))) as client:
        r = client.post("/runs", json={"dataset": {"path": "p.jsonl"}})
    assert r.status_code == 422
    assert "teacher_urls" in r.json()["detail"] and "student_url" in r.json()["detail"]
