"""A skill task's gap: each teacher given its privileged context against the student without it.

    python benchmarks/task_gap.py --samples 4                       # services/configs/skill.yaml (make task-gap)
    python benchmarks/task_gap.py --samples 4 --also models/smollm2-drop12-21
    python benchmarks/task_gap.py --config services/configs/two_skills.yaml   # several teachers: each on its rows

For every held-out prompt of the stack's run, samples completions from the
model of the prompt's teacher after that teacher's prompt (its
`teacher_prompt`, context.py) and from the student's model (and any `--also`
model) after the student's own prompt, with the run's sampling temperature
and top-p and the evaluation's max tokens, and scores them with the run's
verifier (the form) and each of its `eval.measures` (for the demo: correct,
content). With several teachers, each teacher is measured on the rows it
grades. A task is fit for the study when the teacher's verifier accuracy is
>= 50% and >= 3x the student's. Plain transformers `generate` (float32,
top-k off), seeded: no service needed, and the numbers repeat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def sample(model_dir: str, prompts: list, *, samples: int, max_tokens: int, temperature: float, top_p: float,
           seed: int) -> list[str]:
    """`samples` completions of each prompt, prompt by prompt in order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.common.tokenizer import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [render_prompt(tokenizer, prompt) for prompt in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding for generation
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                             top_k=0, max_new_tokens=max_tokens, num_return_sequences=samples, pad_token_id=pad)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def shares(checks: dict, rows: list, texts: list[str], samples: int) -> dict[str, float]:
    """The share of completions each check passes (check name -> share)."""
    return {name: sum(bool(check(rows[i // samples].row, t)) for i, t in enumerate(texts)) / len(texts)
            for name, check in checks.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "services" / "configs" / "skill.yaml")
    parser.add_argument("--samples", type=int, default=2, help="completions per held-out prompt")
    parser.add_argument("--also", action="append", default=[], help="another student model folder to measure")
    parser.add_argument("--workdir", type=Path, default=Path("runs/task-gap"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from opd.trainer.config import build_config, deep_merge
    from opd.trainer.context import with_teachers
    from opd.trainer.data import load_prompts
    from opd.trainer.rollouts import load_callable
    from opd.up.config import load_stack, teachers_entry
    from opd.up.runner import resolve_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    console = Console()
    stack = load_stack(args.config, args.sets)
    specs = {"default": stack.teacher} if stack.teachers is None else dict(stack.teachers)
    teacher_models = {name: resolve_model(spec, args.workdir / "models", console) for name, spec in specs.items()}
    student_model = resolve_model(stack.student, args.workdir / "models", console)
    urls = {"teacher_urls": ["http://unused"]} if stack.teachers is None else teachers_entry(dict.fromkeys(specs, "http://unused"))
    run = build_config(deep_merge(stack.run, {"student": {"model": student_model}, "student_url": "http://unused", **urls}),
                       environ={})
    _, eval_rows = load_prompts(run.dataset, run.seed)
    rows = with_teachers(eval_rows, run, "eval")
    checks = {"form": load_callable(run.eval.verifier or "", "eval.verifier")}
    checks |= {name: load_callable(spec, f"eval.measures.{name}") for name, spec in run.eval.measures.items()}
    settings = dict(samples=args.samples, max_tokens=run.eval_max_tokens, temperature=run.sampling.temperature,
                    top_p=run.sampling.top_p, seed=run.seed)
    console.print(f"{len(rows)} held-out prompts x {args.samples} samples, temperature {run.sampling.temperature}, "
                  f"{run.eval_max_tokens} tokens, verifier {run.eval.verifier} (form)"
                  + "".join(f", {name} {spec}" for name, spec in run.eval.measures.items()))
    for name, model in teacher_models.items():
        mine = [r for r in rows if r.teacher_name == name]
        if not mine:
            continue
        if len(teacher_models) > 1:
            console.print(f"[bold]teacher {name}[/bold]: {len(mine)} held-out prompts, {model}")
        cases = [("teacher, with the context", model, [r.teacher or r.prompt for r in mine])]
        cases += [(f"student {m}, without", m, [r.prompt for r in mine]) for m in [student_model, *args.also]]
        results = {}
        for case, case_model, prompts in cases:
            texts = sample(case_model, prompts, **settings)
            results[case] = shares(checks, mine, texts, args.samples)
            figures = "  ".join(f"{check} {share:.3f}" for check, share in results[case].items())
            console.print(f"{case:<48} {figures}   e.g. {texts[0][:60]!r}")
        teacher = results[cases[0][0]]["form"]
        for case in list(results)[1:]:
            student = results[case]["form"]
            gap = teacher / student if student else float("inf")
            console.print(f"teacher / {case}: {gap:.1f}x  (fit: teacher >= 0.5 and >= 3x: {teacher >= 0.5 and gap >= 3})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
