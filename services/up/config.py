"""The `opd up` stack configuration: which models, which engines, which ports,
and the distillation run to submit to the trainer.

    workdir: runs/demo
    teacher: {model: {prepare: smollm2-135m-instruct}, engine: vllm, port: 8001}
    student: {model: {prepare: smollm2-135m-instruct, layers: 12}, engine: vllm, port: 8002}   # replicas: 2 -> 8002, 8012
    trainer: {port: 8003, nproc: 1}                      # nproc > 1: FSDP2 under torchrun
    run: {steps: 30, sampling: {max_tokens: 48}, ...}     # a trainer run config
    restart: {policy: on-failure, max_restarts: 3, backoff_s: 1, max_backoff_s: 30}
    stop_grace_s: 10

`run` is an ordinary trainer run config without the parts `opd up` knows
(service URLs, the student model, checkpoint and output folders); those are
filled in. The file is YAML; `--set section.field=value` overrides any field.

Student replicas: `student: {replicas: 2, port: 8002, ...}` (or
`opd up --set student.replicas=2`) runs two student processes, replica i on
port + 10*i: 8002 and 8012, clear of the trainer's 8003 (or `port: [8002, 8012]`,
a port each), each supervised on its own; the run gets their URLs as `student_urls`.

Several teachers: `teachers: {math: {model: ..., port: 8001}, style: {model: ..., port: 8011}}` in place
of `teacher:` (one or the other) runs a process per teacher, `teacher-math`, `teacher-style`, each
supervised on its own; the run gets `teachers: {name: {urls: [its URL]}}`, merged with what
`run.teachers.<name>` says (a teacher_prompt, say), and each dataset row picks its teacher by its
`teacher` field (`run.dataset.teacher_field`), else `run.default_teacher`, else the first listed.

`load_stack` validates `run` as the trainer will at POST /runs, before any
process starts: what `opd up` fills in later (models still to prepare, the
services' URLs) is a stand-in here, so a wrong type, an unknown field or a
combination the trainer refuses stops `opd up` at once, named as `run.<field>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opd.common.errors import InvalidInput
from opd.up.devices import Placement, as_list, engine_args, replica_devices
from opd.up.devices import check as check_devices
from opd.trainer.config import (
    MANY_TEACHERS, ONE_TEACHER, STUDENT_URL_FIELDS, RunConfig, TeacherName, deep_merge, parse_override, set_path,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "skill.yaml"
# What Stack.run_config fills in once the services run; only their presence and types matter to validation.
RUN_STAND_INS: dict[str, Any] = {
    "student": {"model": "student-model"},
    "teacher_urls": ["http://teacher"],
    "api_key": "key",
    "checkpoint_root": "checkpoints",
    "output_dir": "run",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Section):
    """A model folder or hub id (`path`), or a model `opd models prepare` builds (`prepare`)."""

    path: str | None = Field(default=None, description="A model folder or hub id; or give prepare.")
    prepare: str | None = Field(
        default=None, description="A model `opd models prepare` builds under <workdir>/models (smollm2-135m-instruct).")
    layers: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="With prepare: keep only the first N decoder layers.")
    drop_layers: Annotated[str | None, Field(pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")] = Field(
        default=None, description="With prepare: remove spans of middle layers, '12-21' or '3,7-9'.")
    permute_vocab: int | None = Field(
        default=None, description="With prepare: permute the vocabulary with this seed (a teacher of another tokenizer).")
    drop_merges: Annotated[int | None, Field(ge=2)] = Field(
        default=None, description="With prepare: remove every Nth BPE merge (a teacher of another segmentation).")

    @model_validator(mode="after")
    def _one(self) -> ModelSource:
        if (self.path is None) == (self.prepare is None):
            raise ValueError("give exactly one of 'path' or 'prepare'")
        variant = (self.layers, self.drop_layers, self.permute_vocab, self.drop_merges)
        if any(x is not None for x in variant) and self.prepare is None:
            raise ValueError("'layers', 'drop_layers', 'permute_vocab' and 'drop_merges' go with 'prepare'")
        if self.layers is not None and self.drop_layers is not None:
            raise ValueError("give 'layers' or 'drop_layers', not both")
        return self


Port = Annotated[int, Field(ge=1, le=65535)]
# Replica i of a single first student port serves on port + 10*i (8002, 8012, ...): clear of the trainer's 8003
# and of a second teacher's conventional 8011.
REPLICA_PORT_STEP = 10


GpuIndex = Annotated[int, Field(ge=0)]
Devices = Literal["cpu"] | Annotated[list[GpuIndex], Field(min_length=1)]
DEVICES_HELP = ("GPU indices (as opd up sees them) passed as CUDA_VISIBLE_DEVICES, or 'cpu' (no GPU); unset: every "
                "GPU opd up sees (services/up/devices.py)")


class EngineService(_Section):
    model: ModelSource = Field(description="The model it serves: give path or prepare.")
    engine: Literal["vllm", "hf"] = Field(default="vllm", description="vllm (production) or hf (transformers).")
    port: Port = Field(description="The port it serves on.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype (--dtype).")
    kv_cache_gib: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="vLLM without a GPU: KV cache GiB (--kv-cache-gib).")
    devices: Devices | None = Field(default=None, description=DEVICES_HELP + ".")
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="vLLM on a GPU: the share of each of its GPUs' memory the engine may take (the "
        "engine's default 0.85); required where services share a GPU.")
    tensor_parallel_size: Annotated[int, Field(ge=1)] = Field(
        default=1, description="vLLM: the GPUs one engine is split across; it divides the engine's devices.")


class StudentService(EngineService):
    port: Port | Annotated[tuple[Port, ...], Field(min_length=1)] = Field(  # type: ignore[assignment]
        description="The student's port; with replicas the first, replica i on port + 10*i (8002, 8012, ...), "
                    "or a list: a port per replica."
    )
    replicas: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None, description="Student processes, each step's prompts split across them (default 1, or one per port listed)."
    )
    lora_mode: Literal["auto", "adapter", "merge"] = Field(
        default="auto", description="LoRA versions as adapters or merged into the weights (auto: merged in the hf engine and without a GPU)."
    )
    devices: Devices | Annotated[list[Annotated[list[GpuIndex], Field(min_length=1)]], Field(min_length=1)] | None = Field(  # type: ignore[assignment]
        default=None, description=DEVICES_HELP + "; with replicas a flat list split evenly in order, or a list per replica.")

    @model_validator(mode="after")
    def _ports_for_replicas(self) -> StudentService:
        if isinstance(self.port, tuple) and self.replicas not in (None, len(self.port)):
            raise ValueError(f"replicas: {self.replicas} replicas, but {len(self.port)} ports listed in 'port'; "
                             "give one port per replica, or a single first port")
        if not isinstance(self.port, tuple) and self.ports[-1] > 65535:
            raise ValueError(f"port: {self.count} replicas from port {self.port}, {REPLICA_PORT_STEP} apart, pass 65535 "
                             f"(the last would be {self.ports[-1]}); give a lower first port or list a port per replica")
        return self

    @property
    def count(self) -> int:
        return len(self.port) if isinstance(self.port, tuple) else self.replicas or 1

    @property
    def ports(self) -> list[int]:
        """One port per replica."""
        if isinstance(self.port, tuple):
            return list(self.port)
        return [self.port + REPLICA_PORT_STEP * i for i in range(self.count)]

    @property
    def names(self) -> list[str]:
        """The processes' names: 'student' alone, 'student-1', 'student-2', ... for replicas."""
        return ["student"] if self.count == 1 else [f"student-{i + 1}" for i in range(self.count)]


