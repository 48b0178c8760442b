"""The run configuration: one frozen, fully specified pydantic model.

    config = load_config("services/configs/smollm2.yaml", ["sampling.max_tokens=32"])

Choices:
1) Every field has a type, a default where one is sensible, and bounds; an
   unknown or bad field raises `ConfigError` whose message names the field
   (`sampling.max_tokens: Input should be greater than or equal to 1`).
2) Three layers, later wins: the YAML file, then `OPD_TRAIN_*` environment
   variables (`OPD_TRAIN_SAMPLING__MAX_TOKENS=32`: `__` separates sections),
   then `--set a.b=value` overrides. Values are parsed as YAML, so `3` is an
   int, `[a, b]` a list and `true` a bool. `build_config(..., environ=...)`
   reads only the mapping it is given, never the process environment.
3) The API key falls back to `OPD_API_KEY`, the key the services share.
   `teacher_protocol` lets a stock vLLM or SGLang server be the teacher.
   The students are `student_url` (one service) or `student_urls` (replicas),
   exactly one of the two; a later layer that gives one drops the other.
   The teachers are one (`teacher_urls`, `teacher_protocol`, `teacher_prompt`:
   a teacher named `default`) or several (`teachers`, name -> urls, protocol,
   api_key, teacher_prompt; `default_teacher`, else the first), never both
   styles (in any layers: an `OPD_TRAIN_TEACHER_URLS` beside a file's
   `teachers` is refused, not silently preferred); a dataset row picks its
   teacher by `dataset.teacher_field`. A trainer service's `OPD_TRAIN_*`
   defaults in one style give way to a posted config in the other.
4) The config is pure pydantic (no torch): the trainer service validates a
   POST /runs body with it, and a 422 names the bad field.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from opd.common.compat_client import TeacherProtocol
from opd.common.errors import InvalidInput
from opd.common.protocol import MAX_TOP_K, MIN_TEMPERATURE

ENV_PREFIX = "OPD_TRAIN_"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PositiveInt = Annotated[int, Field(ge=1)]
MEASURE_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a metric name's suffix: accuracy_<name>
STUDENT_URL_FIELDS = {"student_url", "student_urls"}  # one setting in two spellings: a later layer's replaces an earlier's
NO_STUDENTS = object()  # stands for a config that names neither
ONE_TEACHER = ("teacher_urls", "teacher_protocol", "teacher_tokenizer", "teacher_prompt")  # the single-teacher style's fields
MANY_TEACHERS = ("teachers", "default_teacher")
# A posted config that names the teachers one way drops the environment's defaults of the other way.
TEACHER_REPLACES = {"teachers": ("teacher_urls", "teacher_protocol"), "teacher_urls": MANY_TEACHERS}
NO_TEACHERS = object()
DEFAULT_TEACHER = "default"  # the name of the single-teacher style's teacher
TeacherName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]


class ConfigError(InvalidInput):
    """The run configuration is invalid; the message names each bad field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Section):
    rank: PositiveInt = Field(default=16, description="LoRA rank (the student serves up to its max_lora_rank).")
    alpha: Annotated[float, Field(gt=0)] = Field(default=32.0, description="LoRA alpha: the update is scaled by alpha / rank.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.0, description="LoRA dropout, in training.")
    # The linear layers vLLM can serve LoRA on for Llama-style models.
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = Field(
        default=LLAMA_LINEAR, description="The linear layers to adapt; default: those vLLM can serve LoRA on for "
        "Llama-style models.")


class StudentConfig(Section):
    model: Annotated[str, Field(min_length=1, description="The model the student service serves (folder or hub id).")]
    finetune: Literal["lora", "full"] = Field(default="lora", description="lora: train a LoRA adapter; full: every parameter.")
    lora: LoraSettings = LoraSettings()
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="What the student trains in; bfloat16: bf16 compute over float32 weights that train "
        "(see `precision`). Policy versions are written in this dtype.")
    precision: Literal["mixed", "pure"] = Field(
        default="mixed", description="With dtype bfloat16: mixed keeps float32 master weights and gradient reduction; "
        "pure keeps weights, gradients and optimizer state in bf16 (half their memory; small updates round away).")
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    micro_batch_tokens: PositiveInt | None = Field(
        default=None, description="Padded tokens per training forward; default: 4096 on a CPU, from the free memory on CUDA.",
    )
    # None: torch's default (every core). Idle vLLM engines spin for only a second
    # after their last step, so a trainer beside them can use every core.
    torch_threads: PositiveInt | None = Field(default=None, description="The trainer's torch threads; default: torch's (every core).")


