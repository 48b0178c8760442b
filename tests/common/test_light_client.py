"""The light client: the base package alone (httpx + pydantic) scores against a teacher.

A fresh virtual environment (no pip, no system site-packages) gets the wheel
of this project, built from a copy of the repository and installed without
its dependencies, plus exactly the distributions its base requirements pull
(copied from this environment, so no registry is needed). There, `import
torch` fails, `from opd import TeacherClient, ...` and every client module
import, no top-level `services` is installed (the package is `opd`, its source
the folder services/), a user project's own `services` package imports next to
`opd`, and the README's three-line example runs unchanged but for the URL
against a real teacher (SmolLM2's tokenizer, two layers, hf engine) and prints
what the full install's client gets.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from opd.common.client import TeacherClient
from tests.utils.services import running

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CLIENT_MODULES = ["opd.common.client", "opd.common.compat_client", "opd.common.protocol",
                  "opd.common.openai_protocol", "opd.common.sglang_protocol", "opd.common.errors"]
# What a pipeline imports from `opd` itself: the clients, the compatible-protocol clients, the models they return.
TOP_LEVEL = ["TeacherClient", "AsyncTeacherClient", "StudentClient", "AsyncStudentClient", "TrainerClient",
             "AsyncTrainerClient", "teacher_client", "OpenAITeacherClient", "SGLangTeacherClient",
             "LogprobsResponse", "SequenceLogprobs", "RolloutResponse", "WeightsResponse", "ServiceInfo", "TrainerInfo",
             "RunCreated", "RunStatus", "RunMetrics", "ServiceError"]
HEAVY = {"torch", "transformers", "vllm", "fastapi", "numpy"}


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Score from Python in three lines:\n\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its three-line client example"
    return block.group(1)


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "services", src / "services", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "wheel"), str(src)], check=True)
    return next((tmp / "wheel").glob("opd-*.whl"))


def base_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def copy_closure(reqs: list[Requirement], site: Path) -> list[str]:
    """Copies each required distribution (and what it requires) from this environment into `site`."""
    seen: list[str] = []
    todo = list(reqs)
    while todo:
        req = todo.pop()
        dist = md.distribution(req.name)
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.append(name)
        for f in dist.files or []:
            if ".." not in f.parts:
                target = site / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dist.locate_file(f), target)
        extras = set(req.extras)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(sub)
    return seen


@pytest.fixture(scope="module")
def smollm2_teacher(tmp_path_factory):
    from opd.common.models import prepare

    model = tmp_path_factory.mktemp("models") / "smollm2-l2"
    prepare("smollm2-135m-instruct", model, layers=2)
    args = ["teacher", "serve", "--model", str(model), "--engine", "hf", "--dtype", "float32", "--device", "cpu"]
    with running("teacher-light", args, log_dir=tmp_path_factory.mktemp("logs"), api_key="secret") as proc:
        yield proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def light_python(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its base requirements only; its python."""
    requirements = base_requirements(wheel)
    assert sorted(r.name for r in requirements) == ["httpx", "pydantic"]
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    copied = copy_closure(requirements, site)
    assert "torch" not in copied and "transformers" not in copied and "fastapi" not in copied
    return python


@pytest.fixture
def light_run(tmp_path: Path) -> dict:
    """subprocess.run options: only the light venv's packages, from an empty folder (not the repository)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    (tmp_path / "elsewhere").mkdir()
    return dict(check=True, capture_output=True, text=True, cwd=tmp_path / "elsewhere", env=env)


def test_the_wheel_installs_opd_and_every_subpackage(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"opd"}, f"the wheel installs {sorted(tops)}: only `opd` belongs on a user's path"
    for init in (ROOT / "services").rglob("__init__.py"):
        inside = init.relative_to(ROOT / "services").as_posix()
        assert f"opd/{inside}" in names, f"services/{inside} is missing from the wheel: list its package in pyproject.toml"
    for data in ("opd/configs/skill.yaml", "opd/data/prompts.jsonl", "opd/data/questions/train.jsonl"):
        assert data in names


def test_the_light_install_imports_opd_and_no_services(light_python: Path, light_run: dict) -> None:
    check = ("import importlib, sys\n"
             "try:\n    import torch\nexcept ModuleNotFoundError:\n    print('no torch')\n"
             f"for m in {CLIENT_MODULES!r}:\n    importlib.import_module(m)\n"
             f"from opd import {', '.join(TOP_LEVEL)}\n"
             f"print('heavy:', sorted({HEAVY!r} & set(sys.modules)))\n"
             "print(sys.modules['opd'].__file__.startswith(sys.prefix))\n"
             "try:\n    importlib.import_module('services')\nexcept ModuleNotFoundError:\n    print('no services')\n")
    out = subprocess.run([str(light_python), "-c", check], **light_run).stdout
    assert out.splitlines() == ["no torch", "heavy: []", "True", "no services"]


def test_importing_opd_loads_nothing_heavy() -> None:
    """`import opd` (and so `python -m opd`) is cheap: the clients load on first use, the services never."""
    check = f"import sys, opd\nprint(sorted(({HEAVY!r} | {{'httpx', 'pydantic'}}) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]"


USER_PROJECT = {  # a user's application with a package of its own named `services`, as many have
    "services/__init__.py": "OWNER = 'user'\n",
    "services/common/__init__.py": "",
    "services/common/client.py": "class TeacherClient:\n    pass\n",
    "app.py": ("import importlib\n"
               "own = importlib.import_module('services.common.client')\n"  # rename: keep (the user's own package)
               "from opd import TeacherClient\n"
               "from opd.common.client import StudentClient\n"
               "assert importlib.import_module('services').OWNER == 'user'\n"
               "assert own.TeacherClient is not TeacherClient and TeacherClient.__module__ == 'opd.common.client'\n"
               "print('both')\n"),
}


@pytest.mark.parametrize("install", ["light", "this environment"])
def test_a_user_project_with_its_own_services_package_imports_opd_too(install: str, request, tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name, text in USER_PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    python = request.getfixturevalue("light_python") if install == "light" else Path(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([str(python), "app.py"], check=True, capture_output=True, text=True, cwd=project, env=env)
    assert out.stdout.strip() == "both"


def test_light_install_runs_the_readme_example(light_python: Path, light_run: dict, smollm2_teacher) -> None:
    example = readme_example().replace("http://127.0.0.1:8001", smollm2_teacher.url)
    assert example.startswith("from opd import TeacherClient"), "the README imports from the package's top level"
    printed = subprocess.run([str(light_python), "-c", example], **light_run).stdout
    ids = ast.literal_eval(re.search(r'"token_ids": (\[[\d, ]+\])', example).group(1))
    expected = TeacherClient(smollm2_teacher.url, api_key="secret").logprobs([{"token_ids": ids, "start": 1}])
    assert ast.literal_eval(printed.strip()) == expected.results[0].logprobs
