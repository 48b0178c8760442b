"""`opd student ...`: serve the student rollout service."""

from __future__ import annotations

from typing import Annotated

import typer

from opd.common import cli_options as o

app = typer.Typer(help="The student rollout service.", no_args_is_help=True)

CheckpointRoot = Annotated[str | None, typer.Option(help="Folder that POST /weights paths are relative to.")]
MaxLoraRank = Annotated[int | None, typer.Option(help="Largest LoRA rank a weight swap may bring.")]
EnableLora = Annotated[bool | None, typer.Option("--enable-lora/--no-lora", help="Accept LoRA versions.")]
LoraMode = Annotated[str | None, typer.Option(
    help="auto | adapter | merge: serve LoRA versions as adapters, or merged into the weights (auto: merge in the hf engine and without a GPU).")]


@app.command()
def serve(
    model: o.Model = None,
    engine: o.EngineOpt = None,
    checkpoint_root: CheckpointRoot = None,
    host: o.Host = None,
    port: o.Port = None,
    dtype: o.DTypeOpt = None,
    max_model_len: o.MaxModelLen = None,
    kv_cache_gib: o.KVCache = None,
    device: o.Device = None,
    tensor_parallel_size: o.TensorParallel = None,
    gpu_memory_utilization: o.GpuMemory = None,
    max_lora_rank: MaxLoraRank = None,
    enable_lora: EnableLora = None,
    lora_mode: LoraMode = None,
) -> None:
    """Serve POST /rollouts and POST /weights (and /info, /health, /ready, /metrics)."""
    from opd.common.server import serve as run
    from opd.common.settings import StudentSettings
    from opd.student.app import build_app

    settings = o.build_settings(
        StudentSettings, model=model, engine=engine, checkpoint_root=checkpoint_root, host=host, port=port,
        dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, device=device,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        max_lora_rank=max_lora_rank, enable_lora=enable_lora, lora_mode=lora_mode,
    )
    run(build_app(settings), settings.host, settings.port, settings.log_level)