class DatasetConfig(Section):
    path: Annotated[str, Field(min_length=1, description="JSONL or Parquet file, or a folder (datasets or *.jsonl).")]
    split: str = Field(default="train", description="Split to train on when `path` is a folder.")
    eval_path: str | None = Field(default=None, description="Held-out prompts; default: `eval_size` rows held out of `path`.")
    eval_split: str | None = Field(default=None, description="Held-out split when `path` is a folder.")
    eval_size: PositiveInt = Field(
        default=32, description="Held-out prompts: rows held out of `path` at random (seeded), or the first rows of "
        "eval_path / eval_split.")
    prompt_format: Literal["chat", "text"] = Field(
        default="chat", description="chat: a `prompt` text becomes one user message, rendered by the chat template."
    )
    teacher_field: Annotated[str, Field(min_length=1)] = Field(
        default="teacher", description="A row's field naming its teacher (one of `teachers`); rows without it "
        "go to the default teacher.")


class SamplingConfig(Section):
    prompts_per_step: PositiveInt = Field(default=8, description="Prompts drawn for each step.")
    samples_per_prompt: Annotated[int, Field(ge=1, le=64)] = Field(default=4, description="Rollouts sampled per prompt.")
    max_tokens: PositiveInt = Field(default=64, description="Longest completion, in tokens.")
    # The student reports logprobs after temperature and top-p, and the trainer
    # scores with the same temperature and nucleus (services/common/hf.py).
    # Greedy rollouts (temperature below MIN_TEMPERATURE) have no sampling logprobs.
    temperature: Annotated[float, Field(ge=MIN_TEMPERATURE, le=10)] = Field(
        default=1.0, description="Sampling temperature; the trainer scores at the same one (no greedy rollouts: they "
        "have no sampling logprobs).")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="Nucleus sampling; the trainer scores with the same nucleus.")
    max_staleness: Annotated[int, Field(ge=0, le=1)] = Field(
        default=0,
        description="1: sample the next step's rollouts while this step scores and trains (one policy version "
        "behind; the importance ratio corrects it, PPO clips it); 0: every step samples the policy it trains.",
    )


class OptimizerConfig(Section):
    lr: Annotated[float, Field(gt=0)] = Field(default=1e-4, description="AdamW learning rate (after warmup).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        default=(0.9, 0.999), description="AdamW betas.")
    eps: Annotated[float, Field(gt=0)] = Field(default=1e-8, description="AdamW epsilon.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(default=0.0, description="AdamW weight decay.")
    grad_clip: Annotated[float, Field(ge=0, description="Max global gradient norm; 0 turns clipping off.")] = 1.0
    warmup_steps: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Optimizer steps over which the learning rate rises linearly to lr; 0: none.")
    decay: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="After warmup the learning rate stays at lr (constant) or falls towards 0 "
        "at the run's last optimizer step (steps x substeps) along a line or a half cosine.")


class LossConfig(Section):
    kind: Literal["importance_sampling", "ppo"] = Field(
        default="importance_sampling", description="importance_sampling: the advantage weighted by the importance "
        "ratio; ppo: PPO's clipped objective. The sft objective uses neither.")
    clip_range: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2, description="PPO's clip: the ratio is clipped to [1 - clip_range, 1 + clip_range] (ppo); also the band the "
        "clip_fraction metric counts.")
    distill: Literal["sampled", "topk_forward", "topk_reverse"] = Field(
        default="sampled", description="objective opd: sampled: the reverse KL at the sampled token, as the advantage; "
        "topk_forward / topk_reverse: also the exact KL(teacher || student) / KL(student || teacher) over the teacher's "
        "top_k tokens and one tail bucket (topk.py), mixed with the sampled loss by topk_weight.")
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = Field(
        default=8, description="With distill topk_*: the teacher's top-k asked per scored token (at most the "
        "teacher's max_top_k, GET /info).")
    topk_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        default=1.0, description="With distill topk_*: the loss is (1 - w) * sampled + w * top-k; 1: the top-k loss "
        "alone, 0: the sampled loss alone (the top-k metrics are still recorded).")


