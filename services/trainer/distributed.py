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
   ranks run `follow` (ranks.py): they wait for rank 0's commands on a gloo
   group of their own (ranks.COMMANDS) and call the
   same `Policy` method with the same arguments, so every collective is
   issued in the same order on every rank. Commands go as pickled objects
   (`broadcast_object_list`): a step's samples are token ids, kilobytes to
   a few megabytes.
3) The student is sharded with FSDP2, its weights read once by rank 0
   (parallel.py, `Sharded`). LoRA (peft) and full fine-tuning, float32 and
   bf16, as on one process.
4) Failures. Every command ends with an exchange of outcomes on the control
   group (`Group.conclude`). A rank whose command raises writes so to the
   rendezvous store (`Watchdog`) and goes to the exchange:
   - if every rank reaches it (all raised the same `CheckpointError`, or the
     failure came after the command's last collective), the ranks are still
     in step: rank 0 raises `TrainerProcessError` (or its own error), the run
     fails, every rank drops its policy and the service keeps serving;
   - a rank still inside the command FAILURE_GRACE_S after a failure was
     written is waiting on a collective the failed rank will never join: it
     writes "abort" to the store and exits, and every rank's watchdog, seeing
     it, exits too (in seconds, not the process group's 10 or 30 minutes). A
     rank merely slower than the grace (a large model still loading when
     another rank's open failed) ends the same way: a restart, never a hang.
     Rank 0, when it is the one that failed, waits half the grace for the
     exchange; then it fails the run at once (the service reports it
     failed) and sends nothing more (`broken`) until the processes end.
     torchrun reports the failure; whoever supervises the trainer (`opd up`,
     compose) restarts it, and the run resumes from its last checkpoint.
   A worker waits for the next command without a deadline (the control
   group's timeout is a week): between runs of the service it may wait for
   hours. A rank killed outright (SIGKILL, a crash) writes nothing: torchrun
   stops the others.
5) Signals: torchrun starts each rank in a session of its own and passes a
   SIGINT or SIGTERM it gets on to every rank (then SIGKILL after
   `--shutdown-timeout`, SHUTDOWN_S here). A worker ignores them; rank 0 ends
   its run with a checkpoint (a collective the workers join), then sends
   "exit". Every rank asks Linux to SIGKILL it when its parent (torchrun's
   agent) dies, so a SIGKILL to the launcher's process group leaves no rank
   behind. A rank 0 that dies without a word breaks the group's
   connections, and the workers' wait ends with an error.
6) Files: every rank writes its shard of a checkpoint into the same folder
   (torch.distributed.checkpoint, its ranks agreeing over the control group,
   not NCCL with its 10-minute timeout), so several nodes need a shared
   output_dir; policy versions are written by rank 0 alone. Each rank keeps
   the RNG state of its own GPU only, so a run resumes on fewer GPUs.
7) Devices: rank r of a node trains on cuda:r; a node started with more
   processes than it has GPUs is refused at once, and a `student.device` that
   is not the ranks' kind is refused as the run opens (parallel.py). A CPU
   trainer on a GPU host hides the GPUs (CUDA_VISIBLE_DEVICES='').
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from opd.common.errors import OPDError

log = logging.getLogger("opd.trainer")
WAIT_FOR_COMMANDS = timedelta(days=7)
SHUTDOWN_S = 300  # torchrun's grace for the ranks after passing a stop signal on: rank 0 finishes a step and checkpoints
# After a rank failed inside a command: how long the others have to finish it (choice 4); OPD_FAILURE_GRACE_S.
FAILURE_GRACE_S = 30.0
_group: Group | None = None


class TrainerProcessError(OPDError):
    """Another of the trainer's processes failed in a command; the run fails, the processes go on together."""


class Watchdog:
    """Every rank's thread that ends the process when the ranks cannot go on together (choice 4).

    Keys in the rendezvous store: `failed/<command>` (a rank failed in that command: its message) and `abort`
    (a rank gave up: every rank exits)."""

    POLL_S = 0.5

    def __init__(self, rank: int, store: Any, grace: float | None = None) -> None:
        self.rank, self.store = rank, store
        self.grace = float(os.environ.get("OPD_FAILURE_GRACE_S", FAILURE_GRACE_S)) if grace is None else grace
        self.command = 0  # the number of the last command this rank began (every rank numbers them alike)
        self.inside = False
        self.stopped = False  # the process group is being destroyed: nothing left to watch
        self.thread = threading.Thread(target=self._watch, name="opd-watchdog", daemon=True)
        self.thread.start()
        atexit.register(self.stop)  # never inside the store's C++ code while the interpreter exits (an abort)

    def stop(self) -> None:
        self.stopped = True
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(2 * self.POLL_S + 5)

    def begin(self) -> None:
        self.command += 1
        self.inside = True

    def end(self, failure: str | None = None) -> None:
        """This rank is done with the command; `failure`: what went wrong, for the other ranks."""
        if failure is not None:
            self.store.set(f"failed/{self.command}", f"trainer process {self.rank}: {failure}")
        self.inside = False

    def abort(self, why: str) -> None:
        self.store.set("abort", why)
        self._exit(why)

    def _exit(self, why: str) -> None:
        log.error("trainer process %d exits: %s", self.rank, why)
        sys.stderr.flush()
        os._exit(1)

    def _watch(self) -> None:
        failed_at: dict[int, float] = {}
        while not self.stopped:
            time.sleep(self.POLL_S)
            if self.stopped:
                return
            command, inside = self.command, self.inside
            try:
                if self.store.check(["abort"]):
                    self._exit(self.store.get("abort").decode())
                if not inside or not self.store.check([f"failed/{command}"]):
                    continue
                first = failed_at.setdefault(command, time.monotonic())
                if time.monotonic() - first < self.grace or (self.command, self.inside) != (command, True):
                    continue
                failure = self.store.get(f"failed/{command}").decode()
            except Exception as exc:  # the store is gone with the process that held it: the group is gone too
                if self.stopped or not torch.distributed.is_initialized():
                    return
                self._exit(f"the rendezvous store is unreachable ({type(exc).__name__}: {exc})")
            self.abort(f"{failure}; trainer process {self.rank} was still inside the same command "
                       f"{self.grace:.0f} s later, waiting on it: the processes cannot go on together")


@dataclass
class Group:
    """This process's place among the trainer's processes."""

    rank: int
    world: int
    local_rank: int
    device: str  # where this rank's shard lives: "cpu" or "cuda:<local rank>"
    control: Any  # a gloo process group for commands and small results
    watchdog: Watchdog | None = field(default=None, repr=False)
    broken: bool = False  # rank 0 failed while the others wait in a collective: nothing more can be sent

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def conclude(self, name: str, call: Callable[[], Any]) -> Any:
        """Runs this rank's part of command `name`, then every rank's outcome is exchanged (choice 4). Rank 0
        raises its own error or, if only others failed, a `TrainerProcessError`; a worker logs its error and
        returns None."""
        assert self.watchdog is not None
        self.watchdog.begin()
        try:
            result = call()
        except BaseException as exc:
            failure = f"{name}: {type(exc).__name__}: {exc}"
            if not self.leader:
                log.exception("trainer process %d failed in %s", self.rank, name)
            self.watchdog.end(failure)
            if not self.leader:
                self._outcomes(failure)  # returns if every rank gets here; if not, the watchdogs end the processes
                return None
            if not self._outcomes_within(failure, self.watchdog.grace / 2):
                # The others wait inside a collective: the run fails now (the service says so), and every process
                # ends when the watchdogs give up on it; nothing more is sent meanwhile.
                self.broken = True
                ending = threading.Timer(self.watchdog.grace / 2, self.watchdog.abort, [
                    f"trainer process 0 failed in {name} while the others waited: every process ends"])
                ending.daemon = True  # even if the others were only slow, never a service that cannot train
                ending.start()
                raise TrainerProcessError(
                    f"trainer process 0: {failure}; the other processes wait inside {name} and cannot go on: every "
                    "process exits in seconds, and the run resumes from its last checkpoint once the trainer is "
                    "restarted") from exc
            raise
        self.watchdog.end()
        failures = [f"trainer process {rank}: {failure}" for rank, failure in enumerate(self._outcomes(None)) if failure]
        if failures and self.leader:
            raise TrainerProcessError(f"{'; '.join(failures)}; the run fails, the processes go on together")
        return result

    @contextmanager
    def together(self, name: str) -> Iterator[None]:
        """This rank's local work (no collective inside), then every rank's outcome: a rank that failed raises
        its error, the others a `TrainerProcessError` naming it; so all raise, or none does."""
        mine: BaseException | None = None
        try:
            yield
        except Exception as exc:
            mine = exc
        outcomes = self._outcomes(None if mine is None else f"{name}: {type(mine).__name__}: {mine}")
        if mine is not None:
            raise mine
        failures = [f"trainer process {rank}: {failure}" for rank, failure in enumerate(outcomes) if failure]
        if failures:
            raise TrainerProcessError("; ".join(failures))

    def _outcomes_within(self, mine: str | None, seconds: float) -> bool:
        """The exchange of outcomes in a thread of its own: whether every rank took part within `seconds`."""
        done = threading.Event()

        def exchange() -> None:
            self._outcomes(mine)
            done.set()

        threading.Thread(target=exchange, name="opd-outcomes", daemon=True).start()
        return done.wait(seconds)

    def _outcomes(self, mine: str | None) -> list[str | None]:
        assert self.watchdog is not None
        try:
            return self.gather(mine)
        except Exception as exc:  # a process left the group (its watchdog gave up): the group is gone
            self.watchdog.abort(f"the exchange of outcomes failed ({type(exc).__name__}: {exc}): a process is gone")
            raise

    def send(self, command: tuple) -> None:
        """Rank 0: every other rank gets `command` (a tuple: name, *arguments)."""
        import torch.distributed as dist

        if self.broken:
            raise TrainerProcessError(f"{command[0]}: the trainer's processes cannot go on together since a failure "
                                      "inside a collective; they exit in seconds: restart the trainer")

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
    if cuda and local_rank >= torch.cuda.device_count():
        raise OPDError(f"trainer process {rank} is the {local_rank + 1}th on this node, which shows "
                       f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node (--nproc)")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo", timeout=WAIT_FOR_COMMANDS)
    store = dist.PrefixStore("opd", dist.distributed_c10d._get_default_store())
    _group = Group(rank, world, local_rank, f"cuda:{local_rank}" if cuda else "cpu", control, Watchdog(rank, store))
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


def shutdown(tell_workers: bool = True) -> None:
    """Rank 0: the workers leave `follow` (unless not `tell_workers`: they do not follow); every rank leaves the
    process group."""
    global _group
    if _group is None:
        return
    import torch.distributed as dist

    if _group.leader and tell_workers and not _group.broken:
        _group.send(("exit",))
    if _group.watchdog is not None:
        _group.watchdog.stop()
    dist.destroy_process_group()
    _group = None
