"""The training loop: the step of DESIGN.md, evaluation, checkpoints and resume.

    outcome = Trainer(config).run()      # "completed" or "stopped"; raises on failure

One step:
1) draw `prompts_per_step` prompts and ask the student for `samples_per_prompt`
   samples each (a seed derived from the run seed and the step);
2) have the teacher score the same token ids;
3) advantages and `substeps` optimizer steps on the importance-sampling (or
   PPO) loss (update.py);
4) write the new policy version atomically and POST it to the student;
5) write the step's metrics; every `eval.every` steps evaluate on the held-out
   prompts, every `save_every` steps checkpoint the trainer state.

Choices:
1) At start the trainer publishes the weights it holds (the base model, or the
   resumed checkpoint; for LoRA the base model as a full version first) as a
   new policy version, so the student serves exactly what the trainer trains,
   whatever it served before. Version numbers go on from the student's own,
   as the student demands strictly increasing ones.
2) A resumed run restores weights, optimizer, RNG states and the sampler
   position, drops metrics after the checkpoint's step, and continues; prompts
   and sampling seeds are functions of the step, so it draws what the
   uninterrupted run drew. It checks the config saved with the checkpoint
   (or, for older checkpoints, output_dir/config.json); with neither it
   refuses rather than drop checkpoints it cannot check.
3) A stop request ends the run at the next step boundary (or interrupts a
   wait for a service) and checkpoints the last whole step; a wait inside a
   step, before its update, gives back the step's prompts first. An
   evaluation due at that step that did not finish runs first when the run
   resumes.
4) A student that serves another version than the trainer last loaded (it
   restarted with its base model, version 0) is given the current weights
   as a new version, and the trainer logs that it noticed. With replicas
   (`student_urls`) every replica loads every version, and each is checked.
5) With several teachers each sample is scored by its row's teacher, and
   the records carry `teacher_kl/<name>`, `teacher_kl_per_completion/<name>`
   (and `accuracy/<name>`, `train_accuracy/<name>` with a verifier) beside
   the overall figures; a run of one teacher writes no per-teacher fields.
6) With `sampling.max_staleness: 1`, step n+1's rollouts are sampled in a
   background thread while step n scores and trains, from the version step n
   started with; the student's swap to step n's version waits for them. The
   importance ratio corrects the one-version lag (`staleness` in the metrics).
   A resumed run samples its first step afresh, on-policy.
7) The records, log lines and progress bar give the teacher KL per
   completion (`teacher_kl_per_completion`: what the objective minimises)
   beside the mean per token (`teacher_kl`), and `mean_length` (rollouts.py).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opd.common import protocol as p
from opd.trainer.checkpoint import CheckpointError, PolicyStore, TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from opd.trainer.config import ConfigError, RunConfig
from opd.trainer.context import with_teachers
from opd.trainer.data import PromptRow, PromptSampler, load_prompts
from opd.trainer.metrics import KL, KL_PER_COMPLETION, MetricsWriter, plot_teacher_kl
from opd.trainer.pause import pause_point
from opd.trainer.remote import Remote, RunStopped
from opd.trainer.rollouts import Sample, StaleRollouts, kl_summary, load_callable, sample, score
from opd.trainer.objectives import accuracies, step_counts, step_rewards, teacher_samples

log = logging.getLogger("opd.trainer")
EVAL_SHOWN = 4  # evaluation completions kept as text per evaluation
EVAL_STEP = -1  # the evaluation seed's "step": the same prompts and seed at every evaluation
# Fields (and sections) a resumed run may change: they do not alter what it computes.
RESUMABLE = ("steps", "eval", "save_every", "keep_versions", "resume", "services", "api_key", "teacher_urls",
             "teacher_protocol", "student_url", "student_urls", "teacher_sampler_url", "output_dir", "checkpoint_root",
             "name", "student.torch_threads", "student.device")
RESUMABLE_TEACHER = re.compile(r"teachers\.[^.]+\.(urls|protocol|api_key)")  # where a teacher is, not what it sees
SECRETS: dict[str, Any] = {"api_key": True, "teachers": {"__all__": {"api_key"}}}  # never written to config.json


def figure(record: dict[str, Any], key: str) -> float:
    """A record's number, NaN where it has none (the rl and sft arms' steps have no teacher KL; null is NaN)."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def added_default(key: str) -> Any:
    """The default of the run config's setting `key` ("student.precision") as JSON; where there is none, a value
    equal to nothing."""
    import pydantic

    model: Any = RunConfig
    field = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return object()
        field = fields[part]
        model = field.annotation
    if field is None or field.is_required():
        return object()
    return json.loads(pydantic.TypeAdapter(field.annotation).dump_json(field.get_default(call_default_factory=True)))


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def asked_top_k(config: RunConfig) -> int:
    """The top-k a training step asks the teachers for: loss.top_k with a top-k loss, else 0 (none asked)."""
    return config.loss.top_k if config.loss.distill != "sampled" else 0


