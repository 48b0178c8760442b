"""Prompts for a run: loading, the held-out split, and a resumable sampler.

Choices:
1) A row carries `prompt` (text) or `messages` (chat); every other field
   (an `answer`, say) is kept and handed to the reward function and verifier.
2) Sources: a JSONL file, a Parquet file (needs pyarrow), or a folder, read
   as a `datasets` save_to_disk folder when it looks like one (needs
   `datasets`), else as `<split>.jsonl` files.
3) Without an eval path or split, the last `eval_size` rows of a seeded
   shuffle are held out, so train and eval never share a prompt.
4) The sampler walks seeded per-epoch permutations; its whole state is the
   number of prompts drawn, so a resumed run draws exactly what the
   uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd.common import protocol as p
from opd.common.errors import InvalidInput
from opd.trainer.config import DEFAULT_TEACHER, DatasetConfig


class DatasetError(InvalidInput):
    """The prompt dataset cannot be read or has unusable rows; the message says which and why."""


@dataclass(frozen=True)
class PromptRow:
    prompt: p.Prompt
    row: dict[str, Any] = field(hash=False, compare=False)
    teacher: p.Prompt | None = field(default=None, compare=False)  # the teacher's own prompt (context.py)
    teacher_name: str = field(default=DEFAULT_TEACHER, compare=False)  # which of the run's teachers scores it


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n} is not valid JSON: {exc.msg}") from exc
    return rows


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError(f"reading {path} needs pyarrow: `pip install pyarrow`, or convert it to JSONL") from exc
    return pq.read_table(path).to_pylist()


def read_folder(path: Path, split: str) -> list[dict]:
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        try:
            import datasets
        except ImportError as exc:
            raise DatasetError(f"{path} is a datasets folder; reading it needs `pip install datasets`") from exc
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetError(f"{path} has no split {split!r}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        return [dict(r) for r in loaded]
    for candidate in (path / f"{split}.jsonl", path / f"{split}.parquet"):
        if candidate.is_file():
            return read_rows(candidate)
    raise DatasetError(f"{path} holds neither a datasets folder nor {split}.jsonl / {split}.parquet")


def read_rows(path: str | Path, split: str = "train") -> list[dict]:
    source = Path(path)
    if source.is_dir():
        return read_folder(source, split)
    if not source.is_file():
        raise DatasetError(f"no dataset at {source}: give a JSONL or Parquet file or a folder")
    if source.suffix == ".parquet":
        return read_parquet(source)
    return read_jsonl(source)


def to_prompt(row: dict, fmt: str, where: str) -> p.Prompt:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object with 'prompt' or 'messages'")
    if row.get("messages"):
        return p.Prompt(messages=[p.ChatMessage(role=m["role"], content=m["content"]) for m in row["messages"]])
    text = row.get("prompt")
    if not isinstance(text, str) or not text:
        raise DatasetError(f"{where}: the row has neither a non-empty 'prompt' text nor 'messages'")
    if fmt == "chat":
        return p.Prompt(messages=[p.ChatMessage(role="user", content=text)])
    return p.Prompt(text=text)


def to_prompts(rows: list[dict], fmt: str, name: str) -> list[PromptRow]:
    return [PromptRow(to_prompt(r, fmt, f"{name} row {i}"), r) for i, r in enumerate(rows)]


def load_prompts(config: DatasetConfig, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, eval) prompts as the config asks."""
    rows = read_rows(config.path, config.split)
    if config.eval_path or config.eval_split:
        eval_rows = read_rows(config.eval_path or config.path, config.eval_split or config.split)[: config.eval_size]
        train_rows = rows
    else:
        if len(rows) <= config.eval_size:
            raise DatasetError(
                f"{config.path} has {len(rows)} rows: too few to hold out dataset.eval_size={config.eval_size} "
                "for evaluation; lower eval_size or give dataset.eval_path"
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        cut = len(rows) - config.eval_size
        train_rows = [rows[i] for i in sorted(order[:cut])]
        eval_rows = [rows[i] for i in sorted(order[cut:])]
    if not train_rows or not eval_rows:
        raise DatasetError(f"{config.path}: no training or no evaluation prompts after the split")
    return to_prompts(train_rows, config.prompt_format, "train"), to_prompts(eval_rows, config.prompt_format, "eval")


class PromptSampler:
    """Draws prompts in seeded per-epoch permutations; `position` (prompts drawn) is its whole state."""

    def __init__(self, size: int, seed: int, position: int = 0) -> None:
        if size < 1:
            raise DatasetError("no training prompts to sample from")
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._order = -1, list(range(size))

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(self.size))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def next_indices(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.position, self.size)
            out.append(self._permutation(epoch)[index])
            self.position += 1
        return out

    def peek(self, n: int) -> list[int]:
        """The indices the next `next_indices(n)` will draw, without drawing them."""
        position = self.position
        try:
            return self.next_indices(n)
        finally:
            self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise DatasetError(
                f"the checkpoint drew from {state['size']} training prompts, the dataset now has {self.size}: "
                "resume with the same dataset, or start a new run (resume=false or another output_dir)"
            )
        self.position = state["position"]
