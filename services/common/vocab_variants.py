"""Teachers of another tokenizer made from one model, for tests of distillation across vocabularies.

    tok2, perm = permuted_tokenizer(tok, seed=1)     # same segmentation, other ids: tok2.encode(x) == perm[tok.encode(x)]
    model.load_state_dict(permute_weights(model.state_dict(), perm, tied=True))   # same function under the new ids
    tok3 = fewer_merges_tokenizer(tok, drop=20)     # same ids, every 20th BPE merge gone: longer sequences

Choices:
1) Both work on the `tokenizers` serialisation (tokenizer.json) of a fast
   tokenizer, saved and loaded back through transformers, so the chat
   template, the special tokens and the rest of its configuration are kept.
2) `perm[old_id] == new_id`. Added (special) tokens keep their ids: chat
   templates, BOS/EOS/PAD and the model's config then need no change; every
   other id moves. Embedding rows beyond the tokenizer (a padded embedding)
   stay where they are.
3) The permuted model computes the same function: its input row perm[x] is
   the old row x and its output row perm[v] the old row v, so
   p_new(perm[y] | perm[x]) == p_old(y | x) for every sequence.
4) Fewer merges: every `drop`-th merge by rank is removed (ranks drop-1,
   2*drop-1, ...). The tokens those merges made stay in the vocabulary with
   their ids (the model and its weights are unchanged), BPE just never builds
   them, nor the tokens built from them; `ignore_merges` is turned off so a
   whole word in the vocabulary is built from merges too. Every text still
   tokenizes (byte-level BPE falls back to bytes) and decodes to itself.
   The vocabulary is the same as the original's; tokenizer_fingerprint, which covers the merges, is not.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _rewritten(tokenizer: Any, change: Callable[[dict], None]) -> Any:
    """The tokenizer saved, its tokenizer.json changed in place by `change`, loaded back (choice 1)."""
    from transformers import AutoTokenizer

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: load one with a tokenizer.json")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        spec = json.loads(path.read_text())
        change(spec)
        path.write_text(json.dumps(spec, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(folder)


def _remap_processor(processor: dict | None, perm: list[int]) -> None:
    if not processor:
        return
    for inner in processor.get("processors") or ():
        _remap_processor(inner, perm)
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [perm[i] for i in special["ids"]]
    for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key] = [processor[key][0], perm[processor[key][1]]]


def permuted_tokenizer(tokenizer: Any, seed: int) -> tuple[Any, list[int]]:
    """The same tokenizer with its non-special ids shuffled (choice 2): (new tokenizer, perm with perm[old] == new)."""
    perm: list[int] = []

    def change(spec: dict) -> None:
        model = spec["model"]
        fixed = {t["id"] for t in spec.get("added_tokens") or ()}
        if isinstance(model["vocab"], dict):  # BPE, WordPiece, WordLevel: token -> id
            size = max([*model["vocab"].values(), *fixed], default=-1) + 1
        elif model["type"] == "Unigram":  # [[token, score], ...]: the id is the position
            size = max([len(model["vocab"]) - 1, *fixed]) + 1
        else:
            raise ValueError(f"a {model['type']} tokenizer model cannot be permuted: BPE, WordPiece, WordLevel, Unigram can")
        moving = [i for i in range(size) if i not in fixed]
        shuffled = list(moving)
        random.Random(seed).shuffle(shuffled)
        perm.extend(range(size))
        for old, new in zip(moving, shuffled, strict=True):
            perm[old] = new
        if isinstance(model["vocab"], dict):
            model["vocab"] = {token: perm[i] for token, i in model["vocab"].items()}
        else:
            entries = [None] * len(model["vocab"])
            for old, entry in enumerate(model["vocab"]):
                entries[perm[old]] = entry
            model["vocab"] = entries
            if model.get("unk_id") is not None:
                model["unk_id"] = perm[model["unk_id"]]
        _remap_processor(spec.get("post_processor"), perm)

    return _rewritten(tokenizer, change), perm


def permute_weights(state_dict: dict[str, Any], perm: list[int], tied: bool, *, embed: str = "model.embed_tokens.weight",
                    output: str = "lm_head.weight") -> dict[str, Any]:
    """A new state dict whose embedding and output rows (and output bias) are reordered by `perm` (choice 3); `tied`:
    the output layer is the embedding (SmolLM2), kept one tensor when the state dict holds both names."""
    import torch

    if embed not in state_dict:
        raise ValueError(f"no {embed!r} in the state dict: name the input embedding with embed=")
    if not tied and output not in state_dict:
        raise ValueError(f"no {output!r} in the state dict of an untied model: name the output layer with output=")
    index = torch.tensor(perm, dtype=torch.long)

    def moved(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] < len(perm):
            raise ValueError(f"{rows.shape[0]} rows cannot take a permutation of {len(perm)} ids")
        out = rows.clone()
        out[index] = rows[: len(perm)]
        return out

    out = dict(state_dict)
    out[embed] = moved(state_dict[embed])
    if output in state_dict:
        out[output] = out[embed] if tied else moved(state_dict[output])
    bias = output.removesuffix(".weight") + ".bias"
    if bias in state_dict:
        out[bias] = moved(state_dict[bias])
    return out


def fewer_merges_tokenizer(tokenizer: Any, drop: int) -> Any:
    """The same vocabulary and ids with every `drop`-th BPE merge removed (choice 4): texts tokenize longer."""
    if drop < 1:
        raise ValueError(f"drop={drop}: give the stride of the merges to remove, 1 (all) or more")

    def change(spec: dict) -> None:
        model = spec["model"]
        if model["type"] != "BPE":
            raise ValueError(f"a {model['type']} tokenizer has no merges to remove: a BPE tokenizer is needed")
        model["merges"] = [m for rank, m in enumerate(model["merges"]) if (rank + 1) % drop != 0]
        model["ignore_merges"] = False

    return _rewritten(tokenizer, change)


def permuted_model(source: Path, out: Path, seed: int = 1) -> Path:
    """A model folder whose tokenizer and embedding and output rows are `source`'s permuted (choices 2 and 3)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, perm = permuted_tokenizer(AutoTokenizer.from_pretrained(source), seed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model.load_state_dict(permute_weights(model.state_dict(), perm, tied))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def fewer_merges_model(source: Path, out: Path, drop: int = 20) -> Path:
    """A model folder with `source`'s weights and a tokenizer that lost every `drop`-th merge (choice 4)."""
    import shutil

    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    for file in [*Path(source).glob("*.json"), *Path(source).glob("*.safetensors")]:
        if not file.name.startswith("tokenizer"):
            shutil.copyfile(file, out / file.name)
    fewer_merges_tokenizer(AutoTokenizer.from_pretrained(source), drop).save_pretrained(out)
    return out
