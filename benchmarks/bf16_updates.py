"""How much of a full fine-tune in bf16 one step at lr 1e-5 moves: pure bf16 weights (`student.precision: pure`)
against float32 weights with bf16 compute (mixed, the default: autocast on one process, FSDP2's mixed precision
on N), side by side in one run.

    python benchmarks/bf16_updates.py                    # the demo student; 1 process pure, 1 and 2 mixed
    python benchmarks/bf16_updates.py --model DIR --lr 1e-5

One step of the trainer's own update (services/trainer/update.py) on the fixed synthetic samples of
benchmarks/trainer_memory.py, AdamW at `--lr`. Printed per row: the fraction of the decoder blocks' weights
that changed in the step (AdamW's first step moves every weight with a gradient by about lr; bf16 resolves
about 1e-4 at a weight of 0.02, so a smaller move rounds away), and the dtype the weights are kept in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def weights(policy) -> dict:
    """The whole trainable weights as float32 copies, by name (gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().clone() for k, v in whole.items() if "layers." in k}


def worker(args: argparse.Namespace) -> None:
    from trainer_memory import synthetic_samples  # benchmarks/, this script's folder

    from opd.trainer import distributed
    from opd.trainer.config import build_config
    from opd.trainer.parallel import placement
    from opd.trainer.policy import Policy
    from opd.trainer.update import accumulate, advantages

    group = distributed.init()
    config = build_config({
        "student": {"model": args.model, "dtype": "bfloat16", "precision": args.precision, "finetune": "full"},
        "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "prompts.jsonl"},
        "optimizer": {"lr": args.lr},
    }, environ={})
    policy = Policy(config, placement(group))
    samples = synthetic_samples(len(policy.tokenizer))
    before = weights(policy)
    accumulate(policy, samples, advantages(samples, config, None), config)
    policy.optimizer_step()
    after = weights(policy)
    if group is None or group.leader:
        moved = sum(int((after[k] != before[k]).sum()) for k in before)
        total = sum(v.numel() for v in before.values())
        kept = {str(getattr(p, "_local_tensor", p).dtype) for p in policy.params}
        Path(args.out, "row.json").write_text(json.dumps({"moved": moved, "total": total, "kept": sorted(kept)}))
    distributed.shutdown(tell_workers=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: the demo student, prepared into --models)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="where the demo student is prepared")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="mixed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from trainer_memory import demo_student

    args.model = demo_student(args.model, args.models)
    print(f"one step of full fine-tuning of {args.model} in bf16 at lr {args.lr:g}, AdamW")
    print(f"{'processes':>9}  {'weights kept in':<16} {'moved':>8}  of the decoder blocks' weights")
    for nproc, precision in ((1, "pure"), (1, "mixed"), (2, "mixed")):
        with tempfile.TemporaryDirectory() as out:
            launch = [sys.executable] if nproc == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            done = subprocess.run([*launch, __file__, "--worker", "--out", out, "--model", args.model, "--lr", str(args.lr),
                                   "--precision", precision],
                                  cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                sys.exit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
            row = json.loads(Path(out, "row.json").read_text())
        print(f"{nproc:>9}  {','.join(row['kept']):<16} {row['moved'] / row['total']:8.4f}  (precision: {precision})", flush=True)


if __name__ == "__main__":
    main()
