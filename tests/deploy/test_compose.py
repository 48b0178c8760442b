"""Keeps docker-compose.yml honest without a Docker engine.

It parses; build contexts and Dockerfiles exist; every command is an `opd`
invocation the CLI accepts; every environment variable is one a settings
class (or the run config) reads; healthcheck paths exist in the apps' OpenAPI
documents; ports agree between commands, mappings, probes and URLs.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import typer
import yaml

from services.cli import app as opd_app

ROOT = Path(__file__).resolve().parents[2]
FILES = ["docker-compose.yml", "docker-compose.cpu.yml"]
THIRD_PARTY_ENV = {"HF_TOKEN", "HF_HOME"}


class _Loader(yaml.SafeLoader):
    """Accepts compose's own tags (!reset, !override) as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


def services(doc: dict) -> dict[str, dict]:
    return doc["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_files_parse_and_builds_exist() -> None:
    for name in FILES:
        doc = load(name)
        for svc, spec in services(doc).items():
            build = spec.get("build")
            if build:
                assert (ROOT / build["context"]).is_dir(), svc
                assert (ROOT / build["context"] / build["dockerfile"]).is_file(), svc
                assert build["args"]["VARIANT"] in {"cpu", "cuda", "${OPD_VARIANT:-cuda}"}


def resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """The click command an `opd ...` argument list names, and the arguments left for it."""
    cmd: click.Command = typer.main.get_command(opd_app)
    args = list(args)
    while isinstance(cmd, click.Group):
        name = args.pop(0)
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"opd has no command {name!r}"
        cmd = sub
    return cmd, args


def test_commands_are_valid_opd_invocations(compose: dict) -> None:
    for svc, spec in services(compose).items():
        command = spec["command"]
        assert command[0] == "opd", svc
        cmd, rest = resolve(command[1:])
        cmd.make_context("opd", rest, resilient_parsing=False)  # raises on unknown options or bad values
        probe = spec["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "opd", "probe"], svc
        probe_cmd, probe_rest = resolve(probe[2:])
        probe_cmd.make_context("opd", probe_rest)


def settings_fields() -> dict[str, set[str]]:
    from services.common.settings import StudentSettings, TeacherSettings
    from services.common.settings import TrainerSettings

    return {
        prefix: set(cls.model_fields)
        for prefix, cls in {"OPD_TEACHER_": TeacherSettings, "OPD_STUDENT_": StudentSettings, "OPD_TRAINER_": TrainerSettings}.items()
    }


def run_config_has(path: list[str]) -> bool:
    from pydantic import BaseModel

    from services.trainer.config import RunConfig

    model: type[BaseModel] = RunConfig
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            model = field.annotation  # type: ignore[assignment]
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return False
    return True


def test_every_environment_variable_is_read(compose: dict) -> None:
    fields = settings_fields()
    for name in FILES:
        for svc, spec in services(load(name)).items():
            for var in env_of(spec):
                if var in THIRD_PARTY_ENV or var == "OPD_API_KEY":
                    continue
                if var.startswith("OPD_TRAIN_"):
                    assert run_config_has(var.removeprefix("OPD_TRAIN_").lower().split("__")), f"{svc}: {var}"
                    continue
                prefix = next((p for p in fields if var.startswith(p)), None)
                assert prefix is not None, f"{svc}: {var} belongs to no settings class"
                assert var.removeprefix(prefix).lower() in fields[prefix], f"{svc}: {var} is read by no setting"


def openapi_paths() -> dict[str, set[str]]:
    from services.common.settings import StudentSettings, TeacherSettings
    from services.student.app import build_app as student_app
    from services.teacher.app import build_app as teacher_app
    from services.trainer.app import build_app as trainer_app
    from services.common.settings import TrainerSettings

    return {
        "teacher": set(teacher_app(TeacherSettings(model="m")).openapi()["paths"]),
        "student": set(student_app(StudentSettings(model="m")).openapi()["paths"]),
        "trainer": set(trainer_app(TrainerSettings()).openapi()["paths"]),
    }


def test_healthchecks_and_ports_agree(compose: dict) -> None:
    paths = openapi_paths()
    port_of = {}
    for svc, spec in services(compose).items():
        port = int(option(spec["command"], "--port"))
        port_of[svc] = port
        assert option(spec["command"], "--host") == "0.0.0.0", f"{svc} must listen beyond the container"
        url = urlparse(spec["healthcheck"]["test"][-1])
        assert url.port == port, svc
        assert url.path in paths[svc], f"{svc}: {url.path} is not in its OpenAPI document"
        assert url.path == "/ready"
        mapped = [m for m in spec["ports"] if re.fullmatch(rf'.*:{port}', str(m))]
        assert mapped, f"{svc}: no port mapping to container port {port}"
    env = env_of(services(compose)["trainer"])
    teacher = urlparse(env["OPD_TRAIN_TEACHER_URLS"])
    student = urlparse(env["OPD_TRAIN_STUDENT_URL"])
    assert (teacher.hostname, teacher.port) == ("teacher", port_of["teacher"])
    assert (student.hostname, student.port) == ("student", port_of["student"])


def test_gpu_reservations_and_cpu_override(compose: dict) -> None:
    for svc in ("teacher", "student"):
        devices = services(compose)[svc]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    cpu = services(load("docker-compose.cpu.yml"))
    for svc in services(compose):
        assert cpu[svc]["build"]["args"]["VARIANT"] == "cpu"
        assert "deploy" in cpu[svc]  # reset: no GPU reservation on CPU hosts


def test_models_and_key_come_from_the_environment(compose: dict) -> None:
    """Swapping the teacher is one variable; a missing secret stops start-up."""
    teacher = env_of(services(compose)["teacher"])
    assert teacher["OPD_TEACHER_MODEL"].startswith("${TEACHER_MODEL:?")
    assert env_of(services(compose)["student"])["OPD_STUDENT_MODEL"].startswith("${STUDENT_MODEL:?")
    trainer = env_of(services(compose)["trainer"])
    assert not any("TEACHER_MODEL" in v for v in trainer.values()), "the trainer must not know the teacher's model"
    for spec in services(compose).values():
        assert env_of(spec)["OPD_API_KEY"].startswith("${OPD_API_KEY:?")
        assert any(v.endswith(":/data") for v in spec["volumes"])
    deps = services(compose)["trainer"]["depends_on"]
    assert deps == {"teacher": {"condition": "service_healthy"}, "student": {"condition": "service_healthy"}}