class TrainerService(_Section):
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8003, description="The trainer service's port.")
    nproc: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Trainer processes (FSDP2 under torchrun, one per GPU); rank 0 serves the port. "
        "Default: its device count, else 1.")
    devices: Devices | None = Field(default=None, description=DEVICES_HELP + "; one trainer process per GPU.")

    @model_validator(mode="after")
    def _processes_fit_devices(self) -> TrainerService:
        if isinstance(self.devices, list) and self.nproc is not None and self.nproc != len(self.devices):
            raise ValueError(f"nproc: {self.nproc} processes on {len(self.devices)} devices {self.devices}: one "
                             "process per GPU; leave nproc out to take the device count")
        return self

    @property
    def processes(self) -> int:
        return self.nproc or (len(self.devices) if isinstance(self.devices, list) else 1)


class RestartPolicy(_Section):
    """What `opd up` does when a service exits on its own, like compose's `restart: on-failure:N`.

    The n-th restart of a service waits backoff_s * 2^(n-1) seconds (at most
    max_backoff_s); after max_restarts restarts of one service (over the whole
    run), its next crash stops everything.
    """

    policy: Literal["on-failure", "no"] = Field(
        default="on-failure", description="on-failure: restart a service that exits on its own; no: stop everything.")
    max_restarts: Annotated[int, Field(ge=0, le=100)] = Field(
        default=3, description="Restarts of one service over the whole run; its next crash stops everything.")
    backoff_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=1.0, description="The n-th restart waits backoff_s * 2^(n-1) seconds.")
    max_backoff_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0, description="The longest wait before a restart, in seconds.")


