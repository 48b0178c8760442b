"""LoRA versions merged into a vLLM engine's weights in place, inside its worker.

vLLM's CPU LoRA kernels sample about ten times slower than plain weights (and a
LoRA-enabled engine is slower even with no adapter), so on the CPU the student
runs vLLM without LoRA support and applies each adapter by merging it:

    W = W_serving + (alpha / r) * B @ A        (alpha / sqrt(r) with rsLoRA)

for every adapted linear layer, where W_serving is the weight of the full
version the adapter applies to (the base model, or the last full version).
The merged tensors, under their checkpoint names, go through the model's own
`load_weights` (vLLM's in-place reload), which maps them into its fused
layers; nothing else is touched. The serving full weights of the adapted
layers are read from disk once per full version and kept in float32.

`MergeLoRA` is a vLLM worker extension (engine argument
`worker_extension_cls`): its methods join the worker class and are called
through `collective_rpc` with plain arguments, so no tensor crosses processes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> (alpha / r) * B @ A, in float32, for every adapted linear layer of a peft folder."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("merging needs one rank and alpha for every layer (no rank_pattern or alpha_pattern)")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        target = name.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")
        deltas[target] = scale * (b.float() @ a.float())
    return deltas


def read_tensors(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors model folder, in float32."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in names & set(f.keys()):
                found[name] = f.get_tensor(name).float()
    missing = names - set(found)
    if missing:
        raise ValueError(f"{folder} lacks the adapted weights {sorted(missing)[:3]}")
    return found


class PartialReload(logging.Filter):
    """vLLM warns, listing every weight, that a reload left weights untouched: that is the point of a merge."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Following weights were not loaded")


def quiet_partial_reload() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.inplace")
    if not any(isinstance(f, PartialReload) for f in logger.filters):
        logger.addFilter(PartialReload())


class MergeLoRA:
    """Worker methods: `opd_merge_lora(adapter_dir, serving_dir)` loads serving weights + the adapter's deltas."""

    def opd_merge_lora(self, adapter_dir: str, serving_dir: str) -> int:
        deltas = lora_deltas(Path(adapter_dir))
        # Layers the previous adapter changed but this one does not go back to their serving weights.
        names = set(deltas) | getattr(self, "_opd_merged", set())
        cache = getattr(self, "_opd_serving", None)
        if cache is None or cache[0] != serving_dir or not names <= cache[1].keys():
            cache = (serving_dir, read_tensors(Path(serving_dir), names))
            self._opd_serving = cache
        serving = cache[1]
        merged = [(name, serving[name] + deltas[name] if name in deltas else serving[name]) for name in sorted(names)]
        quiet_partial_reload()
        self.reload_weights(weights_iterator=iter(merged))
        self._opd_merged = set(deltas)
        return len(deltas)

    def opd_forget_merged(self) -> None:
        """After a full reload: no adapter is merged any more."""
        self._opd_merged = set()
