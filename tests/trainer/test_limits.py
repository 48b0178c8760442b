"""A run against the services' advertised limits (GET /info): scoring requests
cut to what the teacher takes, samples trimmed to the teacher's maximum
length, and a run the student would refuse stopped at start."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from opd.common import protocol as p
from opd.common.tokenizer import load_tokenizer, render_prompt
from opd.trainer.config import ConfigError, DatasetConfig
from opd.trainer.data import load_prompts
from opd.trainer.loop import Trainer
from opd.trainer.metrics import read_records
from tests.utils.services import running

pytestmark = pytest.mark.slow


def test_scoring_fits_a_small_teacher(make_config, teacher_model: Path, student_model: Path, prompts_file: Path,
                                      tmp_path: Path) -> None:
    """A teacher that takes 5 sequences and 3 sequences' worth of tokens per request, and sequences only
    8 tokens longer than the longest prompt: every step is scored in many requests, and the completions
    that do not fit lose their last tokens instead of failing the run (one request of 32 sequences gets a 413)."""
    tokenizer = load_tokenizer(str(student_model))
    rows = sum(load_prompts(DatasetConfig(path=str(prompts_file), eval_size=16), seed=3), [])
    longest = max(len(render_prompt(tokenizer, p.Prompt(messages=row.prompt.messages))) for row in rows)
    max_len = longest + 8
    env = {"OPD_TEACHER_MAX_SEQUENCES": "5", "OPD_TEACHER_MAX_REQUEST_TOKENS": str(3 * max_len)}
    args = ["teacher", "serve", "--model", str(teacher_model), "--engine", "hf", "--dtype", "float32",
            "--device", "cpu", "--max-model-len", str(max_len)]
    with running("teacher-small", args, log_dir=tmp_path, env=env) as teacher:
        config = make_config(name="small-teacher", teacher_urls=teacher.url, steps=2, eval__every=2, save_every=2)
        assert Trainer(config).run() == "completed"
        metrics = httpx.get(teacher.url + "/metrics").text
    records = read_records(Path(config.output_dir) / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["sequences"] == 32 for r in train)
    assert sum(r["trimmed_tokens"] for r in records) > 0, "some completions ran past the teacher's maximum length"
    assert all(r["tokens"] <= 32 * 16 - r["trimmed_tokens"] for r in train)
    ok = float(re.search(r'opd_teacher_requests_total\{outcome="ok"\} (\S+)', metrics).group(1))
    assert ok >= 2 * 32 / 5 and 'outcome="rejected"' not in metrics, "every request fit the limits"


def test_a_run_the_student_would_refuse_is_refused_at_start(make_config) -> None:
    """The student takes 256 prompts and 1024 rollouts per request (its /info limits)."""
    config = make_config(name="too-big", sampling__prompts_per_step=300, dataset__eval_size=20, eval__samples_per_prompt=64)
    with pytest.raises(ConfigError) as err:
        Trainer(config).run()
    message = str(err.value)
    assert "sampling.prompts_per_step: 300 prompts" in message and "at most 256 (max_prompts)" in message
    assert "sampling.prompts_per_step: 300 prompts x 4 samples = 1200 rollouts" in message
    assert "held-out prompts" in message and "20 prompts x 64 samples = 1280 rollouts" in message
    assert not (Path(config.output_dir) / "metrics.jsonl").exists(), "refused before anything ran"