class StackConfig(_Section):
    workdir: str = Field(default="runs/demo", description="Logs, prepared models, checkpoints and the run's output go here.")
    host: str = Field(default="127.0.0.1", description="The address every service binds.")
    teacher: EngineService | None = Field(default=None, description="The teacher service; or give teachers.")
    teachers: Annotated[dict[TeacherName, EngineService], Field(min_length=1)] | None = Field(
        default=None, description="Several teachers by name, each its own process (teacher-<name>); or give teacher.")
    student: StudentService
    trainer: TrainerService = TrainerService()
    run: dict[str, Any] = Field(
        default={}, description="A trainer run config, without what opd up fills in (service URLs, student.model, "
        "api_key, checkpoint_root, output_dir).")
    startup_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=900.0, description="Seconds a service has to become ready, at start and after a restart.")
    samples_to_show: Annotated[int, Field(ge=0, le=8)] = Field(
        default=2, description="Prompts whose completions are shown before and after a completed run: the last "
        "rows of the run's JSONL eval_path, else of its path.")
    restart: RestartPolicy = RestartPolicy()
    # After the first Ctrl-C the trainer gets this long, plus the longest step
    # seen so far, to stop at its next safe point and checkpoint.
    stop_grace_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=10.0, description="After the first Ctrl-C the trainer gets this long, plus the longest step seen so "
        "far, to stop at its next safe point and checkpoint.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> StackConfig:
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("teacher: give teacher (one teacher) or teachers (several, by name)"
                             + (", not both" if self.teacher is not None else ""))
        if self.teachers is not None:
            for key in ONE_TEACHER:
                if key in self.run:
                    raise ValueError(f"run.{key}: the stack's teachers are several (`teachers`); "
                                     f"give it per teacher in run.teachers.<name>")
            unknown = set(self.run.get("teachers") or {}) - set(self.teachers)
            if unknown:
                raise ValueError(f"run.teachers: {', '.join(sorted(unknown))} not among the stack's teachers "
                                 f"({', '.join(self.teachers)})")
        elif any(key in self.run for key in MANY_TEACHERS):
            raise ValueError("run.teachers: the stack runs one teacher (`teacher`); give the stack teachers "
                             "(several, by name) to name them in the run")
        check_devices(self.placements(), host_gpus=None)  # the host's count is checked when opd up starts
        ports = [*self.teacher_ports, *self.student.ports, self.trainer.port]
        if len(set(ports)) != len(ports):
            if self.teachers is None:
                what = "teacher, student and trainer need three" if len(ports) == 3 else "teacher, student replicas and trainer need"
            else:
                what = "teachers, student" + (" replicas" if self.student.count > 1 else "") + " and trainer need"
            raise ValueError(f"{what} different ports; got {ports}")
        return self

    @property
    def teacher_specs(self) -> dict[str, EngineService]:
        """Each teacher process by name: 'teacher' alone, or 'teacher-<name>' for each of `teachers`."""
        if self.teachers is None:
            assert self.teacher is not None
            return {"teacher": self.teacher}
        return {f"teacher-{name}": spec for name, spec in self.teachers.items()}

    @property
    def teacher_ports(self) -> list[int]:
        return [spec.port for spec in self.teacher_specs.values()]

    def placements(self) -> list[Placement]:
        """Where each process runs (services/up/devices.py): teachers, student replicas, the trainer."""
        out = [Placement(name, as_list(spec.devices), spec.engine, spec.gpu_memory_utilization, spec.tensor_parallel_size,
                         engine_args(spec.gpu_memory_utilization, spec.tensor_parallel_size, spec.engine))
               for name, spec in self.teacher_specs.items()]
        s = self.student
        for name, devices in zip(s.names, replica_devices(s.devices, s.count, "student"), strict=True):
            out.append(Placement(name, devices, s.engine, s.gpu_memory_utilization, s.tensor_parallel_size,
                                 engine_args(s.gpu_memory_utilization, s.tensor_parallel_size, s.engine)))
        return [*out, Placement("trainer", as_list(self.trainer.devices))]


