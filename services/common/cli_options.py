"""Command-line options shared by `opd teacher serve` and `opd student serve`.

Every option defaults to None, meaning "not given": the settings class then
reads the environment (`OPD_TEACHER_*`, `OPD_STUDENT_*`) or its default.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from opd.common.settings import DType, Engine, EngineSettings

Model = Annotated[str | None, typer.Option(help="Local model folder or hub id.")]
EngineOpt = Annotated[Engine | None, typer.Option("--engine", help="vllm (production) or hf (transformers).")]
Host = Annotated[str | None, typer.Option(help="Address to bind.")]
Port = Annotated[int | None, typer.Option(help="Port to bind.")]
DTypeOpt = Annotated[DType | None, typer.Option("--dtype", help="Weights dtype.")]
MaxModelLen = Annotated[int | None, typer.Option(help="Maximum tokens per sequence.")]
KVCache = Annotated[float | None, typer.Option(help="KV cache GiB (vLLM CPU build).")]
Device = Annotated[str | None, typer.Option(help="hf engine device: auto, cpu, cuda.")]
TensorParallel = Annotated[int | None, typer.Option(help="vLLM: the GPUs one engine is split across.")]
GpuMemory = Annotated[float | None, typer.Option(help="vLLM on a GPU: the share of each GPU's memory it may take.")]

S = TypeVar("S", bound=EngineSettings)


def build_settings(cls: type[S], **given: Any) -> S:
    """Settings from the given options over the environment; exits with the bad field named."""
    try:
        settings = cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not settings.model:
        prefix = cls.model_config.get("env_prefix", "OPD_")
        raise typer.BadParameter(f"no model: pass --model or set {prefix}MODEL")
    return settings
