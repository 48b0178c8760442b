"""`opd teacher ...`: serve the teacher, or score an example conversation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opd.common import cli_options as o

app = typer.Typer(help="The teacher scoring service.", no_args_is_help=True)


@app.command()
def serve(
    model: o.Model = None,
    engine: o.EngineOpt = None,
    host: o.Host = None,
    port: o.Port = None,
    dtype: o.DTypeOpt = None,
    max_model_len: o.MaxModelLen = None,
    kv_cache_gib: o.KVCache = None,
    device: o.Device = None,
    tensor_parallel_size: o.TensorParallel = None,
    gpu_memory_utilization: o.GpuMemory = None,
) -> None:
    """Serve POST /logprobs (and /info, /health, /ready, /metrics)."""
    from opd.common.server import serve as run
    from opd.common.settings import TeacherSettings
    from opd.teacher.app import build_app

    settings = o.build_settings(
        TeacherSettings, model=model, engine=engine, host=host, port=port, dtype=dtype,
        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, device=device,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
    )
    run(build_app(settings), settings.host, settings.port, settings.log_level)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where models and logs go.")] = Path("runs/teacher-demo"),
    engine: o.EngineOpt = "vllm",
    port: Annotated[int, typer.Option(help="Teacher port.")] = 8001,
) -> None:
    """Prepare SmolLM2-135M-Instruct, start the teacher, score a conversation, print per-token logprobs."""
    from opd.teacher.demo import run_demo

    run_demo(workdir, engine or "vllm", port)
