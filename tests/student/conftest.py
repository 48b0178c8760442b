"""Student fixtures: a checkpoint root full of good and bad policy versions, an
in-process hf engine, and reference logprobs from a plain transformers forward.

The good versions change the tiny student a lot (the full one also sharpens
its output head), so "the outputs changed" is a real test; the bad ones each
break exactly one rule that /weights must enforce.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from opd.common.settings import StudentSettings
from opd.student.hf_engine import HFRolloutEngine
from tests.utils.tiny_models import build_llama

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_lora(
    base: Path, out: Path, *, seed: int, rank: int = 8, scale: float = 0.2, targets=LORA_TARGETS, **config
) -> Path:
    """A peft LoRA adapter on `base` with random, nonzero B weights (so it changes the outputs).

    `config`: more LoraConfig fields (lora_alpha, which defaults to 2 * rank, use_rslora, rank_pattern, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config.setdefault("lora_alpha", 2 * rank)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=rank, target_modules=list(targets), **config),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    with warnings.catch_warnings():  # an adapter on the output head (a bad one, on purpose) warns
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out)
    return out


def save_full(base: Path, out: Path, *, seed: int, noise: float = 0.03, head_gain: float = 3.0) -> Path:
    """A perturbed copy of `base`; a larger output head makes its distributions peaked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * noise)
        model.lm_head.weight.mul_(head_gain)
    model.save_pretrained(out, safe_serialization=True)
    return out


def save_eos_heavy(base: Path, out: Path, eos_id: int, gain: float = 0.5) -> Path:
    """The student with one residual dimension held at 10 and read by the EOS row of the output head:
    completions end with EOS after a few tokens (p(EOS) about 0.4 per step)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[eos_id, 0] = gain
    model.save_pretrained(out, safe_serialization=True)
    return out


def save_other_architecture(base: Path, out: Path) -> Path:
    """A Mistral with the student's exact tensor names and shapes: only the architecture differs."""
    from transformers import AutoConfig, MistralConfig, MistralForCausalLM

    config = AutoConfig.from_pretrained(base).to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        config.pop(key, None)
    MistralForCausalLM(MistralConfig(**config)).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory, student_model: Path, tiny_tokenizer: Path) -> Path:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    outside = tmp_path_factory.mktemp("outside")
    save_lora(student_model, root / "lora-a", seed=1)
    save_lora(student_model, root / "lora-b", seed=2)
    save_full(student_model, root / "full-a", seed=3)
    save_eos_heavy(student_model, root / "eos", eos_id=AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id)
    # The bad ones.
    wide = build_llama(outside / "wide", tiny_tokenizer, seed=4, hidden=64)
    save_full(wide, root / "wide", seed=5)
    save_lora(wide, root / "lora-wide", seed=6)
    save_lora(student_model, root / "lora-rank32", seed=7, rank=32)
    save_lora(student_model, root / "lora-head", seed=8, targets=["q_proj", "lm_head"])
    save_other_architecture(student_model, root / "mistral")
    (root / "empty").mkdir()
    save_full(student_model, root / "truncated", seed=9)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    save_full(student_model, outside / "full-outside", seed=10)
    os.symlink(outside / "full-outside", root / "escape")
    (root / "sneaky").mkdir()
    (root / "sneaky" / "config.json").write_bytes((root / "full-a" / "config.json").read_bytes())
    os.symlink(outside / "full-outside" / "model.safetensors", root / "sneaky" / "model.safetensors")
    os.symlink(root / "full-a", root / "latest")  # a symlink that stays inside the root is fine
    return root


@pytest.fixture(scope="session")
def student_settings(student_model: Path, checkpoint_root: Path) -> StudentSettings:
    return StudentSettings(
        model=str(student_model), engine="hf", dtype="float32", device="cpu",
        checkpoint_root=str(checkpoint_root), max_lora_rank=16,
    )


@pytest.fixture(scope="session")
def hf_engine(student_settings: StudentSettings) -> HFRolloutEngine:
    return HFRolloutEngine(student_settings)


class Reference:
    """Per-token logprobs from a plain transformers forward, for the base model and each version."""

    def __init__(self, student_model: Path, checkpoint_root: Path) -> None:
        self.student_model, self.root = student_model, checkpoint_root
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, version: str = "base") -> torch.nn.Module:
        """'base', a full checkpoint's folder name, or 'full-a+lora-a' style combinations."""
        if version not in self._models:
            from peft import PeftModel

            from opd.common.hf import load_causal_lm

            full, _, lora = version.partition("+")
            if full.startswith("lora"):
                full, lora = "base", full
            model = load_causal_lm(str(self.student_model if full == "base" else self.root / full), "float32", "cpu")
            if lora:
                model = PeftModel.from_pretrained(model, str(self.root / lora))
            self._models[version] = model.eval()
        return self._models[version]

    def logprobs(self, version: str, prompt: Sequence[int], tokens: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
        from opd.common.hf import token_logprobs

        with torch.no_grad():
            seq = list(prompt) + list(tokens)
            return token_logprobs(self.model(version), [seq], [len(prompt)], temperature=temperature)[0][0]

    def greedy(self, version: str, prompt: Sequence[int], steps: int, eos: int) -> list[int]:
        """The argmax continuation of `prompt`, one full forward per token, up to EOS (kept)."""
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(steps):
                seq.append(int(self.model(version)(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == eos:
                    break
        return seq[len(prompt) :]

    def max_error(self, version: str, rollouts, temperature: float = 1.0) -> float:
        """Largest |reported - reference| logprob over rollouts (protocol Rollouts or dicts)."""
        worst = 0.0
        for r in rollouts:
            r = r if isinstance(r, dict) else r.model_dump()
            ref = self.logprobs(version, r["prompt_token_ids"], r["token_ids"], temperature)
            worst = max(worst, (torch.tensor(r["logprobs"]) - ref).abs().max().item())
        return worst


@pytest.fixture(scope="session")
def reference(student_model: Path, checkpoint_root: Path) -> Reference:
    return Reference(student_model, checkpoint_root)


@pytest.fixture(scope="session")
def prompts(hf_engine: HFRolloutEngine) -> list[list[int]]:
    tok = hf_engine.tokenizer
    texts = ["The boy went home", "Where is the water?", "Write a long sentence about the old man"]
    return [tok.encode(t) for t in texts]
