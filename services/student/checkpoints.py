"""Checks a policy checkpoint before any engine touches it.

`POST /weights` names a folder relative to the checkpoint root. Everything
that can be wrong with it is found here, from file headers only, so that a bad
checkpoint is a 4xx and the serving version is never disturbed. This matters
most for vLLM: a failed in-place reload or adapter load kills its engine.

Choices:
1) Paths: absolute paths and `..` are refused outright; what is left is
   resolved (symlinks followed) and must still lie inside the root, and so
   must every file that is read.
2) A full checkpoint is a `save_pretrained` folder: `config.json` with the
   base model's architecture, safetensors files holding exactly the base
   model's tensor names and shapes (dtype may differ; a tied `lm_head` may be
   absent).
3) A LoRA checkpoint is a peft folder: `adapter_config.json` (LORA, no DoRA,
   no modules_to_save) and `adapter_model.safetensors` whose lora_A/lora_B
   pairs fit linear layers of the base model, rank at most `max_lora_rank`.
   An engine that merges adapters with one rank and alpha for all layers
   (vLLM's, merging) also refuses rank_pattern, alpha_pattern and
   fan_in_fan_out: it would serve another model than the adapter's.
   Embeddings and the output head (any weight with a vocabulary-sized
   dimension) are not adapter targets: vLLM serves adapters on the decoder's
   linear layers.
4) Safetensors headers are parsed, not tensors: checking a checkpoint costs
   milliseconds whatever its size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from opd.common.errors import InvalidInput, InvalidRequest, NotFound

Shapes = dict[str, tuple[int, ...]]
LORA_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class BaseModel:
    """What a checkpoint must agree with: the architecture and tensor shapes of the served model."""

    architectures: tuple[str, ...]
    vocab_size: int
    tied_embeddings: bool
    shapes: Shapes

    @classmethod
    def from_folder(cls, model: str) -> BaseModel:
        folder = local_model_folder(model)
        config = read_json(folder / "config.json")
        return cls(
            architectures=tuple(config.get("architectures") or ()),
            vocab_size=int(config.get("vocab_size", 0)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            shapes=safetensors_shapes(folder, folder),
        )


def local_model_folder(model: str) -> Path:
    """The served model's folder: a local path, or a hub id already in the local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{path.name} is missing in {path.parent.name}/") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path.parent.name}/{path.name} is not valid JSON: {exc}") from None


def resolve(root: Path, relative: str) -> Path:
    """The checkpoint folder `relative` names under `root`, refusing any way out of the root."""
    if "\x00" in relative:
        raise InvalidRequest("the path holds a NUL character: give a plain relative path")
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or Path(relative).is_absolute():
        raise InvalidRequest(f"path {relative!r} is absolute: give a path relative to the checkpoint root")
    if ".." in parts:
        raise InvalidRequest(f"path {relative!r} contains '..': give a path inside the checkpoint root")
    base = root.resolve()
    if not base.is_dir():
        raise NotFound(f"the checkpoint root {root} does not exist: start the student with --checkpoint-root DIR")
    target = root / relative
    if not target.exists():
        raise NotFound(f"no checkpoint at {relative!r} under the checkpoint root")
    inside(base, target, relative)
    if not target.resolve().is_dir():
        raise InvalidInput(f"{relative!r} is a file: give the checkpoint's folder")
    return target.resolve()


def inside(root: Path, path: Path, shown: str) -> None:
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidRequest(f"{shown!r} leads out of the checkpoint root (a symlink?): checkpoints must lie inside it")


