"""Failures on purpose, for the tests of a trainer process that fails (tests/trainer/test_rank_failures.py).

    OPD_FAILPOINT=forward:1   # trainer process 1 raises in its first forward pass, between FSDP collectives
    OPD_FAILPOINT=open:1      # trainer process 1 cannot open its first run's policy (later runs open)

Unset (always, outside those tests) nothing here does anything.
"""

from __future__ import annotations

import os

import torch

_opened = 0


class Failpoint(RuntimeError):
    """The failure OPD_FAILPOINT asked for."""


def _armed(point: str, rank: int) -> bool:
    where, _, which = os.environ.get("OPD_FAILPOINT", "").partition(":")
    return where == point and which == str(rank)


def on_open(rank: int) -> None:
    global _opened
    _opened += 1
    if _armed("open", rank) and _opened == 1:
        raise Failpoint(f"OPD_FAILPOINT: trainer process {rank} does not open this policy")


def arm_forward(model: torch.nn.Module, rank: int) -> None:
    """Trainer process `rank` raises in the forward pass of the model's last decoder block (collectives of the
    blocks before it done, of the blocks after it and the backward pass not)."""
    if not _armed("forward", rank):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    last = [m for m in model.modules() if type(m).__name__ in blocks][-1]

    def fail(*_: object) -> None:
        raise Failpoint(f"OPD_FAILPOINT: trainer process {rank} fails in a forward pass")

    last.register_forward_pre_hook(fail)