class EvalConfig(Section):
    every: Annotated[int, Field(ge=0, description="Evaluate every N steps (and before the first and after the last); 0: never.")] = 10
    samples_per_prompt: Annotated[int, Field(ge=1, le=64)] = Field(default=1, description="Completions per held-out prompt.")
    max_tokens: PositiveInt | None = Field(default=None, description="Default: sampling.max_tokens.")
    verifier: str | None = Field(default=None, description="'module:function' (row, completion_text) -> bool: eval accuracy.")
    measures: dict[str, str] = Field(
        default_factory=dict,
        description="More verdicts beside the verifier, name -> 'module:function' (row, completion_text) -> bool: "
                    "each recorded as accuracy_<name> (held out) and train_accuracy_<name> (each step).")


class ChatTurn(Section):
    role: Annotated[str, Field(min_length=1, description="The turn's role (system, user, assistant).")]
    content: str = Field(description="The turn's text.")


class TeacherPromptConfig(Section):
    """What the teacher sees before the student's completion (context.py).

    The student never sees any of it; the teacher renders it with its own chat
    template and scores exactly the student's completion tokens after it.
    """

    system: str | None = Field(default=None, description="Privileged instructions: the start of the teacher's system message.")
    examples: tuple[ChatTurn, ...] = Field(default=(), description="Few-shot turns before each row's conversation.")
    hint: str | None = Field(
        default=None,
        description="A template filled from each row's fields ('Hint: {answer}'), on a line of its own at the end of "
        "the row's last user turn: per-row privileged information, such as a reference answer or a retrieved passage.",
    )
    row_context: str = Field(default="teacher_context", description="A row's field whose text extends the system message.")
    row_messages: str = Field(default="teacher_messages", description="A row's field holding the teacher's whole conversation.")
    render: Literal["auto", "teacher"] = Field(
        default="auto",
        description="auto: the teacher scores the student's own prompt tokens unless a context applies; teacher: it "
        "always renders the prompt with its own chat template (a teacher whose template differs).",
    )

    @field_validator("hint")
    @classmethod
    def _hint_names_fields(cls, v: str | None) -> str | None:
        if v is not None:
            hint_fields(v)
        return v