def safetensors_shapes(folder: Path, root: Path) -> Shapes:
    """Tensor name -> shape over the folder's safetensors files (the index's files when there is one)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"no .safetensors weights in {folder.name}/: save with save_pretrained(safe_serialization=True)")
    shapes: Shapes = {}
    for file in files:
        if not file.exists():
            raise InvalidInput(f"{folder.name}/{file.name} is listed in the index but missing")
        inside(root, file, f"{folder.name}/{file.name}")
        shapes.update(safetensors_shapes_of(file))
    return shapes


def safetensors_shapes_of(file: Path) -> Shapes:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a corrupt or truncated file
        raise InvalidInput(f"{file.parent.name}/{file.name} is not a readable safetensors file: {exc}") from None


def check_full(folder: Path, root: Path, base: BaseModel) -> None:
    """A full checkpoint must be the base architecture with exactly its tensors and shapes."""
    config_path = folder / "config.json"
    if config_path.exists():
        inside(root, config_path, f"{folder.name}/config.json")
    config = read_json(config_path)
    arch = tuple(config.get("architectures") or ())
    if arch != base.architectures:
        raise InvalidInput(
            f"checkpoint {folder.name}/ is a {', '.join(arch) or 'model of unknown architecture'}; "
            f"the student serves {', '.join(base.architectures)}: save a checkpoint of the same model"
        )
    got = safetensors_shapes(folder, root)
    optional = {"lm_head.weight"} if base.tied_embeddings else set()
    missing = sorted(set(base.shapes) - set(got) - optional)
    unexpected = sorted(set(got) - set(base.shapes) - optional)
    shared = set(got) & set(base.shapes)
    wrong = sorted(f"{k} {list(got[k])} (expected {list(base.shapes[k])})" for k in shared if got[k] != base.shapes[k])
    problems = [
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("wrong shapes", wrong), ("missing tensors", missing), ("unknown tensors", unexpected))
        if items
    ]
    if problems:
        raise InvalidInput(f"checkpoint {folder.name}/ does not fit the student model; " + "; ".join(problems))


def check_lora(folder: Path, root: Path, base: BaseModel, max_rank: int, *, patterns: bool = True) -> None:
    """A LoRA checkpoint must be a plain peft LoRA on linear layers of the base model.

    `patterns`: whether the engine serves per-layer ranks and alphas (rank_pattern, alpha_pattern) exactly.
    """
    config_path = folder / "adapter_config.json"
    if config_path.exists():
        inside(root, config_path, f"{folder.name}/adapter_config.json")
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise InvalidInput(f"{folder.name}/ holds a {config.get('peft_type')} adapter; only LORA adapters load")
    if config.get("use_dora"):
        raise InvalidInput(f"{folder.name}/ is a DoRA adapter (use_dora), which the student does not serve: save a plain LoRA")
    if config.get("modules_to_save"):
        raise InvalidInput(
            f"{folder.name}/ trains whole modules besides the adapter (modules_to_save: {config['modules_to_save']}), "
            "which the student does not serve: save a plain LoRA"
        )
    if not patterns:
        check_mergeable(folder.name, config)
    ranks = [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise InvalidInput(
            f"{folder.name}/ has LoRA rank {max(ranks)}; the student serves ranks up to {max_rank} (--max-lora-rank)"
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise InvalidInput(f"adapter_model.safetensors is missing in {folder.name}/: save the adapter with save_pretrained")
    inside(root, weights, f"{folder.name}/adapter_model.safetensors")
    ranks_of: dict[str, set[int]] = {}
    # A/B weights first: an adapter on the output head also carries a copy of it, and the A/B error says more.
    for name, shape in sorted(safetensors_shapes_of(weights).items(), key=lambda kv: (not kv[0].endswith(LORA_SUFFIXES), kv[0])):
        module, rank = check_lora_tensor(folder.name, name, shape, base, max_rank)
        ranks_of.setdefault(module, set()).add(rank)
    if not ranks_of:
        raise InvalidInput(f"{folder.name}/adapter_model.safetensors holds no LoRA weights")
    unpaired = sorted(m for m, r in ranks_of.items() if len(r) != 1)
    if unpaired:
        raise InvalidInput(f"{folder.name}/ has lora_A and lora_B of different ranks for {', '.join(unpaired[:3])}")


def check_mergeable(name: str, config: dict) -> None:
    """What a merge with one scale for every layer (W + alpha / r * B @ A) cannot apply exactly."""
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise InvalidInput(
                f"{name}/ sets {key} (a rank or alpha per layer); this student merges adapters into its weights with "
                "one rank and alpha for every layer: save the adapter without it, or serve with --lora-mode adapter"
            )
    if config.get("fan_in_fan_out"):
        raise InvalidInput(f"{name}/ sets fan_in_fan_out (transposed weights), which the merge does not apply: save "
                           "an adapter of the student's linear layers, or serve with --lora-mode adapter")


def check_lora_tensor(folder: str, name: str, shape: tuple[int, ...], base: BaseModel, max_rank: int) -> tuple[str, int]:
    """The adapted module and the rank of one lora_A / lora_B weight, if it fits the base model."""
    suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
    if suffix is None or not name.startswith(LORA_PREFIX):
        raise InvalidInput(f"{folder}/ holds {name}, which is not a LoRA A/B weight: save a plain peft LoRA adapter")
    module = name[len(LORA_PREFIX) : -len(suffix)]
    target = base.shapes.get(module + ".weight")
    if target is None or len(target) != 2:
        raise InvalidInput(f"{folder}/ adapts {module}, which is not a linear layer of the student model")
    if target[0] == base.vocab_size:  # [vocab, hidden]: the embeddings or the output head
        raise InvalidInput(f"{folder}/ adapts {module} (embeddings or output head); adapt the decoder's linear layers only")
    out_dim, in_dim = target
    is_a = suffix == ".lora_A.weight"
    fits = len(shape) == 2 and (shape[1] == in_dim if is_a else shape[0] == out_dim)
    if not fits:
        want = f"[r, {in_dim}]" if is_a else f"[{out_dim}, r]"
        raise InvalidInput(f"{folder}/ {name} has shape {list(shape)}; the student's {module} needs {want}")
    rank = shape[0] if is_a else shape[1]
    if rank > max_rank:
        raise InvalidInput(f"{folder}/ {name} has rank {rank}; the student serves ranks up to {max_rank} (--max-lora-rank)")
    return module, rank
