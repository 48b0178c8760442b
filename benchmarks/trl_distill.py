"""TRL's on-policy distillation on the step benchmark's workload: the peer that
`benchmarks/step_time.py` runs beside opd, in TRL's own environment.

    .venv-trl/bin/python benchmarks/trl_distill.py --teacher T --student S --prompts P.jsonl --sequences 16 ...

TRL's `DistillationTrainer` (trl 1.16) set up as its documentation shows:
the student generates completions in-process with transformers `generate`,
and the loss is the generalised Jensen-Shannon divergence between the
student's and the teacher's full next-token distributions at every completion
position; `beta=1` makes it the reverse KL, KL(student || teacher) summed over
the whole vocabulary, differentiated directly (no sampling estimator, no
importance ratio). opd's objective is the sampled-token estimate of the same
reverse KL, log p_student(x_t) - log p_teacher(x_t) at the token the student
drew, used as a per-token advantage in an importance-sampling policy gradient;
its expectation over the student's samples is the same KL.

TRL samples one completion per prompt, so opd's `prompts x samples` sequences
become as many distinct prompts here. Everything else matches opd's demo run:
LoRA rank 16 (alpha 32) on every linear layer, AdamW at the same rate with the
same warm-up, gradient clipping at 1, float32 student and teacher (as the
demo serves them; `--dtype bfloat16` for step_time.py's GPU preset), temperature 1, top-p 1, no top-k. TRL's own defaults
stand where opd has no counterpart (gradient checkpointing on).

Prints one JSON line per optimizer step: {"step": n, "seconds": s, "loss": l}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per row")
    ap.add_argument("--sequences", type=int, default=16, help="completions per optimizer step")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="student and teacher weights")
    ap.add_argument("--out", default="trl-out")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in open(args.prompts) if line.strip()]
    need = args.sequences * args.steps
    prompts = [[{"role": "user", "content": rows[i % len(rows)]["prompt"]}] for i in range(need)]
    dataset = Dataset.from_dict({"prompt": prompts})

    config = DistillationConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.sequences,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup_steps,
        max_grad_norm=1.0,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=1.0,
        model_init_kwargs={"dtype": args.dtype},
        teacher_model_init_kwargs={"dtype": args.dtype},
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.began

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                print(json.dumps({"step": state.global_step, "seconds": self.seconds, "loss": logs["loss"]}), flush=True)

    trainer = DistillationTrainer(
        model=args.student, teacher_model=args.teacher, args=config, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.student), peft_config=lora, callbacks=[StepClock()],
    )
    trainer.train()


if __name__ == "__main__":
    main()
