"""Where the trainable student lives and how a step's work is split: one process, or FSDP2 over torchrun's.

    parallel = placement(group)              # OneProcess() without torchrun; Sharded(group) under it
    with parallel.opening():                 # the local part of opening a run (files read, the model built)
        model = parallel.load(student, prepare)
    model = parallel.place(model)            # sharded, rank 0's weights broadcast (Sharded)
    with parallel.compute():                 # forward and backward in the run's precision
        ...
    mine = parallel.share(lengths)           # the sequences this process trains on

Policy (policy.py) and the update (update.py) receive one and never ask which: this module alone holds what
differs between one process and N (in the style of torchtitan's parallelize functions).

Choices:
1) Precision. `student.dtype: float32` trains in float32. `bfloat16` is mixed
   precision: the weights that train stay float32 (master weights, and AdamW's
   moments with them), the forward and backward passes compute in bf16, and
   under FSDP the gradients are reduced in float32. One process computes under
   `torch.autocast`; FSDP gathers its float32 shards as bf16
   (`MixedPrecisionPolicy`, as torchtitan and prime-rl shard). Frozen weights
   (LoRA's base model) load in bf16: nothing updates them. `student.precision:
   pure` keeps everything in bf16, half the memory of weights and optimizer
   state; one step of a full fine-tune at lr 1e-5 then changes under 2% of the
   weights, against nearly all in mixed precision (benchmarks/bf16_updates.py).
   A policy version is written in the run's dtype either way.
2) Under torchrun the weights are read once: rank 0 loads them, the other ranks
   build the model on the meta device, and every rank gets its shards from
   rank 0's broadcast (`set_model_state_dict(broadcast_from_rank0=True)`).
   FSDP2 shards each block the model names in `_no_split_modules` (its decoder
   layers), then the whole model, so embeddings and a tied LM head share the
   root group.
3) A step's sequences are dealt longest first to the rank with the fewest
   tokens so far (`shares`); every rank runs as many micro-batches as the
   busiest (FSDP's collectives pair up), and the loss is multiplied by the
   number of ranks because FSDP averages their gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from opd.trainer.config import StudentConfig
    from opd.trainer.distributed import Group

Prepare = Callable[[torch.nn.Module], torch.nn.Module]


class Parallel(Protocol):
    """What differs between one process and N, as the policy and the update use it."""

    rank: int
    world: int
    checkpoint_group: Any  # where torch.distributed.checkpoint's ranks agree: None on one process

    @property
    def leader(self) -> bool: ...

    def opening(self) -> AbstractContextManager[None]: ...

    def load(self, student: StudentConfig, prepare: Prepare) -> torch.nn.Module: ...

    def place(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def compute(self) -> AbstractContextManager[None]: ...

    def share(self, lengths: list[int]) -> list[int]: ...

    def micro_batches(self, mine: int) -> int: ...

    def gather(self, value: Any) -> list[Any]: ...

    def whole_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None: ...

    def saved(self) -> None: ...


def placement(group: Group | None) -> Parallel:
    """The one choice between the implementations: torchrun's process group, or none."""
    return OneProcess() if group is None else Sharded(group)


def mixed(student: StudentConfig) -> bool:
    """bf16 compute over float32 weights that train (choice 1)."""
    return student.dtype == "bfloat16" and student.precision == "mixed"


def load_dtype(student: StudentConfig) -> str:
    """What the weights load in: float32 for weights that train in mixed precision (choice 1)."""
    return "float32" if mixed(student) and student.finetune == "full" else student.dtype


class OneProcess:
    rank, world, leader, checkpoint_group = 0, 1, True, None

    def __init__(self) -> None:
        self.autocast: tuple[str, bool] = ("cpu", False)

    def opening(self) -> AbstractContextManager[None]:
        return nullcontext()

    def load(self, student: StudentConfig, prepare: Prepare) -> torch.nn.Module:
        from opd.common.hf import load_causal_lm

        model = prepare(load_causal_lm(student.model, load_dtype(student), student.device))
        self.autocast = (next(model.parameters()).device.type, mixed(student))
        return model

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def compute(self) -> AbstractContextManager[None]:
        device, on = self.autocast
        return torch.autocast(device, dtype=torch.bfloat16) if on else nullcontext()

    def share(self, lengths: list[int]) -> list[int]:
        return list(range(len(lengths)))

    def micro_batches(self, mine: int) -> int:
        return mine

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def whole_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        return model.state_dict()

    def saved(self) -> None:
        return None