def load_stack(path: Path | None, overrides: list[str] | None = None) -> StackConfig:
    path = path or DEFAULT_CONFIG
    if not path.is_file():
        raise InvalidInput(f"{path}: no such config file")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        keys, value = parse_override(item)
        set_path(data, keys, value)
    try:
        stack = StackConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"{path}: {describe(exc)}") from exc
    try:
        check_run(stack)
    except ValidationError as exc:
        raise InvalidInput(f"{path}: {describe(exc, 'run')}") from exc
    return stack


def check_run(stack: StackConfig) -> RunConfig:
    """The run as the trainer will validate it at POST /runs, with stand-ins for what opd up fills in later.

    The stand-ins replace what the user gives too, as Stack.run_config does; a dataset path is stood in for
    only when none is given (opd up then uses its shipped prompts). `OPD_TRAIN_*` variables count, since the
    trainer inherits them. Raises pydantic's ValidationError."""
    run = deep_merge(without_students(stack.run), {**RUN_STAND_INS, **students_entry(
        [f"http://student-{i}" for i in range(stack.student.count)])})
    if stack.teachers is not None:
        del run["teacher_urls"]
        run = deep_merge(run, teachers_entry({name: f"http://teacher-{name}" for name in stack.teachers}))
    dataset = run.get("dataset")
    if dataset is None or isinstance(dataset, dict):
        run["dataset"] = {"path": "prompts.jsonl", **(dataset or {})}
    return RunConfig.model_validate(run)


def describe(exc: ValidationError, section: str | None = None) -> str:
    """Each error as `field.path: what is wrong`, under `section` when given (`run.steps`, as --set spells it)."""
    from opd.common.server import describe_validation_errors

    errors = [{**e, "loc": (section, *e["loc"]) if section else e["loc"]} for e in exc.errors()]
    return describe_validation_errors(errors)


def without_students(run: dict[str, Any]) -> dict[str, Any]:
    """The run without its student URLs: opd up gives its own."""
    return {k: v for k, v in run.items() if k not in STUDENT_URL_FIELDS}


def students_entry(urls: list[str]) -> dict[str, Any]:
    """`student_url` for one student (as before replicas), `student_urls` for several."""
    return {"student_url": urls[0]} if len(urls) == 1 else {"student_urls": urls}


def teachers_entry(urls: dict[str, str]) -> dict[str, Any]:
    """The run's `teachers`: each of the stack's teachers by name, with its process's URL."""
    return {"teachers": {name: {"urls": [url]} for name, url in urls.items()}}
