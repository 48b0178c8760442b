"""Builds vLLM's AsyncLLM from opd engine settings (teacher and student alike).

On machines without a GPU (vLLM's CPU build), the KV cache takes `kv_cache_gib`
(vLLM's `kv_cache_memory_bytes`: fractions of a GiB too; an exported
`VLLM_CPU_KVCACHE_SPACE`, vLLM's legacy variable in whole GiB, wins) and CUDA
graphs are off (`enforce_eager`). vLLM's automatic CPU binding keeps
one core for its scheduler and runs the model on the others: on a 2-core
machine that is one core, the same one for the teacher and the student, while
the other idles. Unless `VLLM_CPU_OMP_THREADS_BIND` is set, an engine binds
its model threads to every core this process may use instead: the teacher
and the student take turns within a step, and each turn gets the machine.
"""

from __future__ import annotations

import os
from typing import Any

from opd.common.settings import EngineSettings


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_async_llm(settings: EngineSettings, **extra: Any):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    gpu = on_gpu()
    if not gpu:
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # exported, vLLM's platform code would override this
            extra.setdefault("kv_cache_memory_bytes", int(settings.kv_cache_gib * 2**30))
        if settings.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    args = AsyncEngineArgs(
        model=settings.model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        enforce_eager=not gpu,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        disable_log_stats=True,
        **extra,
    )
    return AsyncLLM.from_engine_args(args)
