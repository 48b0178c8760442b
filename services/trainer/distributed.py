"""The trainer on N processes under torchrun: rank 0 orchestrates, every rank trains its share.

    torchrun --nproc-per-node 2 -m opd trainer serve     # or: opd trainer serve --nproc 2
    torchrun --nproc-per-node 2 -m opd train run.yaml    # or: opd train run.yaml --nproc 2

Choices:
1) PyTorch's own launcher and rendezvous (torchrun: `--nnodes`, `--rdzv-*`
   for several nodes); the default process group is gloo on a CPU and NCCL
   on CUDA (each rank on `cuda:LOCAL_RANK`). With WORLD_SIZE 1 (or no
   torchrun) nothing here runs: the trainer is the one-process trainer.
2) Rank 0 is the trainer of today: it serves HTTP (or runs `opd train`),
   talks to the teacher and the student, and drives the loop. The other
   ranks run `follow`: they wait for rank 0's commands on a gloo group of
   their own ("open" a run's policy, "train" on a step's samples, "save" or
   "load" a checkpoint, "publish" a version, "close", "exit") and call the
   same `Policy` method with the same arguments, so every collective is
   issued in the same order on every rank. Commands go as pickled objects
   (`broadcast_object_list`): a step's samples are token ids, kilobytes to
   a few megabytes.
3) The student is sharded with FSDP2 (`fully_shard`): each block the model
   names in `_no_split_modules` (its decoder layers), then the whole model,
   so embeddings and a tied LM head share the root group. LoRA (peft) and
   full fine-tuning, float32 and bf16, as on one process.
4) A rank that fails raises and exits: torchrun then stops the others, and
   whoever supervises the trainer (`opd up`, compose) restarts it; the run
   resumes from its last checkpoint. A worker waits for the next command
   without a deadline (the control group's timeout is a week): between runs
   of the service it may wait for hours.
5) Signals: torchrun starts each rank in a session of its own and passes a
   SIGINT or SIGTERM it gets on to every rank (then SIGKILL after
   `--shutdown-timeout`, SHUTDOWN_S here). A worker ignores them; rank 0 ends
   its run with a checkpoint (a collective the workers join), then sends
   "exit". Every rank asks Linux to SIGKILL it when its parent (torchrun's
   agent) dies, so a SIGKILL to the launcher's process group leaves no rank
   behind. A rank 0 that dies without a word breaks the group's
   connections, and the workers' wait ends with an error.
6) Files: every rank writes its shard of a checkpoint into the same folder
   (torch.distributed.checkpoint), so several nodes need a shared
   output_dir; policy versions are written by rank 0 alone.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger("opd.trainer")
WAIT_FOR_COMMANDS = timedelta(days=7)
SHUTDOWN_S = 300  # torchrun's grace for the ranks after passing a stop signal on: rank 0 finishes a step and checkpoints
_group: Group | None = None


@dataclass
class Group:
    """This process's place among the trainer's processes."""

    rank: int
    world: int
    local_rank: int
    device: str  # where this rank's shard lives: "cpu" or "cuda:<local rank>"
    control: Any  # a gloo process group for commands and small results

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, command: tuple) -> None:
        """Rank 0: every other rank gets `command` (a tuple: name, *arguments)."""
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0, group=self.control)

    def receive(self) -> tuple:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value, group=self.control)
        return out

    def most(self, value: int) -> int:
        """The largest of every rank's `value`."""
        return max(self.gather(value))


def current() -> Group | None:
    """The trainer's process group, once `init` made one (WORLD_SIZE > 1); None for one process."""
    return _group


def init(environ: dict[str, str] | None = None) -> Group | None:
    """Joins the process group torchrun describes in the environment; None when there is one process."""
    global _group
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or _group is not None:
        return _group
    import torch.distributed as dist

    die_with_parent()
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo", timeout=WAIT_FOR_COMMANDS)
    _group = Group(rank, world, local_rank, f"cuda:{local_rank}" if cuda else "cpu", control)
    log.info("trainer process %d of %d (%s)", rank, world, _group.device)
    return _group


def relaunch(nproc: int, environ: dict[str, str] | None = None) -> None:
    """Runs this very command again under torchrun with `nproc` processes on this machine; this process
    becomes torchrun's agent (same pid, same process group: a supervisor's signals reach every rank) and
    exits with the ranks' outcome. Returns at once when torchrun started this process, or when `nproc` is 1."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    env = os.environ if environ is None else environ
    if nproc <= 1 or "WORLD_SIZE" in env:
        return
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                         f"--shutdown-timeout={SHUTDOWN_S}", "-m", "opd"])
    args.training_script_args = sys.argv[1:]  # set, not parsed: torchrun would take `--nproc` for its own option
    log.info("starting %d trainer processes (torchrun --standalone --nproc-per-node %d)", nproc, nproc)
    try:
        run(args)
    except ChildFailedError as exc:
        first = exc.get_first_failure()[1]
        sys.exit(first.exitcode if first.exitcode > 0 else 1)
    except SignalException as exc:  # torchrun passed the signal on and waited for the ranks: a stop, not a failure
        log.info("stopped by signal %d", exc.sigval)
        sys.exit(128 + int(exc.sigval))
    sys.exit(0)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (torchrun's agent) dies; elsewhere nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent was gone already
        os._exit(1)


def shutdown() -> None:
    """Rank 0: the workers leave `follow`; every rank leaves the process group."""
    global _group
    if _group is None:
        return
    import torch.distributed as dist

    if _group.leader:
        _group.send(("exit",))
    dist.destroy_process_group()
    _group = None


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each block the model names in `_no_split_modules`, then the root."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def follow(group: Group) -> None:
    """A worker rank: runs rank 0's commands on its own shard until "exit"."""
    from opd.trainer.policy import Policy

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.getLogger().setLevel(logging.WARNING)  # rank 0 says what the run does
    policy: Policy | None = None
    while True:
        name, *args = group.receive()
        if name == "exit":  # leave the process group before the interpreter does: gloo's threads, left running
            shutdown()      # into exit, abort the process ("terminate called without an active exception")
            return
        if name == "open":
            policy = Policy(args[0], group)
        elif name == "close":
            if policy is not None:
                policy.close()
            policy = None
        else:
            assert policy is not None, f"command {name!r} before a run opened its policy"
            getattr(policy, name)(*args)


class Leader:
    """Rank 0's handle on the policy of every rank: each call goes to the workers, then runs here."""

    def __init__(self, policy: Any, group: Group) -> None:
        self.policy, self.group = policy, group

    def _everywhere(self, name: str, *args: Any) -> Any:
        self.group.send((name, *args))
        return getattr(self.policy, name)(*args)

    def train(self, *args: Any) -> Any:
        return self._everywhere("train", *args)

    def save_state(self, folder: Any) -> None:
        self._everywhere("save_state", folder)

    def load_state(self, folder: Any) -> None:
        self._everywhere("load_state", folder)

    def save_version(self, folder: Any) -> None:
        self._everywhere("save_version", folder)

    def close(self) -> None:
        self.group.send(("close",))
        self.policy.close()

    def __getattr__(self, name: str) -> Any:  # what rank 0 alone reads or does: tokenizer, lr, save_base
        return getattr(self.policy, name)


def open_policy(config: Any) -> Any:
    """The run's trainable student: on one process a `Policy`; under torchrun, every rank's (through `Leader`)."""
    from opd.trainer.policy import Policy

    group = current()
    if group is None:
        return Policy(config)
    group.send(("open", config))
    return Leader(Policy(config, group), group)
