"""Where each service of an `opd up` stack runs: its GPUs, its share of their memory, its tensor parallelism.

    teacher: {devices: [0, 1, 2, 3], tensor_parallel_size: 4}             # one engine over 4 GPUs
    student: {replicas: 2, devices: [4, 5]}                              # replica i: its share, [4] and [5]
    student: {replicas: 2, devices: [[4], [5]]}                          # or a list per replica
    trainer: {devices: [6, 7]}                                           # nproc: 2, one rank per GPU
    teacher: {devices: [0], gpu_memory_utilization: 0.35}                # one GPU shared, by memory shares
    trainer: {devices: cpu}                                              # the CPU, on a GPU host

Choices:
1) `devices` are indices among the GPUs `opd up` itself sees: each process
   gets them as CUDA_VISIBLE_DEVICES (mapped through `opd up`'s own
   CUDA_VISIBLE_DEVICES when that is set), so inside it they are cuda:0..n-1.
   `cpu` is an empty CUDA_VISIBLE_DEVICES: no GPU. Unset: the process
   inherits what `opd up` sees, as before.
2) Student replicas split a flat list evenly, in order ([4, 5] over 2
   replicas: [4] and [5]; it must divide), or take a list each.
3) vLLM engines get `--tensor-parallel-size` and `--gpu-memory-utilization`
   (a per-engine cap on its share of each GPU's memory); tensor parallelism
   must divide the engine's devices. The hf engine runs on one device.
4) A GPU named by several processes is refused unless every vLLM engine on
   it gives its `gpu_memory_utilization` and those shares sum to at most 1,
   below 1 if a process without a share (the trainer, an hf engine) is on it
   too: that one takes what the engines leave.
5) The trainer's `nproc` defaults to its device count, one rank per GPU.
6) More GPUs named than the host has is refused, naming them, where the
   CUDA runtime answers (`host_gpus`); without it the check is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from opd.common.errors import InvalidInput

DeviceList = list[int] | Literal["cpu"] | None
VLLM_DEFAULT_SHARE = 0.85  # EngineSettings.gpu_memory_utilization's default


class PlacementError(InvalidInput, ValueError):
    """A placement that cannot start; a ValueError too, so the stack file's validation names its field."""


@dataclass(frozen=True)
class Placement:
    """One process: the GPUs it may see (None: whatever `opd up` sees; []: none) and its engine arguments."""

    name: str
    devices: list[int] | None
    engine: str | None = None  # "vllm" or "hf"; None for the trainer
    share: float | None = None  # vLLM's gpu_memory_utilization, as given
    tensor_parallel_size: int = 1
    args: list[str] = field(default_factory=list)

    def env(self, visible: str | None = None) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for this process; `visible`: `opd up`'s own CUDA_VISIBLE_DEVICES."""
        if self.devices is None:
            return {}
        ids = [s.strip() for s in visible.split(",")] if visible else None
        if ids and any(d >= len(ids) for d in self.devices):
            raise PlacementError(f"{self.name}: devices {self.devices}, but CUDA_VISIBLE_DEVICES={visible} leaves opd up "
                                 f"{len(ids)} GPU(s), numbered from 0")
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[d] if ids else str(d) for d in self.devices)}


def engine_args(share: float | None, tensor_parallel_size: int, engine: str) -> list[str]:
    if engine != "vllm":
        return []
    args = ["--tensor-parallel-size", str(tensor_parallel_size)] if tensor_parallel_size != 1 else []
    return args + (["--gpu-memory-utilization", str(share)] if share is not None else [])


def replica_devices(devices: DeviceList | list[list[int]], replicas: int, where: str) -> list[list[int] | None]:
    """Each replica's devices (choice 2)."""
    if devices is None or devices == "cpu":
        return [None if devices is None else [] for _ in range(replicas)]
    if devices and isinstance(devices[0], list):
        if len(devices) != replicas:
            raise PlacementError(f"{where}.devices: {len(devices)} lists for {replicas} replicas: give one list per "
                               "replica, or one flat list they split")
        return [list(d) for d in devices]  # type: ignore[arg-type]
    flat: list[int] = devices  # type: ignore[assignment]
    if len(flat) % replicas:
        raise PlacementError(f"{where}.devices: {len(flat)} devices {flat} do not split evenly over {replicas} replicas: "
                           "give a multiple of the replica count, or a list per replica")
    each = len(flat) // replicas
    return [flat[i * each:(i + 1) * each] for i in range(replicas)]


def as_list(devices: DeviceList) -> list[int] | None:
    return None if devices is None else ([] if devices == "cpu" else list(devices))


def check(placements: list[Placement], host_gpus: int | None) -> None:
    """Refuses a placement that cannot start (choices 3, 4, 6), naming the processes and devices."""
    for p in placements:
        if p.engine == "hf" and p.devices and len(p.devices) > 1:
            raise PlacementError(f"{p.name}: the hf engine runs on one device; {p.devices} given: give one, or use vLLM "
                               "with tensor_parallel_size")
        if p.engine == "hf" and p.tensor_parallel_size != 1:
            raise PlacementError(f"{p.name}: tensor_parallel_size is vLLM's; the hf engine runs on one device")
        if p.engine == "vllm" and p.devices and len(p.devices) % p.tensor_parallel_size:
            raise PlacementError(f"{p.name}: tensor_parallel_size {p.tensor_parallel_size} does not divide its "
                               f"{len(p.devices)} devices {p.devices}")
    if host_gpus is not None:
        beyond = sorted({d for p in placements for d in p.devices or [] if d >= host_gpus})
        if beyond:
            who = ", ".join(p.name for p in placements if set(p.devices or []) & set(beyond))
            raise PlacementError(f"devices {beyond} ({who}): this host has {host_gpus} GPU(s), numbered from 0 "
                               "(among those CUDA_VISIBLE_DEVICES leaves opd up)")
    users: dict[int, list[Placement]] = {}
    for p in placements:
        for d in p.devices or []:
            users.setdefault(d, []).append(p)
    for device, on in sorted(users.items()):
        if len(on) < 2:
            continue
        names = ", ".join(p.name for p in on)
        unset = [p.name for p in on if p.engine == "vllm" and p.share is None]
        if unset:
            raise PlacementError(f"GPU {device} is shared by {names}: give {', '.join(unset)} a gpu_memory_utilization "
                               f"(vLLM's default takes {VLLM_DEFAULT_SHARE} of it), shares that sum to at most 1")
        total = sum(p.share or 0.0 for p in on if p.engine == "vllm")
        rest = [p.name for p in on if p.engine != "vllm"]
        if total > 1 or (rest and total >= 1):
            raise PlacementError(f"GPU {device} is shared by {names}: the vLLM engines' gpu_memory_utilization sum to "
                               f"{total:g}, more than the device holds" + (f" with room left for {', '.join(rest)}" if rest else ""))


def host_gpu_count() -> int | None:
    """GPUs this process sees through the CUDA runtime; None without one (the check is then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.device_count() if torch.cuda.is_available() else None


def visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES") or None
