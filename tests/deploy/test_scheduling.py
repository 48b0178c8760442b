"""`make test`'s scheduling (tests/utils/scheduling.py) under real pytest-xdist workers: each module runs on one
worker, and the tests/trainer modules on the shared services run on one worker together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFTEST = """
from tests.utils.scheduling import make_scheduler


def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log) if config.getvalue("dist") == "loadgroup" else None
"""
FIXTURES = """
import pytest

@pytest.fixture
def services():
    return 1

@pytest.fixture
def make_config(services):
    return 1

@pytest.fixture
def other():
    return 1
"""
TEST = """
import json, os, pathlib, pytest

@pytest.mark.parametrize("i", range(6))
def test_records_its_worker({fixture}, i):
    out = pathlib.Path(os.environ["WHERE"]) / f"{{__name__}}-{{i}}.json"
    out.write_text(json.dumps([__name__, os.environ["PYTEST_XDIST_WORKER"]]))
"""


def test_a_module_is_one_unit_and_the_shared_services_modules_are_one(tmp_path: Path) -> None:
    (tmp_path / "tests" / "trainer").mkdir(parents=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the rootdir: node ids start with tests/
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "tests" / "conftest.py").write_text(FIXTURES)
    for name, fixture in [("trainer/test_on_services", "services"), ("trainer/test_on_configs", "make_config"),
                          ("trainer/test_alone", "other"), ("test_a", "other"), ("test_b", "other"), ("test_c", "other")]:
        (tmp_path / "tests" / f"{name}.py").write_text(TEST.format(fixture=fixture))
    where = tmp_path / "where"
    where.mkdir()
    env = {**os.environ, "WHERE": str(where), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--dist", "loadgroup", "tests"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for record in where.glob("*.json"):
        module, worker = json.loads(record.read_text())
        workers[module].add(worker)
    assert sum(1 for _ in where.glob("*.json")) == 36
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
    assert workers["test_on_services"] == workers["test_on_configs"], dict(workers)
    assert len(set().union(*workers.values())) == 2, "both workers had work"
