"""The three arms one trainer runs, chosen by the run config's `objective`.

All three draw the same prompts with the same batch shape (prompts_per_step x
samples_per_prompt x max_tokens) and train with the same optimizer; they
differ in where the completions come from and what each token is credited with:

- opd: the student samples, the teacher scores every sampled token, and
  A_t = -kl_coef * (log p_student(x_t) - log p_teacher(x_t)), plus the
  optional task reward (loss.py). Dense feedback on the student's own states.
- rl: the student samples and no teacher is asked. The reward (`reward_fn`,
  else the verifier as 1 or 0) is centred over the samples of one prompt
  (GRPO-like, without dividing by the group's spread) and credited to every
  token of its sample. One number per episode.
- sft: the teacher samples (a student service serving the teacher's model,
  `teacher_sampler_url`, given the teacher's prompt with its privileged
  context), and the student maximises the log-likelihood of those tokens
  under its own, context-free prompt. Off-policy: the student learns on the
  teacher's states, never its own.

Choices:
1) Token counts per step, the compute the study compares: `tokens_sampled`
   (completion tokens generated, by whichever sampler), `tokens_scored`
   (completion tokens the teacher scored: opd only) and `tokens_trained`
   (completion tokens in the loss).
2) For sft the trainer renders the student's prompt with its own tokenizer,
   the files the student service renders with, so the tokens trained on are
   those the student would see.
3) With a verifier, every arm reports `train_accuracy`, the verifier's mean
   over the step's training completions (for sft: the teacher's), and
   `train_accuracy_<name>` for each of `eval.measures` (a task's further
   verdicts: is the answer right, say); evaluations record the same without
   the `train_` prefix. `accuracy` stays the verifier's, the reward rl learns.
   A run of several teachers adds `accuracy/<teacher>` (the verifier's mean
   over the samples of that teacher's rows) and `train_accuracy/<teacher>`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opd.common import protocol as p
from opd.common.tokenizer import render_prompt
from opd.trainer.data import PromptRow
from opd.trainer.remote import Remote
from opd.trainer.rollouts import ScoreMismatch, Sample
from opd.trainer.update import task_rewards

Verifier = Callable[[dict, str], Any]


def teacher_samples(
    remote: Remote, rows: list[PromptRow], tokenizer: Any, *, n: int, max_tokens: int, temperature: float,
    top_p: float, seed: int,
) -> list[Sample]:
    """Completions the teacher's model samples after the teacher's prompt, set under the student's own prompt."""
    request = p.RolloutRequest(prompts=[row.teacher or row.prompt for row in rows], n=n, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed)
    response = remote.teacher_rollouts(request)
    student_prompts = [render_prompt(tokenizer, row.prompt) for row in rows]
    out = []
    for r in sorted(response.rollouts, key=lambda r: r.prompt_index):
        if len(r.logprobs) != len(r.token_ids):
            raise ScoreMismatch(f"the teacher sampler returned {len(r.token_ids)} tokens but {len(r.logprobs)} logprobs")
        if r.token_ids:
            row = rows[r.prompt_index]
            out.append(Sample(r.prompt_index, student_prompts[r.prompt_index], r.token_ids, r.logprobs, r.text,
                              r.finish_reason, row.row, teacher_prompt=row.teacher, teacher=row.teacher_name))
    return out


def verified(samples: list[Sample], verifier: Verifier) -> list[float]:
    return [1.0 if verifier(s.row, s.text) else 0.0 for s in samples]


def accuracies(samples: list[Sample], verifier: Verifier | None, measures: dict[str, Verifier],
               prefix: str = "", teachers: Sequence[str] = ()) -> dict[str, float]:
    """{prefix}accuracy (the verifier's mean verdict) and {prefix}accuracy_<name> per measure (0 without samples);
    with `teachers` (a run of several) and a verifier, {prefix}accuracy/<teacher> over each teacher's samples."""
    judges = {"accuracy": verifier} if verifier is not None else {}
    judges |= {f"accuracy_{name}": measure for name, measure in measures.items()}
    out = {prefix + key: sum(verified(samples, judge)) / max(1, len(samples)) for key, judge in judges.items()}
    if verifier is not None:
        for name in teachers:
            if mine := [s for s in samples if s.teacher == name]:
                out[f"{prefix}accuracy/{name}"] = sum(verified(mine, verifier)) / len(mine)
    return out


def step_rewards(
    objective: str, samples: list[Sample], reward_fn: Verifier | None, verifier: Verifier | None
) -> tuple[list[float] | None, list[float] | None]:
    """(raw, centred per prompt) task rewards the arm trains on; (None, None) when it uses none."""
    if objective == "sft" or (objective == "opd" and reward_fn is None):
        return None, None
    if reward_fn is None:
        assert verifier is not None, "the run config demands a reward_fn or a verifier for rl"
        fn = lambda row, text: 1.0 if verifier(row, text) else 0.0  # noqa: E731
        return task_rewards(samples, fn)
    return task_rewards(samples, reward_fn)


def step_counts(
    objective: str, samples: list[Sample], verifier: Verifier | None, measures: dict[str, Verifier] | None = None,
    teachers: Sequence[str] = (),
) -> dict[str, float]:
    tokens = sum(len(s.token_ids) for s in samples)
    out: dict[str, float] = {
        "tokens_sampled": tokens,
        "tokens_scored": tokens if objective == "opd" else 0,
        "tokens_trained": tokens,
    }
    return out | (accuracies(samples, verifier, measures or {}, prefix="train_", teachers=teachers) if samples else {})
