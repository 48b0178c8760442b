"""How likely a student is to open its reply with a given text, before and after training.

    python benchmarks/opening_logprob.py runs/efficiency/models/smollm2-135m-instruct \
        --adapter runs/efficiency/checkpoints/efficiency-opd/v000022 --opening "ANSWER:"

For the first --prompts held-out questions of the skill task, the mean
log-probability (transformers forward, float32) of the opening's tokens right
after the student's chat prompt: under the base model, and with a LoRA
version applied. It says how far an on-policy run moved a behaviour the
student does not yet sample (docs/results.md: "The first task tried").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def mean_logprob(model, tokenizer, questions: list[str], opening: list[int]) -> float:
    total = 0.0
    for q in questions:
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + opening])).logits[0].float(), dim=-1)
        total += sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(opening))
    return total / len(questions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--adapter", help="a LoRA version folder to compare with the base model")
    ap.add_argument("--opening", default="ANSWER:")
    ap.add_argument("--data", type=Path, default=ROOT / "services" / "data" / "questions" / "eval.jsonl")
    ap.add_argument("--prompts", type=int, default=16)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    questions = [json.loads(line)["prompt"] for line in args.data.read_text().splitlines()[: args.prompts]]
    opening = tokenizer(args.opening, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    print(f"mean log p({args.opening!r}) over {len(questions)} prompts")
    print(f"base model: {mean_logprob(model, tokenizer, questions, opening):.2f}")
    if args.adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, args.adapter)
        print(f"with {args.adapter}: {mean_logprob(tuned, tokenizer, questions, opening):.2f}")


if __name__ == "__main__":
    main()