class Sharded:
    """FSDP2 over torchrun's processes (`group`: distributed.py)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.rank, self.world = group.rank, group.world
        self.checkpoint_group = group.control  # gloo, a week's timeout: not NCCL's 10 minutes
        self._whole: dict[str, Any] = {}
        self._compute = "float32"  # what FSDP gathers the weights as

    @property
    def leader(self) -> bool:
        return self.group.leader

    @contextmanager
    def opening(self) -> Iterator[None]:
        """Every rank's outcome is exchanged after the local part, before any collective: a path unreadable on
        one node fails the run on every rank alike."""
        with self.group.together("open"):
            yield

    def load(self, student: StudentConfig, prepare: Prepare) -> torch.nn.Module:
        """Rank 0 loads the weights (its whole state dict is kept for the broadcast); every other rank builds
        the model on the meta device, in no memory. `prepare` (the LoRA wrap) runs on every rank alike."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from opd.common.hf import load_causal_lm, resolve_dtype

        self._compute = "bfloat16" if mixed(student) else "float32"
        dtype = load_dtype(student)
        check_device(student.device, self.group.device)
        if self.leader:
            model = prepare(load_causal_lm(student.model, dtype, self.group.device))
            self._whole = model.state_dict()
            return model
        config = AutoConfig.from_pretrained(student.model)
        torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
        with torch.device("meta"):
            return prepare(AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval())

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shards `load`'s model; rank 0's weights and buffers are broadcast, each rank keeping its shard."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        shard(model, self._compute)
        if not self.leader:
            model.to_empty(device=self.group.device)
        whole, self._whole = self._whole, {}
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del whole
        for buffer in model.buffers():  # not in the state dict (rotary frequencies): rank 0's, sent to the rest
            dist.broadcast(buffer, src=0)
        release_freed_memory()
        return model

    def compute(self) -> AbstractContextManager[None]:
        return nullcontext()  # FSDP casts the gathered weights and the inputs itself

    def share(self, lengths: list[int]) -> list[int]:
        return shares(lengths, self.world)[self.rank]

    def micro_batches(self, mine: int) -> int:
        return max(self.gather(mine))

    def gather(self, value: Any) -> list[Any]:
        return self.group.gather(value)

    def whole_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Every rank gives its shards; rank 0 gets the whole state (in CPU memory), the others None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        whole = get_model_state_dict(model, options=options)
        return whole if self.leader else None

    def saved(self) -> None:
        self.group.gather(None)  # every rank's files are written before rank 0 moves the folder into place


def check_device(wanted: str, rank_device: str) -> None:
    """Under torchrun each rank trains on its own device (cuda:LOCAL_RANK, or the CPU where no GPU is visible):
    `student.device` may say auto, or that device's kind."""
    kind = rank_device.split(":")[0]
    if wanted not in ("auto", kind):
        from opd.trainer.config import ConfigError

        raise ConfigError(
            f"student.device {wanted!r}, but the trainer's processes run on {kind} (this one on {rank_device}): "
            + ("set student.device to auto or cuda (each process takes cuda:LOCAL_RANK)" if kind == "cuda" else
               "no GPU is visible to the trainer; set student.device to auto or cpu")
            + ("; for a CPU trainer on a GPU host, hide the GPUs (CUDA_VISIBLE_DEVICES='', devices: cpu in opd up)"
               if wanted == "cpu" else ""))


def release_freed_memory() -> None:
    """glibc keeps memory freed by small and mid-sized allocations for reuse; the whole model rank 0 loaded would
    stay resident beside its shard. Hands it back to the system (a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def shard(model: torch.nn.Module, dtype: str = "float32") -> torch.nn.Module:
    """FSDP2: each block the model names in `_no_split_modules`, then the root. With `dtype` bfloat16 the weights
    stay as loaded (float32 for what trains) and are gathered as bf16; gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    # the root (embeddings, a tied head) stays gathered from forward to backward: the head is the first thing
    # backward needs, so resharding it after forward would only gather it again at once (as torchtitan does)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return model


def shares(lengths: list[int], ranks: int) -> list[list[int]]:
    """Sequence indices per rank, balanced by tokens: longest first to the rank with the fewest so far; each in order."""
    out: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += lengths[i]
    return [sorted(share) for share in out]
