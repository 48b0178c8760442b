"""The trainer's test pause: a listed point holds until released and says so in a file; others pass."""

from __future__ import annotations

import threading
import time

from opd.trainer.pause import pause_point


def test_unset_or_unlisted_points_pass_at_once(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OPD_TEST_PAUSE", raising=False)
    pause_point("sample", 1)
    monkeypatch.setenv("OPD_TEST_PAUSE", "sample:2,score:1")
    monkeypatch.setenv("OPD_TEST_PAUSE_DIR", str(tmp_path))
    pause_point("sample", 1)
    pause_point("sample", 12)
    assert list(tmp_path.iterdir()) == []


def test_a_listed_point_holds_until_released_and_stays_released(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPD_TEST_PAUSE", "train:3 sync:3")
    monkeypatch.setenv("OPD_TEST_PAUSE_DIR", str(tmp_path))
    held = threading.Thread(target=pause_point, args=("train", 3), daemon=True)
    held.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "train-3.paused").is_file():
        assert time.monotonic() < deadline, "no pause marker"
        time.sleep(0.01)
    assert held.is_alive()
    (tmp_path / "train-3.release").touch()
    held.join(30)
    assert not held.is_alive()
    pause_point("train", 3)  # a restarted trainer running the step again passes through
