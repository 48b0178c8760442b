"""`opd teacher demo`: the teacher on SmolLM2-135M-Instruct, scoring a conversation.

Prepares the model, starts the teacher service as a child process, sends two
answers to the same chat question through the Python client, and prints the
per-token log-probabilities with the teacher's top alternatives.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.common.client import TeacherClient
from opd.common.process import ServiceProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWERS = ["The capital of France is Paris.", "The capital of France is London."]


def run_demo(workdir: Path, engine: str, port: int) -> None:
    from transformers import AutoTokenizer

    from opd.common.models import prepare

    console = Console()
    workdir.mkdir(parents=True, exist_ok=True)
    with console.status("preparing SmolLM2-135M-Instruct (once; about a minute)"):
        model = prepare("smollm2-135m-instruct", workdir / "models" / "smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model)
    teacher = ServiceProcess(
        "teacher", ["teacher", "serve", "--model", str(model), "--engine", engine, "--port", str(port)],
        port, log_file=workdir / "teacher.log",
    )
    console.print(f"starting the teacher ({engine} engine) on port {port}; log: {workdir / 'teacher.log'}")
    teacher.start()
    try:
        with console.status("waiting for the teacher to load its model"):
            teacher.wait_ready(timeout=900)
        client = TeacherClient(teacher.url)
        info = client.info()
        console.print(f"teacher ready: {info.model} engine={info.engine} fingerprint={info.tokenizer_fingerprint}")
        for answer in ANSWERS:
            completion = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            result = client.logprobs([{"prompt": {"messages": QUESTION}, "completion": completion}], top_k=3).results[0]
            table = Table(title=f"user: {QUESTION[0]['content']}  assistant: {answer}")
            for col in ("position", "token", "logprob", "teacher's top 3"):
                table.add_column(col)
            alternatives = result.top_logprobs or [[] for _ in result.logprobs]
            for j, (tok, lp, top) in enumerate(zip(completion, result.logprobs, alternatives, strict=True)):
                alts = ", ".join(f"{tokenizer.decode([t.token_id])!r} {t.logprob:.2f}" for t in top)
                table.add_row(str(result.start + j), repr(tokenizer.decode([tok])), f"{lp:.3f}", alts)
            console.print(table)
            console.print(f"sum of logprobs: {sum(result.logprobs):.3f} over {len(result.logprobs)} tokens\n")
    except Exception as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        sys.exit(1)
    finally:
        teacher.stop()
