"""The study (benchmarks/efficiency.py) compares its arms against one teacher: a stack of several is refused at
once, naming them, before any service starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_stack_of_several_teachers_is_refused_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--config",
                           str(ROOT / "services" / "configs" / "two_skills.yaml"), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "several (answers, arithmetic)" in done.stderr and "one-teacher stack" in done.stderr
    assert not (tmp_path / "w").exists(), "nothing was started or written"
