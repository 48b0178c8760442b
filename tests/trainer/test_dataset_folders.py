"""Datasets saved with `datasets`' save_to_disk load like JSONL: splits and held-out prompts."""

from __future__ import annotations

from pathlib import Path

from opd.trainer.config import DatasetConfig
from opd.trainer.data import load_prompts, read_rows


def test_save_to_disk_folder_with_splits(tmp_path: Path) -> None:
    import datasets

    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"messages": m} for m in messages]),
        "test": datasets.Dataset.from_list([{"prompt": f"held {i}"} for i in range(3)]),
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds", "test") == [{"prompt": "held 0"}, {"prompt": "held 1"}, {"prompt": "held 2"}]
    train, held = load_prompts(DatasetConfig(path=str(tmp_path / "ds"), eval_split="test", eval_size=2), seed=0)
    assert sorted(x.prompt.messages[0].content for x in train) == [f"question {i}" for i in range(5)]
    assert [x.prompt.messages[0].content for x in held] == ["held 0", "held 1"]
