"""Files a run writes: policy versions for the student, and the trainer's own state.

Choices:
1) Everything is written into a temporary sibling folder, every file and the
   folder are fsynced, and the folder is renamed into place: a reader (the
   student service, a resumed trainer) sees a complete folder or none. A
   folder that already exists (a version number reused after the student
   restarted) is swapped with the new one in one step (Linux renameat2
   RENAME_EXCHANGE), so a crash leaves the old or the new one, never neither;
   where the system cannot, the old one is moved aside first.
2) Policy versions live under `checkpoint_root/<run name>/v<version>` (the
   student's --checkpoint-root), only the newest `keep` are kept.
3) Trainer checkpoints live under `output_dir/checkpoints/step-<N>` and hold
   the trainable weights, the optimizer and scheduler, the step, the sampler
   position, the policy version and every RNG state: enough to continue
   exactly as if the run had never stopped. The newest complete one wins.
   Each also holds the run's config.json, so a resume can check that it
   belongs to the same run.
4) Weights and optimizer state go through torch.distributed.checkpoint
   (`trainable/`, keyed by parameter name): one process or N sharded ones
   write the same thing, and a run saved on N processes resumes on M, on
   another device too (student.device may change on resume). `state.pt`
   (rank 0) holds the step, the policy version and the sampler;
   `rng-<rank>.pt` each rank's schedule and RNG state (a rank with none of
   its own, resuming on more processes, takes rank 0's). `read_trainable` gives the
   weights as one plain dict. Checkpoints of older versions
   (`trainable.safetensors`) still resume on one process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opd.common.errors import Conflict

STEP_DIR = re.compile(r"^step-(\d{6,})$")
VERSION_DIR = re.compile(r"^v(\d{6,})$")


def fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary folder; on success it is fsynced and renamed to `final` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if not (final.exists() and exchange(tmp, final)):  # swapped: tmp now holds the old folder
            if final.exists():  # no atomic swap here: move the old one aside first
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def numbered(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in folder.iterdir() if d.is_dir() and (m := pattern.match(d.name))]
    return sorted(found)


class PolicyStore:
    """Policy versions under `root/<run>/v<version>`, as paths relative to `root` for POST /weights."""

    def __init__(self, root: str | Path, run: str, keep: int = 2) -> None:
        self.root, self.run, self.keep = Path(root), run, keep

    def relative(self, version: int) -> str:
        return f"{self.run}/v{version:06d}"

    def write(self, version: int, save: Callable[[Path], None]) -> str:
        with atomic_dir(self.root / self.relative(version)) as tmp:
            save(tmp)
        self.prune(version)
        return self.relative(version)

    def prune(self, current: int) -> None:
        # Versions above `current` belong to a killed run that this one resumed;
        # the student may still hold the newest older ones, so `keep` of them stay.
        versions = numbered(self.root / self.run, VERSION_DIR)
        older = [path for v, path in versions if v <= current]
        for path in older[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)


class CheckpointError(Conflict):
    """A checkpoint does not fit the run that tries to resume from it."""


@dataclass
class TrainerState:
    step: int
    policy_version: int
    sampler: dict[str, int]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resume may see fewer GPUs
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and torch.cuda.current_device() < len(state["cuda"]):  # written with every visible GPU's
        torch.cuda.set_rng_state(state["cuda"][torch.cuda.current_device()])


TRAINABLE = "trainable"  # the torch.distributed.checkpoint folder inside a checkpoint
# torch.distributed.checkpoint on one process says so each time: it is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
# Loading: only the trainable weights, and the checkpoint may hold what this model lacks (caught by the key check).
LOAD_OPTIONS = dict(ignore_frozen_params=True, strict=False)


def save_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0, process_group: Any = None,
) -> None:
    """Trainable weights and optimizer state (every rank its shard), the schedule and this rank's RNG state.
    `process_group`: where the ranks agree on the plan (the trainer's gloo group: no NCCL timeout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    stepped = bool(optimizer.state)
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    if not stepped:  # get_state_dict filled an empty state with a real step() (step 1, zero moments): undo it
        optimizer.state.clear()
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=folder / TRAINABLE, process_group=process_group)
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "optimizer_stepped": stepped},
               folder / f"rng-{rank}.pt")


def load_training_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0, process_group: Any = None,
) -> None:
    """Restores what `save_training_state` wrote, whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if (folder / "trainable.safetensors").is_file():
        return load_legacy(folder, model, optimizer, scheduler)
    saved = set(dcp.FileSystemReader(folder / TRAINABLE).read_metadata().state_dict_metadata)
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    missing = sorted(k for k in weights if f"model.{k}" not in saved)
    unknown = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k[len("model."):] not in weights)
    if missing or unknown:
        raise CheckpointError(
            f"{folder} does not fit this model (missing tensors: {missing[:3]}, unknown tensors: {unknown[:3]}): "
            "resume with the config that wrote it, or start a new run in another output_dir"
        )
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=folder / TRAINABLE, process_group=process_group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(**LOAD_OPTIONS))
    mine = folder / f"rng-{rank}.pt"
    # map_location: RNG states must be CPU tensors, whatever device saved them
    saved_state = torch.load(mine if mine.is_file() else folder / "rng-0.pt", map_location="cpu", weights_only=False)
    if not saved_state.get("optimizer_stepped", True):  # saved before the first step: AdamW starts afresh
        optimizer.state.clear()
    scheduler.load_state_dict(saved_state["scheduler"])
    set_rng_state(saved_state["rng"])


def load_legacy(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """A checkpoint of opd before torch.distributed.checkpoint: whole tensors, on one process."""
    from safetensors.torch import load_file

    if torch.distributed.is_initialized():
        raise CheckpointError(f"{folder} was written by an older opd on one process: resume it on one process once")
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing or len(weights) != sum(p.requires_grad for p in params.values()):
        raise CheckpointError(
            f"{folder} does not fit this model (unknown tensors: {missing[:3]}): "
            "resume with the config that wrote it, or start a new run in another output_dir"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])


def read_trainable(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights as whole tensors by parameter name, on one process, without a model."""
    if (folder / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "trainable.safetensors"))
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder / TRAINABLE, Path(tmp) / "all.pt")
        everything = torch.load(Path(tmp) / "all.pt", map_location="cpu", weights_only=False)
    return dict(everything["model"])


def save_checkpoint(
    output_dir: str | Path,
    state: TrainerState,
    policy: Any,
    keep: int = 2,
    config_json: str | None = None,
) -> Path:
    """Rank 0: a complete checkpoint folder; `policy.save_state` writes the weights (on every rank under torchrun)."""
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"step-{state.step:06d}"
    with atomic_dir(final) as tmp:
        if config_json is not None:
            (tmp / "config.json").write_text(config_json)
        policy.save_state(tmp)
        torch.save({"step": state.step, "policy_version": state.policy_version, "sampler": state.sampler}, tmp / "state.pt")
    for _, old in numbered(folder, STEP_DIR)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = numbered(Path(output_dir) / "checkpoints", STEP_DIR)
    return found[-1][1] if found else None


def load_checkpoint(path: Path, policy: Any) -> TrainerState:
    """Restores weights, optimizer, scheduler and RNG states in place (every rank); returns the loop's counters."""
    policy.load_state(path)
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return TrainerState(saved["step"], saved["policy_version"], saved["sampler"])
