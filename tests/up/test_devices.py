"""Where `opd up` runs each service on a GPU host (services/up/devices.py), checked on a CPU: the environment
and engine arguments each process gets, the replicas' split of a device list, and every refusal, named."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from rich.console import Console

from opd.common.errors import InvalidInput
from opd.up.config import DEFAULT_CONFIG, load_stack
from opd.up.devices import check
from opd.up.runner import Stack

CONFIGS = DEFAULT_CONFIG.parent
MODEL = {"path": "models/m"}


def stack_file(tmp_path: Path, teacher: dict | None = None, student: dict | None = None, trainer: dict | None = None) -> Path:
    data = {"workdir": str(tmp_path / "w"), "teacher": {"model": MODEL, "port": 8101, **(teacher or {})},
            "student": {"model": MODEL, "port": 8102, **(student or {})}, "trainer": {"port": 8100, **(trainer or {})}}
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def processes(stack: Stack) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each service process as `opd up` makes it (not started): its command line and the environment it adds."""
    out = {}
    for name, spec in [*stack.config.teacher_specs.items(), *[(n, stack.config.student) for n in stack.config.student.names]]:
        proc = stack._process(name, [name.split("-")[0], "serve", "--model", "m", "--engine", spec.engine], 9000)
        out[name] = (proc.args, proc.env)
    proc = stack._process("trainer", ["trainer", "serve", "--nproc", str(stack.config.trainer.processes)], 9001)
    out["trainer"] = (proc.args, proc.env)
    return out


