"""The commands the trainer's processes run together under torchrun (distributed.py has the group itself).

    policy = open_policy(config)   # rank 0: every rank opens the run's policy; a `Leader` on rank 0
    follow(group)                  # every other rank: rank 0's commands until "exit"

The commands, all of them: "open" a run's policy, "train" on a step's samples, "save_state" and "load_state"
(a checkpoint), "save_version" (a policy version), "close", "exit". Each runs through `Group.conclude`: every
rank's outcome is exchanged after it (distributed.py, choice 4). Rank 0 alone reads or does the rest (the
tokenizer, the learning rate, `save_base`).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from opd.trainer.distributed import Group, current, shutdown
from opd.trainer.parallel import Sharded
from opd.trainer.policy import Policy

COMMANDS = ("open", "train", "save_state", "load_state", "save_version", "close", "exit")


def follow(group: Group) -> None:
    """A worker rank: runs rank 0's commands on its own shard until "exit"."""
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
            policy = group.conclude(name, lambda: Policy(args[0], Sharded(group)))
        elif name == "close":
            group.conclude(name, policy.close if policy is not None else lambda: None)
            policy = None
        else:
            group.conclude(name, lambda: command(policy, name, args))


def command(policy: Any, name: str, args: list[Any]) -> Any:
    if policy is None:
        raise RuntimeError(f"command {name!r}, but this process has no run open (its open failed)")
    return getattr(policy, name)(*args)


class Leader:
    """Rank 0's handle on the policy of every rank: each call goes to the workers, then runs here."""

    def __init__(self, policy: Any, group: Group) -> None:
        self.policy, self.group = policy, group

    def _everywhere(self, name: str, *args: Any) -> Any:
        self.group.send((name, *args))
        return self.group.conclude(name, lambda: getattr(self.policy, name)(*args))

    def train(self, *args: Any) -> Any:
        return self._everywhere("train", *args)

    def save_state(self, folder: Any) -> None:
        self._everywhere("save_state", folder)

    def load_state(self, folder: Any) -> None:
        self._everywhere("load_state", folder)

    def save_version(self, folder: Any) -> None:
        self._everywhere("save_version", folder)

    def close(self) -> None:
        if self.group.broken:  # the processes are ending: rank 0 lets go of its own shard alone
            self.policy.close()
            return
        self._everywhere("close")

    def __getattr__(self, name: str) -> Any:  # what rank 0 alone reads or does: tokenizer, lr, save_base
        return getattr(self.policy, name)


def open_policy(config: Any) -> Any:
    """The run's trainable student: on one process a `Policy`; under torchrun, every rank's (through `Leader`)."""
    group = current()
    if group is None:
        return Policy(config)
    group.send(("open", config))
    opened: list[Policy] = []
    try:
        group.conclude("open", lambda: opened.append(Policy(config, Sharded(group))))
    except BaseException:  # a rank could not open its policy: every rank lets go of the one it opened
        group.send(("close",))
        group.conclude("close", lambda: [policy.close() for policy in opened])
        raise
    return Leader(opened[0], group)
