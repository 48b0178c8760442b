"""LoRA versions merged into a vLLM engine's weights in place, inside its worker.

vLLM's CPU LoRA kernels sample about ten times slower than plain weights (and a
LoRA-enabled engine is slower even with no adapter), so on the CPU the student
runs vLLM without LoRA support and applies each adapter by merging it:

    W = W_serving + (alpha / r) * B @ A        (alpha / sqrt(r) with rsLoRA)

for every adapted linear layer, where W_serving is the weight of the full
version the adapter applies to (the base model, or the last full version).
The merged tensors, under their checkpoint names, go through the model's own
`load_weights` (vLLM's in-place reload), which maps them into its fused
layers. The serving full weights of the reloaded layers are read from disk
once per full version and kept in float32.

Choices:
1) A fused layer is reloaded whole. vLLM's in-place reload rebuilds each
   layer it is given weights for from scratch and copies it back over the
   serving one, so a layer given only some of its parts (q_proj of the fused
   qkv_proj, gate_proj of gate_up_proj, a weight without its bias) serves
   uninitialised memory in the rest. Every checkpoint tensor of every fused
   group an adapter touches (the model's `packed_modules_mapping`, biases
   included) is sent: the adapted ones merged, the others as they serve.
2) Layers the previous adapter changed but this one does not go back to
   their serving weights, in the same reload.
3) Merging needs one rank and alpha for all layers: adapters with a
   `rank_pattern` or `alpha_pattern` are refused before they get here
   (checkpoints.check_lora with `patterns=False`).

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


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a safetensors model folder (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def whole_layers(adapted: set[str], packed: dict[str, list[str]], checkpoint: set[str]) -> set[str]:
    """The checkpoint tensors of every vLLM layer that holds an adapted weight (choice 1).

    `adapted` are checkpoint names (`model.layers.0.self_attn.q_proj.weight`); `packed` maps a fused vLLM
    layer to the checkpoint modules it holds (`{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}`).
    """
    modules = set()
    for name in adapted:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        group = next((parts for parts in packed.values() if leaf in parts), [leaf])
        modules.update(f"{parent}.{part}" if parent else part for part in group)
    return {n for n in checkpoint if n.rpartition(".")[0] in modules} | adapted


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
    """vLLM warns, for every weight and layer, that a reload left it untouched: that is the point of a merge."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Following weights were not loaded") or message.endswith("Failed to load weights"))


def quiet_partial_reload() -> None:
    for module in ("inplace", "layerwise"):
        logger = logging.getLogger(f"vllm.model_executor.model_loader.reload.{module}")
        if not any(isinstance(f, PartialReload) for f in logger.filters):
            logger.addFilter(PartialReload())


class MergeLoRA:
    """Worker methods: `opd_merge_lora(adapter_dir, serving_dir)` loads serving weights + the adapter's deltas."""

    def opd_merge_lora(self, adapter_dir: str, serving_dir: str) -> int:
        deltas = lora_deltas(Path(adapter_dir))
        checkpoint = self._opd_checkpoint_names(serving_dir)
        packed = getattr(self.model_runner.get_model(), "packed_modules_mapping", None) or {}
        # Whole fused layers (choice 1); the last adapter's layers go back to their serving weights (choice 2).
        names = whole_layers(set(deltas), packed, checkpoint) | getattr(self, "_opd_merged", set())
        cache = getattr(self, "_opd_serving", None)
        if cache is None or cache[0] != serving_dir or not names <= cache[1].keys():
            cache = (serving_dir, read_tensors(Path(serving_dir), names))
            self._opd_serving = cache
        serving = cache[1]
        merged = [(name, serving[name] + deltas[name] if name in deltas else serving[name]) for name in sorted(names)]
        quiet_partial_reload()
        self.reload_weights(weights_iterator=iter(merged))
        self._opd_merged = names
        return len(deltas)

    def _opd_checkpoint_names(self, serving_dir: str) -> set[str]:
        known = getattr(self, "_opd_names", None)
        if known is None or known[0] != serving_dir:
            known = self._opd_names = (serving_dir, tensor_names(Path(serving_dir)))
        return known[1]

    def opd_forget_merged(self) -> None:
        """After a full reload: no adapter is merged any more."""
        self._opd_merged = set()
