"""Fixtures shared by every test: tiny real models built once per session.

- `tiny_tokenizer`: a byte-level BPE tokenizer (512 ids) with a ChatML template.
- `teacher_model`, `student_model`: two small Llamas on that tokenizer, saved
  as safetensors folders that transformers and vLLM load. The teacher has a
  larger init scale, so its distributions are peaked and differ from the
  student's: distillation has something to do.
- `other_tokenizer_model`: a Llama on a different vocabulary (mismatch tests).

vLLM on the CPU: each engine gets a 0.25 GiB KV cache unless told otherwise.
`OPD_CACHE_DIR` points at a folder of this session (`opd_cache`), so the real
SmolLM2 is dequantized from its GGUF file once per session, not once per
`opd models prepare`, and the user's own cache is never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from opd.common.settings import TeacherSettings
from tests.utils.scheduling import make_scheduler, shared_modules
from tests.utils.tiny_models import build_llama, build_tokenizer

# vLLM on the CPU: a quarter GiB of KV cache per engine (the tiny models need little; each GiB is memory two
# test workers side by side run short of), for the engines built here and the services started from here.
for _role in ("TEACHER", "STUDENT"):
    os.environ.setdefault(f"OPD_{_role}_KV_CACHE_GIB", "0.25")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TORCH_THREADS = torch.get_num_threads()  # torch's own choice for this machine, before any test changes it

# pytest-xdist (`make test` runs two workers): each worker picks the ports of the services it starts from a
# range of its own, so two workers never hand the same port to two services starting side by side.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER and "OPD_FREE_PORTS" not in os.environ:
    from opd.common.process import _free_port_range

    _low, _top = _free_port_range()
    _span = (_top - _low) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _first = _low + int(WORKER.removeprefix("gw")) * _span
    os.environ["OPD_FREE_PORTS"] = f"{_first}-{_first + _span - 100}"  # a gap: replicas sit 10 ports above


@pytest.fixture(scope="session", autouse=True)
def opd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache folder, for this process and every service or `opd` command it starts; under
    pytest-xdist one folder for all workers (a model is dequantized once; models.py writes it atomically)."""
    if WORKER:
        path = tmp_path_factory.getbasetemp().parent / "opd-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("opd-cache")
    os.environ["OPD_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def torch_threads_kept() -> Iterator[None]:
    """Every test starts with torch's own thread count: a test that changes it (an in-process run with
    `student.torch_threads`) would otherwise change the float sums of the tests after it on the same worker,
    and one that compares a service process with an in-process engine to the bit would fail by test order."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_tokenizer(models_dir: Path) -> Path:
    path = models_dir / "tokenizer"
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def teacher_model(models_dir: Path, tiny_tokenizer: Path) -> Path:
    return build_llama(models_dir / "teacher", tiny_tokenizer, seed=1, layers=2, init_std=0.08)


@pytest.fixture(scope="session")
def student_model(models_dir: Path, tiny_tokenizer: Path) -> Path:
    return build_llama(models_dir / "student", tiny_tokenizer, seed=2, layers=2, init_std=0.02)


@pytest.fixture(scope="session")
def other_tokenizer_model(models_dir: Path) -> Path:
    tok = models_dir / "tokenizer-other"
    build_tokenizer(tok, variant=1)
    return build_llama(models_dir / "other", tok, seed=3)


@pytest.fixture(scope="session")
def teacher_settings(teacher_model: Path) -> TeacherSettings:
    return TeacherSettings(model=str(teacher_model), engine="hf", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_engine(teacher_settings: TeacherSettings):
    from opd.teacher.engine import HFScoringEngine

    return HFScoringEngine(teacher_settings)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order in which pytest-xdist hands out work (tests/utils/scheduling.py), longest first so that the
    workers end together: the modules on the trainer's shared services (tests/trainer/conftest.py `services`: a
    vLLM teacher and student), then the other modules that start engines or services (a test marked slow), then
    the quick ones."""
    shared = shared_modules(config.rootpath)
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.relative_to(config.rootpath).as_posix() not in shared,
                                 item.path not in slow))  # stable within each part


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` (`make test`): a module is a unit of work, the shared-services modules one together."""
    if config.getvalue("dist") == "loadgroup":
        return make_scheduler(config, log)
    return None