def test_the_eight_gpu_stack_gives_each_process_its_devices(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    stack = Stack(load_stack(CONFIGS / "gpu8.yaml"), Console())
    procs = processes(stack)
    assert {name: env["CUDA_VISIBLE_DEVICES"] for name, (_, env) in procs.items()} == {
        "teacher": "0,1,2,3", "student-1": "4", "student-2": "5", "trainer": "6,7"}
    teacher_args = procs["teacher"][0]
    assert teacher_args[teacher_args.index("--tensor-parallel-size") + 1] == "4"
    assert teacher_args[teacher_args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--tensor-parallel-size" not in procs["student-1"][0]
    trainer_args = procs["trainer"][0]
    assert trainer_args[trainer_args.index("--nproc") + 1] == "2", "one trainer process per GPU"


def test_devices_are_indices_among_the_gpus_opd_up_sees(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "8,9,10,11,12,13,14,15")
    procs = processes(Stack(load_stack(CONFIGS / "gpu8.yaml"), Console()))
    assert procs["teacher"][1]["CUDA_VISIBLE_DEVICES"] == "8,9,10,11" and procs["trainer"][1]["CUDA_VISIBLE_DEVICES"] == "14,15"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    with pytest.raises(InvalidInput, match=r"teacher: devices \[0, 1, 2, 3\], but CUDA_VISIBLE_DEVICES=3,4 leaves opd up 2"):
        processes(Stack(load_stack(CONFIGS / "gpu8.yaml"), Console()))


def test_one_gpu_shared_by_memory_shares_and_cpu_and_unset(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    procs = processes(Stack(load_stack(CONFIGS / "gpu1.yaml"), Console()))
    assert {env["CUDA_VISIBLE_DEVICES"] for _, env in procs.values()} == {"0"}
    assert all(args[args.index("--gpu-memory-utilization") + 1] == "0.3" for name, (args, _) in procs.items() if name != "trainer")
    cpu = processes(Stack(load_stack(stack_file(tmp_path, trainer={"devices": "cpu"})), Console()))
    assert cpu["trainer"][1]["CUDA_VISIBLE_DEVICES"] == "", "devices: cpu hides every GPU"
    assert "CUDA_VISIBLE_DEVICES" not in cpu["teacher"][1], "unset: the process sees what opd up sees"
    assert "--gpu-memory-utilization" not in cpu["teacher"][0] and "--tensor-parallel-size" not in cpu["teacher"][0]


def test_replicas_split_a_device_list_or_take_one_each(tmp_path) -> None:
    def students(devices, replicas: int) -> list[list[int] | None]:
        stack = load_stack(stack_file(tmp_path, student={"replicas": replicas, "devices": devices}))
        return [p.devices for p in stack.placements() if p.name.startswith("student")]

    assert students([4, 5], 2) == [[4], [5]]
    assert students([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert students([[6], [2]], 2) == [[6], [2]]
    assert students("cpu", 3) == [[], [], []]
    with pytest.raises(InvalidInput, match=r"student.devices: 3 devices \[0, 1, 2\] do not split evenly over 2 replicas"):
        students([0, 1, 2], 2)
    with pytest.raises(InvalidInput, match=r"student.devices: 1 lists for 2 replicas"):
        students([[0]], 2)


def test_each_refusal_names_the_services_and_devices(tmp_path) -> None:
    refused = {
        r"GPU 0 is shared by teacher, student: give teacher, student a gpu_memory_utilization":
            dict(teacher={"devices": [0]}, student={"devices": [0]}),
        r"GPU 1 is shared by teacher, student-2: give student-2 a gpu_memory_utilization":
            dict(teacher={"devices": [1], "gpu_memory_utilization": 0.5}, student={"replicas": 2, "devices": [0, 1]}),
        r"GPU 0 is shared by teacher, student: the vLLM engines' gpu_memory_utilization sum to 1.2":
            dict(teacher={"devices": [0], "gpu_memory_utilization": 0.6}, student={"devices": [0], "gpu_memory_utilization": 0.6}),
        r"GPU 2 is shared by teacher, student, trainer: .* sum to 1, .* with room left for trainer":
            dict(teacher={"devices": [2], "gpu_memory_utilization": 0.5}, student={"devices": [2], "gpu_memory_utilization": 0.5},
                 trainer={"devices": [2]}),
        r"teacher: tensor_parallel_size 4 does not divide its 2 devices \[0, 1\]":
            dict(teacher={"devices": [0, 1], "tensor_parallel_size": 4}),
        r"student: the hf engine runs on one device; \[0, 1\] given":
            dict(student={"engine": "hf", "devices": [0, 1]}),
        r"teacher: tensor_parallel_size is vLLM's":
            dict(teacher={"engine": "hf", "tensor_parallel_size": 2}),
        r"trainer: nproc: 3 processes on 2 devices \[6, 7\]":
            dict(trainer={"devices": [6, 7], "nproc": 3}),
    }
    for message, fields in refused.items():
        with pytest.raises(InvalidInput, match=message):
            load_stack(stack_file(tmp_path, **fields))
    shared = load_stack(stack_file(tmp_path, teacher={"devices": [0], "gpu_memory_utilization": 0.5},
                                   student={"devices": [0], "gpu_memory_utilization": 0.4}, trainer={"devices": [0]}))
    assert shared.trainer.processes == 1, "shares that leave room are taken"


def test_more_devices_than_the_host_has_are_refused_by_name(monkeypatch) -> None:
    placements = load_stack(CONFIGS / "gpu8.yaml").placements()
    check(placements, host_gpus=8)
    check(placements, host_gpus=None)  # no CUDA runtime: not checked
    with pytest.raises(InvalidInput, match=r"devices \[4, 5, 6, 7\] \(student-1, student-2, trainer\): this host has 4 GPU"):
        check(placements, host_gpus=4)
    stack = Stack(load_stack(CONFIGS / "gpu8.yaml"), Console())
    monkeypatch.setattr("opd.up.runner.host_gpu_count", lambda: 6)
    with pytest.raises(InvalidInput, match=r"devices \[6, 7\] \(trainer\): this host has 6 GPU"):
        stack.check_devices()


def test_the_serve_commands_take_the_engine_arguments() -> None:
    from opd.cli import app
    from opd.common.cli_options import build_settings
    from opd.common.settings import StudentSettings, TeacherSettings

    group = typer.main.get_command(app)
    for service in ("teacher", "student"):
        command = group.commands[service].commands["serve"]
        context = command.make_context("serve", ["--model", "m", "--tensor-parallel-size", "4", "--gpu-memory-utilization", "0.3"])
        assert context.params["tensor_parallel_size"] == 4 and context.params["gpu_memory_utilization"] == 0.3
    for cls in (TeacherSettings, StudentSettings):
        settings = build_settings(cls, model="m", tensor_parallel_size=4, gpu_memory_utilization=0.3)
        assert (settings.tensor_parallel_size, settings.gpu_memory_utilization) == (4, 0.3)
