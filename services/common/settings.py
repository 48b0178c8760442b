"""Service settings, read from `OPD_*` environment variables (pydantic-settings).

Each service has one settings class with its own prefix (`OPD_TEACHER_`,
`OPD_STUDENT_`, `OPD_TRAINER_`); the API key is shared as `OPD_API_KEY`.
Settings are built in the app's lifespan or the CLI, never at import, so tests
pass their own. Command-line flags override the environment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Engine = Literal["vllm", "hf"]
HOST = "Address to bind."
PORT = "Port to bind."
DType = Literal["auto", "bfloat16", "float16", "float32"]


class ServiceSettings(BaseSettings):
    """What every service reads."""

    model_config = SettingsConfigDict(env_prefix="OPD_", extra="ignore", populate_by_name=True)

    host: str = Field(default="127.0.0.1", description=HOST)
    port: int = Field(default=8000, description=PORT)
    api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPD_API_KEY"),
        description="When set, every endpoint but /health needs 'Authorization: Bearer <key>'.",
    )
    log_level: str = Field(default="info", description="Log level of the service's and uvicorn's logs: debug, info, warning, error.")
    max_pending: int = Field(default=64, ge=1, description="Requests in flight or queued before 503.")
    max_body_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="Largest request body accepted, by its Content-Length (413 above).",
    )


class EngineSettings(ServiceSettings):
    """What the teacher and the student share: a model behind an engine."""

    model: str = Field(default="", description="Local folder or hub id of the model; `serve` refuses to start without one.")
    engine: Engine = Field(default="vllm", description="vllm (production) or hf (transformers).")
    dtype: DType = Field(
        default="auto", description="Weights dtype; auto: the engine's choice from the model's config (hf: the "
        "config's dtype, float32 where it names none).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Longest sequence (prompt + completion) in tokens; unset: the model's own "
        "(hf: never above max_position_embeddings, 2048 where the config has none).",
    )
    seed: int = Field(default=0, description="vLLM's engine seed; the hf engine does not read it.")
    # vLLM only.
    kv_cache_gib: float = Field(
        default=2.0, gt=0, description="vLLM without a GPU: KV cache GiB, fractions too (vLLM's kv_cache_memory_bytes; an "
        "exported VLLM_CPU_KVCACHE_SPACE, whole GiB, wins). Unused on a GPU.",
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="vLLM on a GPU: the share of the GPU's memory the engine may take.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM: tensor-parallel size, the devices one model is split across.",
    )
    # hf only.
    micro_batch_tokens: int | None = Field(
        default=None, ge=16,
        description="hf engine: padded tokens per forward (a teacher's scored sequences; a student's prompt + "
        "max_tokens per rollout); unset: 8192 on a CPU, on CUDA what half the free memory holds (at least 8192).",
    )
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda[:N]' (hf engine).")


class TeacherSettings(EngineSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_TEACHER_", extra="ignore")

    port: int = Field(default=8001, description=PORT)
    max_sequences: int = Field(default=512, ge=1, description="Sequences in one /logprobs request (413 above).")
    max_request_tokens: int = Field(default=262_144, ge=1, description="Tokens in one /logprobs request (413 above).")


class StudentSettings(EngineSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_STUDENT_", extra="ignore")

    port: int = Field(default=8002, description=PORT)
    checkpoint_root: str = Field(default="checkpoints", description="Folder that /weights paths are relative to.")
    max_prompts: int = Field(default=256, ge=1, description="Prompts in one /rollouts request (413 above).")
    max_rollouts: int = Field(default=1024, ge=1, description="prompts * n in one request (413 above).")
    max_tokens: int = Field(
        default=4096, ge=1, description="Largest max_tokens of one /rollouts request (422 above); prompt + max_tokens "
        "must also fit the model's maximum length.",
    )
    turn_tokens: int = Field(
        default=16, ge=1, description="hf engine: tokens one micro-batch decodes before the next request takes a turn.",
    )
    cuda_graphs: bool = Field(
        default=True, description="hf engine on CUDA: each decode step one CUDA graph replay (a fixed-size KV cache).",
    )
    max_lora_rank: int = Field(
        default=64, ge=1, description="Largest LoRA rank a weight swap may bring (422 above); vLLM's adapter mode "
        "sizes its LoRA slots by it.",
    )
    enable_lora: bool = Field(
        default=True, description="Accept LoRA versions on POST /weights; false: full checkpoints only, and vLLM "
        "runs without LoRA.",
    )
    lora_mode: Literal["auto", "adapter", "merge"] = Field(
        default="auto",
        description="How a LoRA version is served: 'adapter' (vLLM's LoRA kernels, peft in the hf engine), 'merge' "
        "(merged into the serving weights in place: plain-weight speed), 'auto': merge in the hf engine and on a "
        "machine without a GPU, where vLLM's LoRA kernels are slow; adapter otherwise.",
    )

    @property
    def merge_lora(self) -> bool:
        if self.lora_mode == "auto":  # the hf engine's merged weights sample faster on any device
            import torch

            return self.engine == "hf" or not torch.cuda.is_available()
        return self.lora_mode == "merge"


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_TRAINER_", extra="ignore")

    port: int = Field(default=8003, description=PORT)
    max_runs: int = Field(default=1, ge=1, description="Runs at once; POST /runs answers 409 above.")
    runs_dir: str = Field(default="runs", description="Where a run without an output_dir writes (runs_dir/<id>).")
    nproc: int = Field(default=1, ge=1, description="Trainer processes on this machine (FSDP2 under torchrun; one run at a time above 1).")
