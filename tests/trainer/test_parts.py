"""The trainer's parts without services: data, sampler, atomic files, metrics, rewards, scoring limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.common import protocol as p
from opd.common.errors import InvalidInput
from opd.trainer import checkpoint as ck
from opd.trainer.config import DatasetConfig, build_config
from opd.trainer.data import DatasetError, PromptSampler, load_prompts, read_rows
from opd.trainer.metrics import KL_PER_COMPLETION, MetricsWriter, kl_series, plot_teacher_kl, read_records
from opd.trainer.remote import ScoreLimits
from opd.trainer.rollouts import Sample, chunks, fit
from opd.trainer.update import advantages, task_rewards


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_prompts_and_held_out_split(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(30)]
    rows[3] = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    path = jsonl(tmp_path / "p.jsonl", rows)
    train, held = load_prompts(DatasetConfig(path=str(path), eval_size=5), seed=1)
    assert len(train) == 25 and len(held) == 5
    texts = lambda xs: {json.dumps(x.row) for x in xs}  # noqa: E731
    assert not texts(train) & texts(held), "train and eval never share a prompt"
    assert load_prompts(DatasetConfig(path=str(path), eval_size=5), seed=1)[1] == held, "the split is seeded"
    chat = next(x for x in train + held if x.row.get("messages"))
    assert [m.role for m in chat.prompt.messages] == ["system", "user"]
    plain = next(x for x in train if x.row.get("answer") == "0")
    assert plain.prompt.messages[0].content == "question 0" and plain.row["answer"] == "0"
    text_mode, _ = load_prompts(DatasetConfig(path=str(path), eval_size=5, prompt_format="text"), seed=1)
    assert any(x.prompt.text == "question 0" for x in text_mode)


def test_folder_splits_and_bad_data(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"prompt": f"t{i}"} for i in range(6)])
    jsonl(folder / "test.jsonl", [{"prompt": f"e{i}"} for i in range(4)])
    train, held = load_prompts(DatasetConfig(path=str(folder), eval_split="test", eval_size=3), seed=0)
    assert len(train) == 6 and [x.row["prompt"] for x in held] == ["e0", "e1", "e2"]
    with pytest.raises(DatasetError, match="neither a datasets folder nor valid.jsonl"):
        read_rows(folder, "valid")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2 is not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    jsonl(tmp_path / "empty.jsonl", [{"prompt": f"x{i}"} for i in range(5)] + [{"text": "no prompt"}])
    with pytest.raises(DatasetError, match="neither a non-empty 'prompt'"):
        load_prompts(DatasetConfig(path=str(tmp_path / "empty.jsonl"), eval_size=1), seed=0)
    with pytest.raises(DatasetError, match="too few to hold out"):
        load_prompts(DatasetConfig(path=str(folder / "test.jsonl"), eval_size=4), seed=0)


def test_parquet_rows(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": "b"}]), tmp_path / "p.parquet")
    assert read_rows(tmp_path / "p.parquet") == [{"prompt": "a"}, {"prompt": "b"}]


def test_sampler_epochs_and_exact_resume() -> None:
    straight = PromptSampler(10, seed=4)
    drawn = [straight.next_indices(3) for _ in range(8)]
    assert sorted(sum(drawn[:4], [])[:10]) == list(range(10)), "an epoch draws every prompt once"
    half = PromptSampler(10, seed=4)
    for _ in range(4):
        half.next_indices(3)
    resumed = PromptSampler(10, seed=4)
    resumed.load_state_dict(half.state_dict())
    assert [resumed.next_indices(3) for _ in range(4)] == drawn[4:]
    assert PromptSampler(10, seed=5).next_indices(10) != sum(drawn[:4], [])[:10], "the seed matters"
    with pytest.raises(DatasetError, match="same dataset"):
        PromptSampler(11, seed=4).load_state_dict(half.state_dict())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "root" / "v000001"
    with pytest.raises(RuntimeError):
        with ck.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert not final.exists() and list((tmp_path / "root").iterdir()) == []
    with ck.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with ck.atomic_dir(final) as tmp:  # a reused version number replaces the folder whole
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]


def test_policy_store_keeps_the_newest_versions(tmp_path: Path) -> None:
    store = ck.PolicyStore(tmp_path, "run", keep=2)
    for v in (1, 2, 3, 4):
        assert store.write(v, lambda d: (d / "w").write_text("x")) == f"run/v{v:06d}"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["v000003", "v000004"]


def test_metrics_resume_drops_later_records_and_plots(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write("eval", 0, {"teacher_kl": 0.9})
    for step in range(1, 6):
        w.write("train", step, {"teacher_kl": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "st')  # a line cut off by a kill
    again = MetricsWriter(tmp_path, resume_step=3, tensorboard=False)
    assert [(r["kind"], r["step"]) for r in read_records(tmp_path / "metrics.jsonl")] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3)]
    again.write("train", 4, {"teacher_kl": 0.2})
    assert again.latest("train")["step"] == 4 and again.latest("eval")["step"] == 0
    png = plot_teacher_kl(again.records, tmp_path / "kl.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_teacher_kl([], tmp_path / "none.png") is None


def test_the_plot_has_a_held_out_line_per_teacher_where_there_are_several(tmp_path: Path) -> None:
    records = [{"kind": "eval", "step": 0, "teacher_kl": 0.8, "teacher_kl/math": 1.0, "teacher_kl/chat": 0.6},
               {"kind": "train", "step": 1, "teacher_kl": 0.7},
               {"kind": "eval", "step": 1, "teacher_kl": 0.5, "teacher_kl/math": 0.4, "teacher_kl/chat": None}]
    assert kl_series(records) == {"training samples": [(1, 0.7)], "held-out prompts": [(0, 0.8), (1, 0.5)],
                                  "held-out, teacher chat": [(0, 0.6)], "held-out, teacher math": [(0, 1.0), (1, 0.4)]}
    assert list(kl_series(records[1:2])) == ["training samples"], "one teacher: the lines of before"
    assert kl_series(records, KL_PER_COMPLETION) == {}, "records without the KL per completion: no line of it"
    both = [{**r, KL_PER_COMPLETION: 4 * r["teacher_kl"], f"{KL_PER_COMPLETION}/math": 2.0} for r in records]
    assert kl_series(both, KL_PER_COMPLETION) == {"training samples": [(1, 2.8)], "held-out prompts": [(0, 3.2), (1, 2.0)],
                                                  "held-out, teacher math": [(0, 2.0), (1, 2.0)]}
    assert kl_series(both) == kl_series(records), "the per-token lines do not change"
    assert plot_teacher_kl(records, tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"


def sample(group: int, sampling: list[float], teacher: list[float], text: str = "") -> Sample:
    return Sample(group, [1, 2], list(range(len(sampling))), sampling, text, "stop", {"id": group}, teacher)


def test_rewards_are_group_centered_and_added_to_every_token() -> None:
    samples = [sample(0, [-1.0, -1.0], [-1.0, -2.0], "aaaa"), sample(0, [-1.0], [-1.0], "aa"),
               sample(1, [-0.5], [-0.5], "a"), sample(1, [-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5], "aaa")]
    raw, centered = task_rewards(samples, lambda row, text: len(text))
    assert raw == [4.0, 2.0, 1.0, 3.0] and centered == [1.0, -1.0, -1.0, 1.0]
    config = build_config({"student": {"model": "m"}, "teacher_urls": ["u"], "student_url": "s", "dataset": {"path": "p"},
                           "kl_coef": 2.0}, environ={})
    adv = advantages(samples, config, centered)
    assert [a.tolist() for a in adv] == [[1.0, -1.0], [-1.0], [-1.0], [1.0, 1.0, 1.0]]
    assert torch.equal(advantages(samples, config, None)[0], torch.tensor([0.0, -2.0]))


def info(limits: dict[str, int], max_model_len: int = 2048) -> p.ServiceInfo:
    return p.ServiceInfo(service="teacher", model="m", engine="vllm", vocab_size=512, tokenizer_fingerprint="f",
                         max_model_len=max_model_len, limits=limits)


def test_scoring_requests_fit_the_teachers_limits() -> None:
    limits = ScoreLimits.of([info({"max_sequences": 4, "max_request_tokens": 1000, "max_sequence_len": 2047}),
                             info({"max_sequences": 9, "max_request_tokens": 300}, max_model_len=1024)])
    assert limits == ScoreLimits(max_sequences=4, max_request_tokens=300, max_sequence_len=1024)
    assert ScoreLimits.of([info({})]) == ScoreLimits(128, 262_144, 2048), "a teacher that states no limits"
    lengths = [100, 150, 60, 300, 20, 20, 20, 20, 20]
    groups = chunks(lengths, limits)
    assert sum(groups, []) == list(range(len(lengths))), "every sequence once, in order"
    assert groups == [[0, 1], [2], [3], [4, 5, 6, 7], [8]]
    assert all(len(g) <= 4 and sum(lengths[i] for i in g) <= 300 for g in groups)


def test_a_sample_longer_than_the_teacher_scores_loses_its_last_tokens() -> None:
    s = Sample(0, [1] * 10, [5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0], "t", "stop", {})
    fit(s, 14)
    assert (s.token_ids, s.trimmed) == ([5, 6, 7, 8], 0)
    fit(s, 12)
    assert (s.token_ids, s.sampling_logprobs, s.finish_reason, s.trimmed) == ([5, 6], [-1.0, -2.0], "length", 2)
    with pytest.raises(InvalidInput, match="leaves no room"):
        fit(s, 10)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write("train", 1, {"loss": float("nan"), "grad_norm": float("inf"), "tokens": 5, "teacher_kl": 0.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert read_records(tmp_path / "metrics.jsonl") == [
        {"kind": "train", "step": 1, "loss": None, "grad_norm": None, "tokens": 5, "teacher_kl": 0.5}]


def test_replacing_a_folder_never_leaves_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version folder written again (a number reused after the student restarted): a crash at any
    point of the replacement leaves the old folder or the new one in place. Here the process dies
    at the second rename, if there is one."""

    class Killed(BaseException):
        pass

    final = tmp_path / "run" / "v000003"
    with ck.atomic_dir(final) as tmp:
        (tmp / "old").write_text("1")
    real, renames = Path.rename, []

    def dies_at_second_rename(self: Path, target):
        renames.append(target)
        if len(renames) > 1:
            raise Killed
        return real(self, target)

    monkeypatch.setattr(Path, "rename", dies_at_second_rename)
    try:
        with ck.atomic_dir(final) as tmp:
            (tmp / "new").write_text("2")
    except Killed:
        pass
    assert final.is_dir() and sorted(p.name for p in final.iterdir()) in (["old"], ["new"])
    monkeypatch.undo()
    assert sorted(p.name for p in final.iterdir()) == ["new"], "no crash: the new folder"
    assert [p.name for p in final.parent.iterdir()] == ["v000003"], "nothing left beside it"


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """student.device may change on resume: RNG and schedule states saved from CUDA (here: tagged so by
    torch.save) load on the CPU; weights and optimizer moments load into the parameters' own tensors."""
    import torch.serialization as ts

    class Trained:
        def __init__(self) -> None:
            torch.manual_seed(0)
            self.model = torch.nn.Linear(4, 3)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
            self.model(torch.randn(2, 4)).sum().backward()
            self.optimizer.step()
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda n: 1.0)

        def save_state(self, folder: Path) -> None:
            ck.save_training_state(folder, self.model, self.optimizer, self.scheduler)

        def load_state(self, folder: Path) -> None:
            ck.load_training_state(folder, self.model, self.optimizer, self.scheduler)

    policy = Trained()
    state = ck.TrainerState(step=5, policy_version=7, sampler={"drawn": 3})
    as_cuda = [(0, lambda obj: "cuda:0", lambda obj, location: None)]
    with monkeypatch.context() as patch:
        patch.setattr(ts, "_package_registry", as_cuda + ts._package_registry)
        saved = ck.save_checkpoint(tmp_path, state, policy)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(saved / "rng-0.pt", weights_only=False)  # what loading did without map_location
    fresh = Trained()
    with torch.no_grad():
        fresh.model.weight.zero_()
    assert ck.load_checkpoint(saved, fresh) == state
    assert torch.equal(fresh.model.weight, policy.model.weight)
    assert torch.equal(ck.read_trainable(saved)["weight"], policy.model.weight)
    moments = fresh.optimizer.state_dict()["state"][0]["exp_avg"]
    assert moments.device.type == "cpu" and torch.equal(moments, policy.optimizer.state_dict()["state"][0]["exp_avg"])
