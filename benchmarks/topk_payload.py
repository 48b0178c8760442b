"""The teacher's top-k on the wire (issue 41): JSON bytes per scored token and scoring time per request, by k.

Starts one opd teacher service (hf engine; SmolLM2-135M-Instruct prepared by `opd.common.models.prepare`, or
--model) and sends it the same batch of token-id sequences (a trainer step's shape: `--prompts` prompts x
`--group` completions, `--prompt-length` + `--completion-length` tokens) as POST /logprobs with top_k = 0, 1, 8
and 20 (the protocol's MAX_TOP_K), the k interleaved over `--repeats` rounds. For each k:

- bytes/token: the response body's bytes over the scored (completion) tokens; the body also echoes every
  sequence's token ids, which is the k = 0 figure's main part;
- request s: the median time of one POST, body read (the server scores, serialises and sends);
- parse s: the median time the client takes to validate the body into a LogprobsResponse (what the
  trainer's TeacherClient does with it);
- payload share: the extra time over k = 0 (request + parse) as a share of the request's time;
- in-process s: the hf engine's scoring plus the response's serialisation in this process, no HTTP (the same
  machine state for every k, run after the service), and of which serialise s: the serialisation alone.

k = 32 is above the protocol's top_k limit (20), so the service refuses it: its row is computed in-process,
the hf engine's top-32 serialised by the same response model (`in-process` in the table; its bytes agree with
the service's for the other k, which the table shows in the `in-process bytes/token` column), with the
engine's scoring time and no HTTP.

    python benchmarks/topk_payload.py                       # SmolLM2-135M-Instruct, prepared on first use
    python benchmarks/topk_payload.py --prompts 2 --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd.common import protocol as p  # noqa: E402
from opd.common.process import ServiceProcess, free_port  # noqa: E402

from teacher_throughput import make_batch  # noqa: E402  (benchmarks/, this script's folder)

SERVED_K = (0, 1, 8, 20)
IN_PROCESS_K = (32,)


def response_json(model: str, batch: list[dict], outputs) -> bytes:
    """What the service writes for these engine outputs (teacher/serving.py's response model)."""
    results = [p.SequenceLogprobs(token_ids=s["token_ids"], start=s["start"], logprobs=out.logprobs,
                                  top_logprobs=None if out.top_logprobs is None else
                                  [[p.TopLogprob(token_id=t, logprob=lp) for t, lp in row] for row in out.top_logprobs])
               for s, out in zip(batch, outputs, strict=True)]
    usage = p.Usage(sequences=len(batch), input_tokens=sum(len(s["token_ids"]) for s in batch),
                    scored_tokens=sum(len(r.logprobs) for r in results))
    return p.LogprobsResponse(model=model, results=results, usage=usage).model_dump_json().encode()


def served(url: str, batch: list[dict], repeats: int) -> dict[int, dict[str, float]]:
    http = httpx.Client(timeout=900)
    times: dict[int, list[float]] = {k: [] for k in SERVED_K}
    parses: dict[int, list[float]] = {k: [] for k in SERVED_K}
    sizes: dict[int, int] = {}
    for k in SERVED_K:  # warm-up
        http.post(url + "/logprobs", json={"sequences": batch[:2], "top_k": k}).raise_for_status()
    for r in range(repeats):
        for k in SERVED_K[r % len(SERVED_K):] + SERVED_K[: r % len(SERVED_K)]:  # each k first in turn
            began = time.perf_counter()
            answer = http.post(url + "/logprobs", json={"sequences": batch, "top_k": k})
            body = answer.read()
            times[k].append(time.perf_counter() - began)
            answer.raise_for_status()
            began = time.perf_counter()
            parsed = p.LogprobsResponse.model_validate_json(body)
            parses[k].append(time.perf_counter() - began)
            sizes[k] = len(body)
            assert all((r.top_logprobs is None) == (k == 0) for r in parsed.results)
    http.close()
    return {k: {"bytes": sizes[k], "request": statistics.median(times[k]), "parse": statistics.median(parses[k])}
            for k in SERVED_K}


def in_process(model: str, batch: list[dict], repeats: int) -> dict[int, dict[str, float]]:
    from opd.common.settings import TeacherSettings
    from opd.teacher.engine import HFScoringEngine, ScoreJob

    engine = HFScoringEngine(TeacherSettings(model=model, engine="hf", dtype="float32", device="cpu"))
    jobs = [ScoreJob(s["token_ids"], s["start"]) for s in batch]
    out = {}
    for k in SERVED_K + IN_PROCESS_K:
        engine.score_sync(jobs[:2], top_k=k)
        seconds, dumps, body = [], [], b""
        for _ in range(repeats):
            began = time.perf_counter()
            outputs = engine.score_sync(jobs, top_k=k)
            dumped = time.perf_counter()
            body = response_json(model, batch, outputs)
            seconds.append(time.perf_counter() - began)
            dumps.append(time.perf_counter() - dumped)
        began = time.perf_counter()
        p.LogprobsResponse.model_validate_json(body)
        out[k] = {"bytes": len(body), "request": statistics.median(seconds), "parse": time.perf_counter() - began,
                  "serialise": statistics.median(dumps)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, prepared under --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=64, help="scored tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from opd.common.models import prepare

        args.model = str(prepare("smollm2-135m-instruct", args.workdir / "smollm2-135m-instruct", dtype="float32"))
    from transformers import AutoConfig

    batch = make_batch(AutoConfig.from_pretrained(args.model).vocab_size, args.prompts, args.group,
                       args.prompt_length, args.completion_length)
    scored = sum(len(s["token_ids"]) - s["start"] for s in batch)
    port = free_port()
    proc = ServiceProcess("teacher", ["teacher", "serve", "--model", args.model, "--engine", "hf", "--dtype", "float32",
                                      "--device", "cpu", "--port", str(port)], port,
                          log_file=args.workdir / "topk-payload-teacher.log")
    proc.start()
    try:
        proc.wait_ready(900)
        http = served(proc.url, batch, args.repeats)
    finally:
        proc.stop()
    local = in_process(args.model, batch, args.repeats)

    print(f"{len(batch)} sequences of {args.prompt_length} + {args.completion_length} tokens, {scored} scored tokens "
          f"per request; medians of {args.repeats}")
    print(f"{'k':>3} | {'where':<10} | {'bytes/token':>11} | {'in-process bytes/token':>22} | {'request s':>9} | "
          f"{'parse s':>7} | {'payload share':>13} | {'in-process s':>12} | {'of which serialise s':>20}")
    base = http[0]["request"] + http[0]["parse"]
    for k in SERVED_K + IN_PROCESS_K:
        row = http.get(k)
        where = "service" if row else "in-process"
        row = row or local[k]
        if where == "service":
            share = f"{(row['request'] + row['parse'] - base) / (row['request'] + row['parse']):>12.0%}"
        else:
            share = f"{'-':>13}"
        print(f"{k:>3} | {where:<10} | {row['bytes'] / scored:>11.1f} | {local[k]['bytes'] / scored:>22.1f} | "
              f"{row['request']:>9.3f} | {row['parse']:>7.4f} | {share} | {local[k]['request']:>12.3f} | "
              f"{local[k]['serialise']:>20.4f}")


if __name__ == "__main__":
    main()
