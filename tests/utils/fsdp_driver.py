"""Trains the trainer's policy on fixed samples, on one process or under torchrun (tests/trainer/test_distributed.py).

    python -m tests.utils.fsdp_driver OUT CONFIG.json --steps 3 [--load CKPT] [--save-after 2]
    torchrun --nproc-per-node 2 -m tests.utils.fsdp_driver ...

Writes OUT/steps.json (each step's update record, rank 0) and OUT/weights-<step>.pt (the whole trainable
weights after each step, gathered as for a policy version). --save-after K also writes the trainer state
after step K to OUT/ckpt-K; --load CKPT starts from such a state (its step is read from OUT/start.json).
The samples of step k are drawn from a generator seeded with k: every run sees the same ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opd.trainer import distributed
from opd.trainer.config import RunConfig
from opd.trainer.rollouts import Sample


def samples_of(step: int, vocab: int, n: int = 12) -> list[Sample]:
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        tokens = torch.randint(3, vocab, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
        sampling = (-torch.rand(len(tokens), generator=g) * 6).tolist()
        teacher = (-torch.rand(len(tokens), generator=g) * 6).tolist()
        out.append(Sample(i // 2, prompt, tokens, sampling, "", "length", {}, teacher))
    return out


def trainable(policy) -> dict[str, torch.Tensor]:
    """The whole trainable weights on rank 0 (gathered from every rank's shards), by state-dict name (a tied
    output layer under the embedding's); {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                         ignore_frozen_params=True))
    base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
    if base.config.tie_word_embeddings:  # one tensor: named once (one process names it once, FSDP twice)
        whole = {k: v for k, v in whole.items() if not k.endswith("lm_head.weight")}
    return whole if policy.parallel.leader else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--save-after", type=int)
    parser.add_argument("--version-after", type=int, help="also write a policy version after this step")
    args = parser.parse_args()
    from opd.trainer.parallel import placement
    from opd.trainer.policy import Policy

    group = distributed.init()
    config = RunConfig.model_validate_json(args.config.read_text())
    policy = Policy(config, placement(group))
    leader = group is None or group.leader
    if args.load:
        policy.load_state(args.load)
    vocab = min(len(policy.tokenizer), 400)
    records = []
    for step in range(args.first, args.first + args.steps):
        records.append({"step": step, **policy.train(samples_of(step, vocab))})
        weights = trainable(policy)
        if leader:
            torch.save(weights, args.out / f"weights-{step}.pt")
        if step == args.save_after:
            folder = args.out / f"ckpt-{step}"
            if leader:
                folder.mkdir(parents=True, exist_ok=True)
            if group is not None:
                group.gather(None)  # the folder exists before any rank writes into it
            policy.save_state(folder)
        if step == args.version_after:
            folder = args.out / f"version-{step}"
            if leader:
                folder.mkdir(parents=True, exist_ok=True)
            if group is not None:
                group.gather(None)
            policy.save_version(folder)
    if leader:
        (args.out / "steps.json").write_text(json.dumps(records, indent=1))
    distributed.shutdown(tell_workers=False)  # every rank runs this loop: none follows commands


if __name__ == "__main__":
    main()
