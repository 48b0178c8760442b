"""Load on the teacher and the student services at rising concurrency, loopback only.

    python benchmarks/load.py                                  # both services, vLLM, SmolLM2 (about 8 minutes on 2 cores)
    python benchmarks/load.py --services student --engine hf --levels 1,4 --seconds 10   # quick

One service at a time is started as a process on 127.0.0.1 (never both: they
would share the CPU), then:
1) Levels: for each concurrency c in --levels, c clients send requests back
   to back for --seconds (and at most --max-requests in all) over HTTP.
   Reported: requests and tokens per second, p50/p99 latency, failures.
   Teacher requests score --sequences completions of --tokens tokens after a
   chat prompt; student requests sample --n completions of --tokens tokens.
2) Overload: the service runs with max_pending = --max-pending; that many
   slow requests plus --extra more are sent at once. The extra ones must be
   answered 503 with a Retry-After header at once, and the others served.
3) Memory: the resident memory of the service and its child processes
   (vLLM's engine core) before the first level and after each one; it must
   stay flat (growth reported).
Bounded: every level ends after --seconds or --max-requests; the whole run
after --deadline seconds. Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
             "Why is the sky blue?", "Tell me a short joke.", "What causes rain?", "Name three prime numbers."]


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_mib: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="teacher,student", help="Which services, comma-separated.")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--model", type=Path, help="A model folder; default: SmolLM2-135M-Instruct prepared into the workdir.")
    ap.add_argument("--workdir", type=Path, default=Path("runs/load-bench"))
    ap.add_argument("--levels", default="1,2,4,8,16", help="Concurrent clients per level.")
    ap.add_argument("--seconds", type=float, default=20.0, help="Length of each level.")
    ap.add_argument("--max-requests", type=int, default=2000, help="At most this many requests per level.")
    ap.add_argument("--deadline", type=float, default=1500.0, help="The whole run stops after this many seconds.")
    ap.add_argument("--sequences", type=int, default=4, help="Teacher: completions scored per request.")
    ap.add_argument("--n", type=int, default=2, help="Student: samples per request.")
    ap.add_argument("--tokens", type=int, default=32, help="Completion length (teacher) / max_tokens (student).")
    ap.add_argument("--max-pending", type=int, default=16, help="The services' max_pending during the run.")
    ap.add_argument("--extra", type=int, default=8, help="Requests beyond max_pending in the overload check.")
    ap.add_argument("--dtype", default="float32", help="float32: CPUs without bf16 units run it many times faster.")
    return ap.parse_args()


# ---------------------------------------------------------------- the service
def prepare_model(args: argparse.Namespace) -> Path:
    if args.model:
        return args.model
    from opd.common.models import prepare

    print("preparing smollm2-135m-instruct (once) ...", flush=True)
    return prepare("smollm2-135m-instruct", args.workdir / "models" / "smollm2-135m-instruct", dtype=args.dtype)


def start(kind: str, model: Path, args: argparse.Namespace):
    from opd.common.process import ServiceProcess, free_port

    port = free_port()
    cmd = [kind, "serve", "--model", str(model), "--engine", args.engine, "--dtype", args.dtype]
    if kind == "student":
        cmd += ["--checkpoint-root", str(args.workdir / "checkpoints"), "--no-lora"]
    env = {f"OPD_{kind.upper()}_MAX_PENDING": str(args.max_pending), "VLLM_CPU_KVCACHE_SPACE": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    log = args.workdir / "logs" / f"{kind}-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = ServiceProcess(kind, [*cmd, "--host", "127.0.0.1", "--port", str(port)], port, log_file=log, env=env).start()
    proc.wait_ready(timeout=600)
    return proc


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---------------------------------------------------------------- requests
def request_for(kind: str, model: Path, args: argparse.Namespace) -> tuple[str, list[dict], int]:
    """(path, bodies to cycle through, tokens per request)."""
    import random

    from opd.common.protocol import Prompt
    from opd.common.tokenizer import load_tokenizer, render_prompt

    tokenizer = load_tokenizer(str(model))
    rng = random.Random(0)
    bodies = []
    for q in QUESTIONS:
        if kind == "teacher":
            prompt = render_prompt(tokenizer, Prompt(messages=[{"role": "user", "content": q}]))
            sequences = [{"prompt": {"token_ids": prompt},
                          "completion": [rng.randrange(len(tokenizer)) for _ in range(args.tokens)]}
                         for _ in range(args.sequences)]
            bodies.append({"sequences": sequences})
        else:
            bodies.append({"prompts": [{"messages": [{"role": "user", "content": q}]}], "n": args.n,
                           "max_tokens": args.tokens, "temperature": 1.0})
    per_request = args.sequences * args.tokens if kind == "teacher" else 0  # the student's are counted from answers
    return ("/logprobs" if kind == "teacher" else "/rollouts"), bodies, per_request


async def run_level(url: str, path: str, bodies: list[dict], per_request: int, level: Level, args, stop_at: float) -> None:
    end = min(time.monotonic() + args.seconds, stop_at)
    sent = 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < end and sent < args.max_requests:
            sent += 1
            began = time.perf_counter()
            r = await http.post(url + path, json=bodies[(i + sent) % len(bodies)])
            if r.status_code != 200:
                level.failures[r.status_code] = level.failures.get(r.status_code, 0) + 1
                continue
            level.latencies.append(time.perf_counter() - began)
            level.tokens += per_request or r.json()["usage"]["generated_tokens"]

    limits = httpx.Limits(max_connections=level.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        began = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(level.concurrency)))
        level.seconds = time.monotonic() - began


async def overload(url: str, path: str, slow: dict, args) -> tuple[int, int, int, bool]:
    """max_pending slow requests and `extra` more at once: (served, refused with 503, other, every 503 had Retry-After)."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.max_pending + args.extra + 4)) as http:
        first = [asyncio.create_task(http.post(url + path, json=slow)) for _ in range(args.max_pending)]
        await asyncio.sleep(1.0)  # the first ones are admitted and held by now
        later = await asyncio.gather(*(http.post(url + path, json=slow) for _ in range(args.extra)))
        answers = list(later) + list(await asyncio.gather(*first))
    refused = [r for r in answers if r.status_code == 503]
    served = sum(r.status_code == 200 for r in answers)
    return served, len(refused), len(answers) - served - len(refused), all("retry-after" in r.headers for r in refused)