def check_top_k(config: RunConfig, teachers: dict[str, list[p.ServiceInfo]]) -> None:
    """A top-k loss needs every teacher replica to return loss.top_k logprobs per token: refused at set-up
    when one advertises a smaller max_top_k (GET /info limits). Stock servers return top-k too (vLLM's
    prompt_logprobs, SGLang's top_logprobs_num) but advertise no limit: their own (vLLM's --max-logprobs)
    answers a request above it with a 4xx at the first step. A teacher of another tokenizer is allowed: its
    top-k is mapped to student ids on bytes where it can be, absent elsewhere (aligned.py choice 4)."""
    k = asked_top_k(config)
    if not k:
        return
    for name, infos in teachers.items():
        for url, info in zip(config.teacher_set[name].urls, infos, strict=False):
            limit = info.limits.get("max_top_k")
            if limit is not None and k > limit:
                where = "teacher" if config.teachers is None else f"teacher {name}"
                raise ConfigError(f"loss.top_k: {k} is more than the {where} at {url} returns (max_top_k {limit}, "
                                  f"GET /info): set loss.top_k to at most {limit}")


class Trainer:
    def __init__(self, config: RunConfig, *, stop: threading.Event | None = None, progress: bool = False) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.remote = Remote(config, self.stop)
        self.show_progress = progress
        self.out = Path(config.output_dir)
        self.step = 0
        self.version = 0
        self.saved_step = -1
        self.in_step = False
        self.drawn_from: dict[str, int] | None = None  # the sampler before this step's draw, until the update
        self.state = "starting"
        self.metrics: MetricsWriter | None = None
        self.policy: Any = None  # the run's trainable student, from setup() until the run ends
        self.made_at: dict[int, int] = {}  # policy version -> the step whose update it holds
        # (step, prompt indices, sampling version, rollouts) of the next step, sampled while this one trains
        self.prefetch: tuple[int, list[int], int, Future[list[Sample]]] | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="opd-prefetch")
        # per-teacher metrics only for a run of several: a run of one writes the records it always did
        self.teacher_names = list(config.teacher_set) if len(config.teacher_set) > 1 else []

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        from opd.common.tokenizer import load_tokenizer
        from opd.trainer.ranks import open_policy

        config = self.config
        teachers, students = self.remote.check_tokenizers(load_tokenizer(config.student.model))
        train_rows, eval_rows = load_prompts(config.dataset, config.seed)
        own = frozenset(name for name, t in self.remote.teachers.items() if t.alignment == "bytes")
        self.train_rows = with_teachers(train_rows, config, "train", own)
        self.eval_rows = with_teachers(eval_rows, config, "eval", own)
        self.remote.check_stock_teacher(self.train_rows + self.eval_rows)
        self.remote.check_limits(teachers, students, len(self.eval_rows))
        check_top_k(config, teachers)
        self.sampler = PromptSampler(len(self.train_rows), config.seed)
        self.reward_fn = load_callable(config.reward_fn, "reward_fn") if config.reward_fn else None
        self.verifier = load_callable(config.eval.verifier, "eval.verifier") if config.eval.verifier else None
        self.measures = {name: load_callable(spec, f"eval.measures.{name}")
                         for name, spec in config.eval.measures.items()}
        checkpoint = self.checked_checkpoint()  # a resume of another config is refused before any model loads
        self.policy = open_policy(config)  # under torchrun: every rank's shard (ranks.py)
        self.store = PolicyStore(config.checkpoint_root, config.name, config.keep_versions)
        resumed = self.resume(checkpoint)
        self.metrics = MetricsWriter(self.out, resume_step=self.step if resumed else None)
        if config.student.finetune == "lora":
            self.publish(base=True)  # the student may still serve another run's full weights
        self.publish()
        log.info("%s: %s student, %d trainable parameters, %d train / %d eval prompts, from step %d",
                 config.name, config.student.finetune, self.policy.trainable_parameters,
                 len(self.train_rows), len(self.eval_rows), self.step)

    def checked_checkpoint(self) -> Path | None:
        """The newest checkpoint of output_dir when resuming, its run's config checked against this one's."""
        saved = self.out / "config.json"
        ckpt = latest_checkpoint(self.out) if self.config.resume else None
        if ckpt is not None:
            before = next((f for f in (ckpt / "config.json", saved) if f.is_file()), None)
            if before is None:
                raise CheckpointError(
                    f"{ckpt} comes without the config of its run ({saved} is missing), so it cannot be checked: "
                    "put that config.json back, or start afresh with resume=false (which drops the checkpoints)"
                )
            self.check_same_run(json.loads(before.read_text()))
        return ckpt

    def resume(self, ckpt: Path | None) -> bool:
        """Loads `ckpt` (checked_checkpoint's); without one starts output_dir afresh."""
        saved = self.out / "config.json"
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.policy)
            self.step, self.version, self.saved_step = state.step, state.policy_version, state.step
            self.sampler.load_state_dict(state.sampler)
            log.info("resuming from %s (step %d)", ckpt, state.step)
        else:
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        partial = saved.with_name(".config.json.tmp")
        partial.write_text(self.config_json())
        partial.replace(saved)  # whole or not at all
        return ckpt is not None

    def config_json(self) -> str:
        return self.config.model_dump_json(indent=2, exclude=SECRETS)

    def check_same_run(self, saved: dict[str, Any]) -> None:
        now = flat(json.loads(self.config.model_dump_json(exclude=SECRETS)))
        before = flat(saved)
        free = lambda key: (any(key == f or key.startswith(f + ".") for f in RESUMABLE)  # noqa: E731
                            or RESUMABLE_TEACHER.fullmatch(key) is not None)
        # a setting added since the saved run was written is the same when this run keeps its default
        same = lambda key: now.get(key) == (before[key] if key in before else added_default(key))  # noqa: E731
        differ = sorted(k for k in now.keys() | before.keys() if not free(k) and not same(k))
        if differ:
            raise CheckpointError(
                f"{self.out} holds a run with a different config ({', '.join(differ)}): resume with the same "
                "settings, or start a new run (another output_dir, or resume=false)"
            )

    # ------------------------------------------------------------ service calls
    def publish(self, base: bool = False, made_at: int | None = None) -> None:
        """Writes the current weights (or the untouched base model) as a new policy version; every student replica
        loads it. `made_at`: the step whose update the weights hold (default: the last whole step)."""
        current = [info.policy_version or 0 for info in self.remote.student_infos()]
        version = max(*current, self.version) + 1
        for url, served in zip(self.remote.student_urls, current):
            if self.version and served != self.version:
                log.warning("the %s serves policy version %d, the trainer's is %d (the student or the trainer restarted): "
                            "loading the trainer's weights as version %d", self.remote.student_name(url), served,
                            self.version, version)
        path = self.store.write(version, self.policy.save_base if base else self.policy.save_version)
        kind = "full" if base else self.policy.finetune
        loaded = self.remote.load_weights(p.WeightsRequest(version=version, kind=kind, path=path))
        self.version = loaded[0].policy_version
        self.made_at[self.version] = self.step if made_at is None else made_at

    def sample_on_policy(self, rows: list[PromptRow], **kwargs: Any) -> list[Sample]:
        for _ in range(3):
            try:
                return sample(self.remote, rows, version=self.version, **kwargs)
            except StaleRollouts as exc:
                log.warning("%s: loading version %d again before sampling", exc, self.version)
                self.publish()
        return sample(self.remote, rows, version=self.version, **kwargs)

    # ------------------------------------------------------------ the step
    def rollouts_for(self, step: int) -> tuple[list[PromptRow], list[Sample], int]:
        """The step's prompts and rollouts (prefetched while the last step trained, or sampled now), and the
        version that sampled them; then, with max_staleness, starts sampling the next step's."""
        s = self.config.sampling
        indices = self.sampler.next_indices(s.prompts_per_step)
        rows = [self.train_rows[i] for i in indices]
        samples, version = None, self.version
        if self.prefetch is not None:
            ahead, ahead_indices, ahead_version, future = self.prefetch
            self.prefetch = None
            try:
                if (ahead, ahead_indices) == (step, indices):
                    samples, version = future.result(), ahead_version
            except StaleRollouts as exc:
                log.warning("prefetched rollouts are stale (%s): sampling step %d again", exc, step)
        if samples is None and self.config.objective == "sft":  # objectives.py: the teacher's completions
            samples = teacher_samples(self.remote, rows, self.policy.tokenizer, **self.sampling_args(step))
        elif samples is None:
            samples = self.sample_on_policy(rows, **self.sampling_args(step))
        if s.max_staleness and self.config.objective != "sft" and step < self.config.steps:
            nxt = self.sampler.peek(s.prompts_per_step)
            ahead_rows = [self.train_rows[i] for i in nxt]
            future = self.pool.submit(sample, self.remote, ahead_rows, version=self.version, **self.sampling_args(step + 1))
            self.prefetch = (step + 1, nxt, self.version, future)
        return rows, samples, version

    def sampling_args(self, step: int) -> dict[str, Any]:
        s = self.config.sampling
        return dict(n=s.samples_per_prompt, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                    seed=self.seed_of(step))

    def train_step(self, step: int) -> dict[str, Any]:
        c = self.config
        began, waited = time.perf_counter(), self.remote.waited_s
        self.in_step, self.drawn_from = True, self.sampler.state_dict()
        pause_point("sample", step)
        rows, samples, sampled_by = self.rollouts_for(step)
        sampled = time.perf_counter()
        pause_point("score", step)
        received = self.remote.teacher_bytes
        if c.objective == "opd":
            score(self.remote, samples, top_k=asked_top_k(c))  # waits out a teacher outage; the samples stay
        scored = time.perf_counter()
        raw, rewards = step_rewards(c.objective, samples, self.reward_fn, self.verifier)
        pause_point("train", step)
        self.drawn_from = None  # the weights move: an interruption from here on loses the step
        update = self.policy.train(samples, rewards)
        trained = time.perf_counter()
        pause_point("sync", step)
        if update["skipped_updates"] < c.substeps:
            self.publish(made_at=step)
        else:  # the weights did not change: nothing new to serve
            log.warning("step %d: no update (loss or gradient not finite); the student keeps version %d", step, self.version)
        synced = time.perf_counter()
        record = {
            **kl_summary(samples, self.teacher_names), **update,
            **step_counts(c.objective, samples, self.verifier, self.measures, self.teacher_names),
            "policy_version": self.version,
            # optimizer steps between the weights that sampled this step and those it trained
            "staleness": (step - 1) - self.made_at.get(sampled_by, step - 1),
            "time_sample": sampled - began, "time_score": scored - sampled,
            "time_train": trained - scored, "time_sync": synced - trained, "time_step": synced - began,
            "time_waiting": self.remote.waited_s - waited,
            "teacher_bytes": self.remote.teacher_bytes - received,  # the teachers' responses to this step's scoring
        }
        if raw is not None:
            record["reward_mean"] = sum(raw) / len(raw)
        self.step = step
        self.in_step = False
        assert self.metrics is not None
        log.info("step %d/%d %s loss %.4f tokens %d (%.1fs)", step, c.steps, self.kl_log(record), record["loss"],
                 record["tokens"], record["time_step"])
        return self.metrics.write("train", step, record)

    def evaluate(self) -> dict[str, Any]:
        """Teacher KL of the student's samples on the held-out prompts (and accuracies with a verifier or measures)."""
        c = self.config
        began = time.perf_counter()
        samples = self.sample_on_policy(
            self.eval_rows, n=c.eval.samples_per_prompt, max_tokens=c.eval_max_tokens,
            temperature=c.sampling.temperature, top_p=c.sampling.top_p, seed=self.seed_of(EVAL_STEP),
        )
        score(self.remote, samples)
        record: dict[str, Any] = kl_summary(samples, self.teacher_names)
        record.update(accuracies(samples, self.verifier, self.measures, teachers=self.teacher_names))
        record["time_eval"] = time.perf_counter() - began
        log.info("eval at step %d: %s", self.step, self.kl_log(record))
        assert self.metrics is not None
        shown = [{"prompt": x.row.get("prompt") or x.row.get("messages"), "completion": x.text,
                  "teacher_kl": sum(x.rkl) / len(x.token_ids), "teacher_kl_per_completion": sum(x.rkl),
                  **({"teacher": x.teacher} if self.teacher_names else {})}
                 for x in samples[:EVAL_SHOWN]]
        self.metrics.write_samples(self.step, shown)
        return self.metrics.write("eval", self.step, record)

    def per_teacher(self, record: dict[str, Any], key: str = KL) -> str:
        """' (math 0.12, chat 0.34)': each teacher's KL (`key`: per token, or per completion) in a run of several;
        '' otherwise."""
        figures = [f"{name} {record[f'{key}/{name}']:.3f}" for name in self.teacher_names
                   if isinstance(record.get(f"{key}/{name}"), float)]
        return f" ({', '.join(figures)})" if figures else ""

    def kl_log(self, record: dict[str, Any]) -> str:
        """'teacher_kl_per_completion 5.432 teacher_kl 0.8057 mean_length 6.7' (each teacher's figures beside)."""
        return (f"{KL_PER_COMPLETION} {figure(record, KL_PER_COMPLETION):.3f}{self.per_teacher(record, KL_PER_COMPLETION)} "
                f"{KL} {figure(record, KL):.4f}{self.per_teacher(record)} mean_length {figure(record, 'mean_length'):.1f}")

    def seed_of(self, step: int) -> int:
        # The student seeds rollout k of a request `seed + k`: spacing the steps'
        # seeds 2^16 apart keeps every rollout of a run on its own stream.
        return ((self.config.seed * 1_000_003 + step + 1) << 16) % (1 << 62)

    def checkpoint(self) -> None:
        state = TrainerState(self.step, self.version, self.sampler.state_dict())
        save_checkpoint(self.out, state, self.policy, config_json=self.config_json())
        self.saved_step = self.step

    def eval_due(self) -> bool:
        every = self.config.eval.every
        return every > 0 and (self.step % every == 0 or self.step == self.config.steps)

    def eval_missing(self) -> bool:
        """The evaluation due at this step is not on record: step 0, or a stop that came during it."""
        assert self.metrics is not None
        return self.eval_due() and not any(r["kind"] == "eval" and r["step"] == self.step for r in self.metrics.records)

    # ------------------------------------------------------------ the run
    def run(self) -> str:
        """Runs to `steps` (or a stop request); returns "completed" or "stopped"."""
        try:
            self.setup()
        except BaseException:  # refused (a resume of another config, a student that cannot load): keep nothing
            try:
                self.close_policy()
            finally:
                self.remote.close()
            raise
        self.state = "running"
        try:
            with self.progress() as advance:
                if self.eval_missing():
                    self.evaluate()
                while self.step < self.config.steps and not self.stop.is_set():
                    record = self.train_step(self.step + 1)
                    if self.eval_due():
                        self.evaluate()
                    if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                        self.checkpoint()
                    advance(record)
        except RunStopped:
            if self.in_step and self.drawn_from is not None:  # nothing of this step has changed the weights yet
                self.sampler.load_state_dict(self.drawn_from)
                self.in_step = False
            log.warning("stopped while waiting for a service; the run resumes after step %d",
                        self.step if not self.in_step else self.saved_step)
        finally:
            try:
                self.finish()
            finally:
                self.remote.close()  # the clients' connections (a later call would open new ones)
        return self.state

    def finish(self) -> None:
        if self.prefetch is not None:  # rollouts for a step this run will not train
            self.prefetch[3].cancel()
            self.prefetch = None
        self.pool.shutdown(wait=True)
        if self.metrics is None:
            self.close_policy()
            return
        self.metrics.close()
        plot_teacher_kl(self.metrics.records, self.out / "teacher_kl.png", f"{self.config.name}: teacher reverse KL")
        self.state = "completed" if self.step >= self.config.steps else "stopped"
        # Interrupted inside a step, the weights in memory may be ahead of
        # self.step: the last whole step's checkpoint is what stands then.
        if not self.in_step and self.saved_step != self.step:
            self.checkpoint()
        self.close_policy()

    def close_policy(self) -> None:
        policy = self.policy
        if policy is not None:
            policy.close()  # under torchrun the other ranks let their shards go
            self.policy = None

    @contextmanager
    def progress(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        if not self.show_progress:
            yield lambda record: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(self.config.name, total=self.config.steps, completed=self.step, info="")

            def advance(record: dict[str, Any]) -> None:
                info = (f"teacher KL per completion {figure(record, KL_PER_COMPLETION):.3f}"
                        f"{self.per_teacher(record, KL_PER_COMPLETION)}, per token {figure(record, KL):.3f}"
                        f"{self.per_teacher(record)}  {record['time_step']:.1f}s/step")
                bar.update(task, completed=self.step, info=info)

            yield advance
