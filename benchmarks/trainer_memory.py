"""The trainer's memory per process at 1 and N processes (FSDP2 under torchrun), side by side in one run.

    python benchmarks/trainer_memory.py                     # the demo student, full fine-tuning, 1 and 2 processes
    python benchmarks/trainer_memory.py --nprocs 1,2,4 --steps 4 --model DIR

The workload: the demo's student (SmolLM2-135M-Instruct, prepared into --models as `make demo` does) in
float32, full fine-tuning with AdamW, one step = 16 sequences of a 40-token prompt and 32 completion tokens
(the demo's 8 prompts x 2 samples), scored by the trainer's own update code (services/trainer/update.py)
on fixed synthetic samples: no services, so only the trainer is measured. Each row is one torchrun
launch (`--standalone`, gloo on a CPU, NCCL on CUDA); rows run one after the other.

For each process: the bytes of the parameters, the gradients (measured after the backward passes,
before the optimizer step) and the optimizer state it holds (its shards under FSDP2: the local part of
each DTensor), the peak resident set size of the process (everything: the model as loaded before
sharding, activations, torch, the Python interpreter), and the median seconds per step after the first.
The aim: parameters, gradients and optimizer state near 1/N of one process's. On 2 CPU cores no speed-up
is expected from 2 processes (they share the cores); the step time is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES, PROMPT, COMPLETION = 16, 40, 32


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # a DTensor: this rank's shard
        total += t.numel() * t.element_size()
    return total


def synthetic_samples(vocab_size: int) -> list:
    """The fixed workload: SEQUENCES samples of PROMPT + COMPLETION random tokens with made-up logprobs."""
    import torch

    from opd.trainer.rollouts import Sample

    g = torch.Generator().manual_seed(0)
    vocab = min(vocab_size, 30000)
    return [Sample(i // 2, torch.randint(5, vocab, (PROMPT,), generator=g).tolist(),
                   torch.randint(5, vocab, (COMPLETION,), generator=g).tolist(),
                   (-torch.rand(COMPLETION, generator=g) * 4).tolist(), "", "length", {},
                   (-torch.rand(COMPLETION, generator=g) * 4).tolist()) for i in range(SEQUENCES)]


def demo_student(model: str | None, models: Path) -> str:
    """`model` as an absolute path; without one the demo student, prepared into `models` as `make demo` does."""
    if model is None:
        from opd.common.models import prepare

        model = str(prepare("smollm2-135m-instruct", (models / "smollm2-135m-instruct").resolve(), dtype="float32"))
    return str(Path(model).resolve())


def worker(args: argparse.Namespace) -> None:
    """One process of a row (under torchrun when nproc > 1): trains, measures, writes its record."""
    import torch

    from opd.trainer import distributed
    from opd.trainer.config import build_config
    from opd.trainer.parallel import placement
    from opd.trainer.policy import Policy
    from opd.trainer.update import accumulate, advantages

    group = distributed.init()
    rank = group.rank if group else 0
    config = build_config({
        "student": {"model": args.model, "dtype": "float32", "finetune": "full"},
        "teacher_urls": ["http://teacher"], "student_url": "http://student", "dataset": {"path": "prompts.jsonl"},
        "optimizer": {"lr": 1e-5},
    }, environ={})
    policy = Policy(config, placement(group))
    opened = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak of loading (and sharding)
    samples = synthetic_samples(len(policy.tokenizer))
    adv = advantages(samples, config, None)
    times, grads = [], 0
    for _ in range(args.steps):
        began = time.perf_counter()
        accumulate(policy, samples, adv, config)
        grads = max(grads, local_bytes(p.grad for p in policy.params if p.grad is not None))
        policy.optimizer_step()
        times.append(time.perf_counter() - began)
    optimizer = local_bytes(v for state in policy.optimizer.state.values() for v in state.values()
                            if torch.is_tensor(v) and v.dim() > 0)
    record = {"rank": rank, "params": local_bytes(policy.model.parameters()), "grads": grads, "optimizer": optimizer,
              "open_rss": opened, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_s": statistics.median(times[1:] or times)}
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(record))
    distributed.shutdown(tell_workers=False)


def row(nproc: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        launch = [sys.executable] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launch, __file__, "--worker", "--out", out, "--model", args.model, "--steps", str(args.steps)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:
            sys.exit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", default="1,2", help="process counts, one row each (default: 1,2)")
    parser.add_argument("--steps", type=int, default=3, help="steps per row; the first is a warm-up (default 3)")
    parser.add_argument("--model", help="a model folder (default: the demo student, prepared into --models)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="where the demo student is prepared")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.model = demo_student(args.model, args.models)
    mib = lambda n: f"{n / 2**20:8.0f}"  # noqa: E731
    print(f"full fine-tuning of {args.model}, float32, AdamW; {SEQUENCES} sequences x {PROMPT}+{COMPLETION} tokens a step")
    print(f"{'procs':>5} {'rank':>4} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'p+g+o MiB':>9} "
          f"{'opened RSS':>10} {'peak RSS MiB':>12} {'s/step':>7}")
    first = None
    for n in [int(x) for x in args.nprocs.split(",")]:
        records = row(n, args)
        for r in records:
            total = r["params"] + r["grads"] + r["optimizer"]
            first = first or total
            print(f"{n:>5} {r['rank']:>4} {mib(r['params']):>10} {mib(r['grads']):>9} {mib(r['optimizer']):>9} "
                  f"{mib(total):>9} {mib(r['open_rss']):>10} {mib(r['peak_rss']):>12} {r['step_s']:7.2f}   ({total / first:.2f} of 1 process)",
                  flush=True)


if __name__ == "__main__":
    main()
