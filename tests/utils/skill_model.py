"""A tiny model with a skill held in a prompt: the tests' stand-in for an instruct model.

`build_skill_model` trains a small Llama for a few seconds on chats over the
tiny tokenizer's words. When the system message is `SKILL_CONTEXT`, every
answer begins with `SKILL_WORD`; without it, answers are random words (a few
percent begin with the word anyway). The same model is then teacher (given the
context) and student (not given it), as SmolLM2 is in the shipped task:
distilling moves the behaviour from the prompt into the student's weights.
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.utils.tiny_models import WORDS, build_llama

SKILL_WORD = "picture"
SKILL_CONTEXT = "Begin every answer with the word picture."
BASE_RATE = 0.05  # answers without the context that begin with the word anyway
CUED_RATE = 0.2  # the same, for a prompt that opens with the skill's cue (`chats(cues=...)`)


Skill = tuple[str, str]  # (the word an answer begins with, the system message that asks for it)


def chats(n: int, seed: int, skills: tuple[Skill, ...] = ((SKILL_WORD, SKILL_CONTEXT),),
          cues: tuple[str, ...] = ()) -> list[tuple[list[dict], str]]:
    """Half the chats carry a skill's system message (one of `skills`, drawn evenly) and begin with its word;
    without one, each skill's word begins BASE_RATE of the answers anyway. With `cues` (a prompt's opening word per
    skill), half the chats without a message open with a skill's cue and begin with its word CUED_RATE of the
    time: a weak prior that the prompt already carries, as a math question leans a model towards working."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w not in {word for word, _ in skills}]
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 4))).capitalize()
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < 0.5:
            first, context = skills[0] if len(skills) == 1 else rng.choice(skills)
            messages.insert(0, {"role": "system", "content": context})
        elif cues and rng.random() < 0.5:
            skill = rng.randrange(len(skills))
            messages[0]["content"] = f"{cues[skill].capitalize()} {prompt.lower()}"
            first = skills[skill][0] if rng.random() < CUED_RATE else rng.choice(others)
        else:
            draw = rng.random()
            first = skills[int(draw / BASE_RATE)][0] if draw < BASE_RATE * len(skills) else rng.choice(others)
        answer = " ".join([first, *rng.choices(WORDS, k=rng.randint(2, 4))]) + "."
        out.append((messages, answer))
    return out


def encode(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    completion = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    return list(prompt) + completion, len(prompt)


def build_skill_model(out: Path, tokenizer_dir: Path, *, steps: int = 150, batch: int = 32, seed: int = 0,
                      skills: tuple[Skill, ...] = ((SKILL_WORD, SKILL_CONTEXT),), cues: tuple[str, ...] = ()) -> Path:
    """Trains (answer tokens only, AdamW) and saves the model with its tokenizer. Several `skills` give a model
    that holds each in its own system message; another seed gives other weights for the same skills.

    Trains on one torch thread, then gives the caller its thread count back: a model this small gains nothing
    from a second thread, and on two shared cores its threads wait on each other (150 steps: 8 s on one thread,
    over 2 minutes on two under load); the weights are the same bytes either way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_skill_model(out, tokenizer_dir, steps, batch, seed, skills, cues)
    finally:
        torch.set_num_threads(threads)


def _train_skill_model(out: Path, tokenizer_dir: Path, steps: int, batch: int, seed: int,
                       skills: tuple[Skill, ...], cues: tuple[str, ...]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_llama(out, tokenizer_dir, seed=seed, layers=2, hidden=64, heads=2)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = [encode(tokenizer, m, a) for m, a in chats(steps * batch, seed, skills, cues)]
    model.train()
    for step in range(steps):
        rows = data[step * batch : (step + 1) * batch]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, (seq, start) in enumerate(rows):
            ids[b, : len(seq)] = torch.tensor(seq)
            labels[b, start : len(seq)] = torch.tensor(seq[start:])
            mask[b, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out, safe_serialization=True)
    return out


def first_word_probability(model_dir: Path, messages: list[dict]) -> float:
    """p(the answer's first token is the skill word's first token | messages), by a direct forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt)])).logits[0, -1]
    return torch.softmax(logits, -1)[tokenizer.encode(SKILL_WORD)[0]].item()