def hint_fields(template: str) -> list[str]:
    """The row fields a hint template names; ValueError for anything but plain {field} names."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a template ({e}): write a row's field in braces, {{answer}}, and a brace as {{{{ or }}}}") from e
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a row field's name: write one in braces, as {{answer}}")
    if not names:
        raise ValueError("names no row field: write one in braces, as in 'Hint: {answer}'")
    return names


class TeacherConfig(Section):
    """One teacher of several (`teachers`): its replicas, how to ask them, and what it sees."""

    urls: Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(
        min_length=1, description="The teacher's replicas, used round robin.")]
    protocol: TeacherProtocol = Field(default="opd", description="opd, openai or sglang: as teacher_protocol.")
    tokenizer: str | None = Field(default=None, description="As teacher_tokenizer, for this teacher.")
    api_key: str | None = Field(default=None, repr=False, description="Default: the run's api_key.")
    teacher_prompt: TeacherPromptConfig = Field(
        default=TeacherPromptConfig(), description="What this teacher sees before the completion, as the run's "
        "teacher_prompt.")

    @field_validator("urls", mode="before")
    @classmethod
    def _one_url(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ServicesConfig(Section):
    request_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=300.0, description="Timeout of one request to a teacher or student, in seconds.")
    retries: Annotated[int, Field(ge=0)] = Field(default=4, description="Tries after the first for a failed request.")
    max_backoff_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="Longest pause between retries, and between checks on a service that is down.")
    max_wait_s: Annotated[float, Field(ge=0, description="How long a run waits for a service that is down before failing.")] = 900.0


class RunConfig(Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = Field(
        default="opd", description="The run's name: its versions' folder under checkpoint_root, a trainer "
        "service's run id prefix, the plot's title.")
    student: StudentConfig
    teacher_urls: Annotated[tuple[str, ...] | None, Field(
        min_length=1, description="Teacher replicas, used round robin (or give teachers).")] = None
    teacher_protocol: TeacherProtocol = Field(
        default="opd",
        description="How the trainer asks the teachers for scores: opd (POST /logprobs), openai (a vLLM "
        "OpenAI-compatible server's /v1/completions with prompt_logprobs) or sglang (an SGLang server's /generate).",
    )
    teacher_tokenizer: str | None = Field(
        default=None, description="The teacher's tokenizer (folder or hub id) when it differs from the student's: "
        "the trainer then aligns the two on bytes. Default: an opd teacher's model as its /info names it; a stock "
        "server's must be given.")
    teachers: dict[TeacherName, TeacherConfig] | None = Field(
        default=None, min_length=1, description="Several teachers, name -> its settings; each dataset row is scored "
        "by the one its `dataset.teacher_field` names. Give this or teacher_urls (with teacher_protocol, "
        "teacher_prompt), not both.")
    default_teacher: TeacherName | None = Field(
        default=None, description="With teachers: the teacher of rows that name none; default: the first listed.")
    student_url: Annotated[str | None, Field(min_length=1, description="The student service (or give student_urls).")] = None
    student_urls: Annotated[tuple[Annotated[str, Field(min_length=1)], ...] | None, Field(
        min_length=1, description="Student replicas: each step's prompts are split across them, every one loads "
        "each version. Give this or student_url, not both.")] = None
    objective: Literal["opd", "rl", "sft"] = Field(
        default="opd",
        description="opd: per-token reverse KL to the teacher; rl: the task reward only, centred per prompt, no "
        "teacher; sft: log-likelihood of completions the teacher samples (teacher_sampler_url).",
    )
    teacher_sampler_url: str | None = Field(
        default=None, description="objective sft: a student service serving the teacher's model, sampling its completions."
    )
    api_key: str | None = Field(default=None, repr=False, description="Key for the teacher and student services; "
                                "default: OPD_API_KEY.")
    dataset: DatasetConfig
    sampling: SamplingConfig = SamplingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    kl_coef: Annotated[float, Field(ge=0)] = Field(
        default=1.0, description="Weight of the per-token reverse KL in the advantage (objective opd).")
    kl_discount: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="A token's advantage also sums later tokens' KL, discounted by this per token; 0: "
        "its own KL only.")
    reward_fn: str | None = Field(default=None, description="'module:function' (row, completion_text) -> float, group-centered.")
    teacher_prompt: TeacherPromptConfig = TeacherPromptConfig()
    substeps: PositiveInt = Field(
        default=1, description="Optimizer steps per step, each on its share of the step's rollouts.")
    steps: PositiveInt = Field(default=100, description="Training steps.")
    eval: EvalConfig = EvalConfig()
    save_every: Annotated[int, Field(ge=1, description="Checkpoint the trainer state every N steps (and at the end).")] = 10
    keep_versions: Annotated[int, Field(ge=1, description="Policy versions kept under checkpoint_root.")] = 2
    seed: int = Field(
        default=0, description="Seeds the held-out split, the prompt order, the LoRA initialisation and the rollouts.")
    output_dir: str = Field(default="runs/opd", description="Metrics, TensorBoard, plot and trainer checkpoints.")
    checkpoint_root: str = Field(default="checkpoints", description="The student service's --checkpoint-root.")
    resume: bool = Field(
        default=True, description="Continue from the checkpoint in output_dir when there is one; false: start afresh, dropping it."
    )
    services: ServicesConfig = ServicesConfig()

    @field_validator("reward_fn")
    @classmethod
    def _callable_spec(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError("write it as 'package.module:function'")
        return v

    @field_validator("student_urls", mode="before")
    @classmethod
    def _one_url(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _environment_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        """What a config leaves out comes from `OPD_TRAIN_*` variables: a trainer
        service's deployment defaults (service URLs, student model, folders).
        The environment is `os.environ` unless the validation context names one."""
        if not isinstance(data, Mapping):
            return data
        environ = (info.context or {}).get("environ", os.environ)
        defaults: dict[str, Any] = {}
        for path, value in env_overrides(environ):
            set_path(defaults, path, value)
        if STUDENT_URL_FIELDS & data.keys():  # the config names its students: no default adds the other field
            for key in STUDENT_URL_FIELDS:
                defaults.pop(key, None)
        for key, drops in TEACHER_REPLACES.items():  # nor its teachers in the other style
            if key in data:
                for drop in drops:
                    defaults.pop(drop, None)
        merged = deep_merge(defaults, dict(data))
        if not STUDENT_URL_FIELDS & merged.keys():  # reported with the other fields' errors (_students)
            merged["student_url"] = NO_STUDENTS
        if merged.get("teachers") is None and "teacher_urls" not in merged:
            merged["teacher_urls"] = NO_TEACHERS
        return merged

    @field_validator("teacher_urls", mode="before")
    @classmethod
    def _teachers_named(cls, v: Any) -> Any:
        if v is NO_TEACHERS:
            raise ValueError("Field required: give teacher_urls (one teacher's replicas) or teachers (several, by name)")
        return [v] if isinstance(v, str) else v

    @field_validator("student_url", mode="before")
    @classmethod
    def _students_named(cls, v: Any) -> Any:
        if v is NO_STUDENTS:
            raise ValueError("give student_url (the student service's URL) or student_urls (student replicas' URLs)")
        return v

    @field_validator("student_urls")
    @classmethod
    def _one_way(cls, v: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if v is not None and info.data.get("student_url") is not None:
            raise ValueError("give student_url (one student) or student_urls (replicas), not both")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.student_url is None and self.student_urls is None:  # both given as null
            raise ValueError("student_url: give student_url (the student service's URL) or student_urls (student replicas' URLs)")
        self._check_teachers()
        if self.eval.verifier is not None and self.eval.verifier.count(":") != 1:
            raise ValueError("eval.verifier: write it as 'package.module:function'")
        for name, spec in self.eval.measures.items():
            if not MEASURE_NAME.fullmatch(name) or spec.count(":") != 1:
                raise ValueError(f"eval.measures.{name}: name it in lower case, a-z 0-9 _, "
                                 "and write it as 'package.module:function'")
        if self.objective == "sft" and not self.teacher_sampler_url:
            raise ValueError("objective sft: give teacher_sampler_url, a student service serving the teacher's model")
        if self.objective == "sft" and self.teachers is not None and len(self.teachers) > 1:
            raise ValueError(f"objective sft: every row is sampled by the one teacher_sampler_url, so a run of "
                             f"{len(self.teachers)} teachers ({', '.join(self.teachers)}) would credit rows to teachers "
                             "that never wrote them: run sft with one teacher")
        if self.loss.distill != "sampled" and self.objective != "opd":
            raise ValueError(f"loss.distill {self.loss.distill}: the top-k losses distill the teacher's distribution "
                             f"(objective opd); objective {self.objective} asks no teacher for scores: set "
                             "loss.distill sampled, or objective opd")
        if self.objective == "rl" and not (self.reward_fn or self.eval.verifier):
            raise ValueError("objective rl: give reward_fn or eval.verifier, the reward to learn from")
        for name, teacher in self.teacher_set.items():
            if teacher.teacher_prompt.examples and self.dataset.prompt_format == "text":
                where = "teacher_prompt" if self.teachers is None else f"teachers.{name}.teacher_prompt"
                raise ValueError(f"{where}.examples: few-shot turns need dataset.prompt_format 'chat'")
        sequences = self.sampling.prompts_per_step * self.sampling.samples_per_prompt
        if self.substeps > sequences:
            raise ValueError(
                f"substeps: {self.substeps} substeps need at least as many sequences per step; "
                f"prompts_per_step * samples_per_prompt = {sequences}"
            )
        return self

    def _check_teachers(self) -> None:
        if self.teachers is None:
            if self.teacher_urls is None:
                raise ValueError("teacher_urls: give teacher_urls (one teacher's replicas) or teachers (several, by name)")
            if self.default_teacher is not None:
                raise ValueError("default_teacher: names one of `teachers`; give teachers, or drop default_teacher")
            return
        both = [f for f in ONE_TEACHER if f in self.model_fields_set]
        if both:
            raise ValueError(f"teachers: give teachers (several teachers, by name) or {', '.join(both)} (one teacher), "
                             f"not both (an OPD_TRAIN_* variable or a --set counts): move {', '.join(both)} into "
                             "a teacher of `teachers`")
        if self.default_teacher is not None and self.default_teacher not in self.teachers:
            raise ValueError(f"default_teacher: {self.default_teacher!r} is not one of the teachers "
                             f"({', '.join(self.teachers)})")

    @property
    def teacher_set(self) -> dict[str, TeacherConfig]:
        """The run's teachers by name: `teachers`, or the single-teacher fields as one teacher named `default`."""
        if self.teachers is not None:
            return dict(self.teachers)
        assert self.teacher_urls is not None
        return {DEFAULT_TEACHER: TeacherConfig(urls=self.teacher_urls, protocol=self.teacher_protocol,
                                               tokenizer=self.teacher_tokenizer, teacher_prompt=self.teacher_prompt)}

    @property
    def default_teacher_name(self) -> str:
        """The teacher of rows that name none."""
        return self.default_teacher or next(iter(self.teacher_set))

    @property
    def eval_max_tokens(self) -> int:
        return self.eval.max_tokens or self.sampling.max_tokens

    @property
    def student_replicas(self) -> tuple[str, ...]:
        """The student services' URLs: student_urls, or student_url alone."""
        return self.student_urls or (self.student_url,)  # type: ignore[return-value]


