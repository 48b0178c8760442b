"""A teacher of another tokenizer (issue 40): the trainer aligns the two tokenizations on bytes by itself.

- The tiny teacher with its vocabulary permuted (embedding and output rows reordered, its tokenizer's ids
  remapped: the same function under other ids) trains the student exactly as the plain teacher does: every
  record's teacher KL and loss within 1e-4, on the hf engine and on vLLM, and asked as a stock vLLM server is
  (token ids, the prompt rendered by the trainer with the teacher's tokenizer); every chunk is one token.
- With a top-k loss (`loss.distill topk_reverse`, top_k 4) the permuted teacher's top-k, mapped back to the
  student's ids on bytes, trains the student as the plain teacher's does: loss, topk_kl and topk_mass within 1e-4,
  no position without a usable top-k (hf engine).
- A tiny teacher with a tokenizer trained apart (another vocabulary, other merges) trains the student: chunks of
  several tokens, no position trimmed, and the held-out teacher KL per completion falls.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.common.vocab_variants import permuted_model
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from tests.trainer.conftest import teacher_args
from tests.trainer.runs import hf_args, start_service, wait_all

pytestmark = pytest.mark.slow
# Teachers normalise their logprobs in float64 (hf.py choice 3, vllm_engine.py choice 8), in no order of the
# vocabulary's: a teacher with its vocabulary permuted scores bit for bit as the plain one, and so trains alike.
EXACT = 0.0


def run(config) -> tuple[list[dict], Trainer]:
    trainer = Trainer(config)
    assert trainer.run() == "completed"
    return read_records(Path(config.output_dir) / "metrics.jsonl"), trainer


@pytest.fixture(scope="module")
def permuted_teacher(teacher_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return permuted_model(teacher_model, tmp_path_factory.mktemp("permuted") / "teacher", seed=1)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_teacher_with_permuted_ids_trains_as_the_plain_one(
    engine: str, make_config, services, teacher_model: Path, permuted_teacher: Path, service_logs: Path, tmp_path: Path,
) -> None:
    args = (lambda model: hf_args("teacher", model)) if engine == "hf" else teacher_args
    permuted = start_service(f"teacher-permuted-{engine}", args(permuted_teacher), service_logs)
    plain = start_service("teacher-plain-hf", args(teacher_model), service_logs) if engine == "hf" else services["teacher"]
    try:
        wait_all(permuted, plain)
        settings = dict(steps=2, eval__every=2, save_every=2)
        a, plain_run = run(make_config(name=f"plain-{engine}", teacher_urls=f"[{plain.url}]",
                                       output_dir=str(tmp_path / "plain"), **settings))
        b, permuted_run = run(make_config(name=f"permuted-{engine}", teacher_urls=f"[{permuted.url}]",
                                          output_dir=str(tmp_path / "permuted"), **settings))
        if engine == "hf":  # as a stock vLLM server is asked (token ids only), through the teacher's /v1/completions
            c, stock_run = run(make_config(name="permuted-openai", teacher_urls=f"[{permuted.url}]",
                                           teacher_protocol="openai", teacher_tokenizer=str(permuted_teacher),
                                           output_dir=str(tmp_path / "openai"), **settings))
    finally:
        permuted.stop()
        if engine == "hf":
            plain.stop()
    assert plain_run.remote.alignment == {"default": "ids"} and permuted_run.remote.alignment == {"default": "bytes"}
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b] == \
        [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    for ra, rb in zip(a, b, strict=True):
        assert rb["tokens"] == ra["tokens"] and rb["trimmed_tokens"] == ra["trimmed_tokens"] == 0
        for key in ("teacher_kl", "teacher_kl_per_completion") + (("loss",) if ra["kind"] == "train" else ()):
            assert rb[key] == pytest.approx(ra[key], abs=EXACT), (ra["kind"], ra["step"], key, ra[key], rb[key])
        assert rb["aligned_chunks"] >= rb["tokens"] and rb["multi_token_chunks"] == 0, rb
        assert "aligned_chunks" not in ra, "a teacher of the student's tokenizer scores its ids, as before"
    if engine == "hf":
        assert stock_run.remote.alignment == {"default": "bytes"}
        for ra, rc in zip(a, c, strict=True):
            assert rc["teacher_kl"] == pytest.approx(ra["teacher_kl"], abs=EXACT), (ra, rc)


def test_a_topk_loss_with_the_permuted_teacher_is_the_plain_ones(
    make_config, teacher_model: Path, permuted_teacher: Path, service_logs: Path, tmp_path: Path,
) -> None:
    permuted = start_service("teacher-permuted-topk", hf_args("teacher", permuted_teacher), service_logs)
    plain = start_service("teacher-plain-topk", hf_args("teacher", teacher_model), service_logs)
    try:
        wait_all(permuted, plain)
        settings = dict(steps=2, eval__every=0, save_every=2, loss__distill="topk_reverse", loss__top_k=4)
        a, plain_run = run(make_config(name="plain-topk", teacher_urls=f"[{plain.url}]",
                                       output_dir=str(tmp_path / "plain-topk"), **settings))
        b, permuted_run = run(make_config(name="permuted-topk", teacher_urls=f"[{permuted.url}]",
                                          output_dir=str(tmp_path / "permuted-topk"), **settings))
    finally:
        permuted.stop()
        plain.stop()
    assert plain_run.remote.alignment == {"default": "ids"} and permuted_run.remote.alignment == {"default": "bytes"}
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b] == [("train", 1), ("train", 2)]
    for ra, rb in zip(a, b, strict=True):
        assert rb["tokens"] == ra["tokens"] and rb["multi_token_chunks"] == 0, rb
        assert ra["topk_unaligned"] == rb["topk_unaligned"] == 0 and rb["topk_misses"] == ra["topk_misses"]
        for key in ("loss", "topk_kl", "topk_mass", "teacher_kl"):
            assert rb[key] == pytest.approx(ra[key], abs=EXACT), (ra["step"], key, ra[key], rb[key])


def test_a_teacher_of_another_segmentation_trains(make_config, other_tokenizer_model: Path, service_logs: Path) -> None:
    teacher = start_service("teacher-other-tokenizer", hf_args("teacher", other_tokenizer_model), service_logs)
    try:
        wait_all(teacher)
        records, trainer = run(make_config(name="other-tokenizer", teacher_urls=f"[{teacher.url}]", steps=6,
                                           eval__every=6, save_every=6))
    finally:
        teacher.stop()
    assert trainer.remote.alignment == {"default": "bytes"}
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert all(r["trimmed_tokens"] == 0 and r["aligned_chunks"] > 0 for r in records), "no position dropped"
    assert all(r["multi_token_chunks"] > 0 for r in train), [r["multi_token_chunks"] for r in train]
    assert [r["step"] for r in evals] == [0, 6]
    assert evals[-1]["teacher_kl_per_completion"] < evals[0]["teacher_kl_per_completion"], evals