def slow_body(kind: str, bodies: list[dict]) -> dict:
    body = dict(bodies[0])
    if kind == "student":
        body.update(n=4, max_tokens=4 * max(body["max_tokens"], 32))
    else:
        body["sequences"] = body["sequences"] * 8
    return body


# ---------------------------------------------------------------- the run
def report(kind: str, args, levels: list[Level], over: tuple[int, int, int, bool], rss_start: float) -> None:
    unit = "scored tokens/s" if kind == "teacher" else "generated tokens/s"
    print(f"\n{kind} ({args.engine} engine): {', '.join(f'{k}={getattr(args, k)}' for k in ('sequences', 'n', 'tokens') if k != ('n' if kind == 'teacher' else 'sequences'))}")
    print(f"| clients | requests/s | {unit} | p50 latency s | p99 latency s | failures | RSS MiB after |")
    print("|---|---|---|---|---|---|---|")
    for lv in levels:
        done = len(lv.latencies)
        print(f"| {lv.concurrency} | {done / lv.seconds:.2f} | {lv.tokens / lv.seconds:.0f} | {lv.percentile(0.5):.3f} | "
              f"{lv.percentile(0.99):.3f} | {sum(lv.failures.values()) or 0} | {lv.rss_mib:.0f} |")
    served, refused, other, retry_after = over
    growth = levels[-1].rss_mib - rss_start if levels else 0.0
    print(f"overload: {args.max_pending} + {args.extra} requests at once with max_pending {args.max_pending}: "
          f"{served} served, {refused} refused with 503 ({'all' if retry_after else 'NOT all'} with Retry-After), {other} other")
    print(f"memory: {rss_start:.0f} MiB before the first level, {levels[-1].rss_mib if levels else 0:.0f} MiB after the last "
          f"({growth:+.0f} MiB)")


async def bench(kind: str, model: Path, args, stop_at: float) -> None:
    proc = start(kind, model, args)
    try:
        path, bodies, per_request = request_for(kind, model, args)
        async with httpx.AsyncClient(timeout=600) as http:  # warm-up
            (await http.post(proc.url + path, json=bodies[0])).raise_for_status()
        rss_start = rss_mib(proc.proc.pid)
        levels = []
        for c in (int(x) for x in args.levels.split(",")):
            if time.monotonic() >= stop_at:
                break
            level = Level(c)
            await run_level(proc.url, path, bodies, per_request, level, args, stop_at)
            level.rss_mib = rss_mib(proc.proc.pid)
            levels.append(level)
            print(f"{kind}: {c} clients: {len(level.latencies)} requests in {level.seconds:.1f}s", flush=True)
        over = await overload(proc.url, path, slow_body(kind, bodies), args)
        report(kind, args, levels, over, rss_start)
    finally:
        proc.stop()


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "checkpoints").mkdir(exist_ok=True)
    model = prepare_model(args)
    stop_at = time.monotonic() + args.deadline
    for kind in args.services.split(","):
        asyncio.run(bench(kind.strip(), model, args, stop_at))


if __name__ == "__main__":
    main()