# ---------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: write it as section.field=value, e.g. sampling.max_tokens=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    if len(path) == 1 and path[0] in STUDENT_URL_FIELDS:
        for key in STUDENT_URL_FIELDS - {path[0]}:
            tree.pop(key, None)
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a section: cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section."""
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = deep_merge(out[key], value) if both else value
    return out


def env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    out = []
    for key, raw in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            path = key[len(ENV_PREFIX):].lower().split("__")
            out.append((path, yaml.safe_load(raw) if raw.strip() else ""))
    return out


def validate(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunConfig:
    from opd.common.server import describe_validation_errors

    try:
        return RunConfig.model_validate(data, context=None if environ is None else {"environ": environ})
    except ValidationError as exc:
        raise ConfigError("invalid run config: " + describe_validation_errors(list(exc.errors()))) from exc


def build_config(
    data: Mapping[str, Any], overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> RunConfig:
    """A mapping (from YAML or JSON), then env variables, then `a.b=value` overrides."""
    tree = yaml.safe_load(yaml.safe_dump(dict(data), sort_keys=False))  # a deep, plain copy, in the given order
    for path, value in env_overrides(os.environ if environ is None else environ):
        set_path(tree, path, value)
    for item in overrides:
        set_path(tree, *parse_override(item))
    env = os.environ if environ is None else environ
    if tree.get("api_key") is None and env.get("OPD_API_KEY"):
        tree["api_key"] = env["OPD_API_KEY"]
    return validate(tree, env)


def load_config(path: str | Path, overrides: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> RunConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no config file at {file}: give the path of a YAML run config")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a mapping of sections (student:, dataset:, ...), not a {type(data).__name__}")
    return build_config(data, overrides, environ)
