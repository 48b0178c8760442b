"""A checkpoint of the trainer state (checkpoint.py) taken before the first optimizer step resumes into the
same first update as the run that never stopped: torch.distributed.checkpoint's get_state_dict fills an empty
AdamW state with a real step() (step 1, zero moments), and a resumed run's first update was 0.74x the
straight run's (a Linear layer, AdamW lr 0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd.trainer.checkpoint import load_training_state, save_training_state


def layer_and_optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    return layer, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1.0)


def first_update(layer: torch.nn.Linear, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    before = layer.weight.detach().clone()
    layer(torch.ones(2, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return layer.weight.detach() - before


def test_a_checkpoint_before_the_first_step_resumes_into_the_same_first_update(tmp_path: Path) -> None:
    straight = first_update(*layer_and_optimizer()[:2])
    layer, optimizer, scheduler = layer_and_optimizer()
    save_training_state(tmp_path, layer, optimizer, scheduler)
    assert not optimizer.state, "saving left the live optimizer as it was"
    resumed_layer, resumed_optimizer, resumed_scheduler = layer_and_optimizer()
    load_training_state(tmp_path, resumed_layer, resumed_optimizer, resumed_scheduler)
    resumed = first_update(resumed_layer, resumed_optimizer)
    assert straight.abs().min() > 0.05  # lr 0.1: Adam's first step moves each weight by about lr
    assert torch.equal(resumed, straight), (resumed / straight)


def test_a_checkpoint_after_a_step_keeps_the_optimizer_state(tmp_path: Path) -> None:
    layer, optimizer, scheduler = layer_and_optimizer()
    first_update(layer, optimizer)
    save_training_state(tmp_path, layer, optimizer, scheduler)
    second = first_update(layer, optimizer)
    resumed_layer, resumed_optimizer, resumed_scheduler = layer_and_optimizer()
    load_training_state(tmp_path, resumed_layer, resumed_optimizer, resumed_scheduler)
    assert int(resumed_optimizer.state[resumed_layer.weight]["step"]) == 1
    assert torch.equal(first_update(resumed_layer, resumed_optimizer), second)


def test_the_learning_rate_decays_to_zero_one_step_after_the_last() -> None:
    from opd.trainer.policy import lr_factor

    assert [lr_factor(n, 0, 4, "constant") for n in range(4)] == [1.0] * 4
    assert [lr_factor(n, 0, 4, "linear") for n in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [lr_factor(n, 2, 6, "cosine") for n in range(7)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == 0.0  # warm-up, then the half cosine from 1
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    assert cosine[4] == pytest.approx(0.5)
