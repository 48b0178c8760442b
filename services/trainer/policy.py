"""The trainable student: the model the student service serves, in transformers.

Choices:
1) LoRA via peft on the configured linear layers (what vLLM hot-loads), or
   full fine-tuning of every parameter.
2) Per-token logprobs come from `opd.common.hf.token_logprobs`, the same
   function the hf engines score with, with gradients on, at the sampling
   temperature and top-p: the distribution the student sampled from, so the
   importance ratio is 1 on-policy (with top_p < 1, the nucleus
   distribution; scored at top-p 1 the ratio would be the nucleus mass).
3) AdamW over the trainable parameters; the learning rate warms up linearly
   over `warmup_steps` optimizer steps, then stays constant or decays
   (`optimizer.decay`, `lr_factor`).
4) A policy version is what the student loads: a peft adapter folder, or a
   whole-model `save_pretrained` folder (with the tokenizer) for full fine-tuning.
5) The student applies an adapter to whatever full weights it serves, so a
   LoRA run first publishes the untouched base model (`save_base`: its files
   hard-linked, no copy) as a full version.
6) Under torchrun (`group`, distributed.py) the model is sharded with FSDP2
   on this rank's device, its weights read once: rank 0 loads them, the other
   ranks build the model on the meta device and get their shards from rank
   0's broadcast (`load_from_rank0`); in bf16 with float32 trainable weights (sharded
   full fine-tuning loads float32; peft keeps adapters float32), gathered
   as bf16 for the forward and backward passes, gradients reduced in float32
   (`MixedPrecisionPolicy`, as torchtitan and prime-rl shard); `save_version` gathers the whole model (or the
   adapter) to rank 0, which alone writes it; `save_state` and `load_state`
   go through torch.distributed.checkpoint on one process as on N, so a run
   saved on N processes resumes on M.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opd.trainer import distributed, failpoints
from opd.trainer.config import RunConfig

if TYPE_CHECKING:
    from opd.trainer.distributed import Group
    from opd.trainer.rollouts import Sample


def lr_factor(n: int, warmup: int, total: int, decay: str) -> float:
    """The learning rate of optimizer step n + 1 (n from 0) over lr: a linear rise over `warmup` steps, then 1
    (constant) or a fall along a line or a half cosine that reaches 0 one step after the last of `total`."""
    if n < warmup:
        return (n + 1) / warmup
    if decay == "constant":
        return 1.0
    done = min(1.0, (n - warmup) / max(1, total - warmup))
    return 1.0 - done if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


class Policy:
    def __init__(self, config: RunConfig, group: Group | None = None) -> None:
        from opd.common.hf import load_causal_lm
        from opd.common.tokenizer import load_tokenizer

        student = config.student
        self.config = config
        self.group = group
        self.finetune = student.finetune
        rank = group.rank if group else 0

        def prepare(model: torch.nn.Module) -> torch.nn.Module:
            model = self._wrap(model) if student.finetune == "lora" else model
            failpoints.arm_forward(model, rank)
            return model

        # Under torchrun every rank's local part (files read, the model built) ends in an exchange of outcomes
        # before any collective, so a path unreadable on one node fails the run on every rank alike.
        with group.together("open") if group else nullcontext():
            self.tokenizer = load_tokenizer(student.model)
            failpoints.on_open(rank)
            torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
            if group is None:
                self.model = prepare(load_causal_lm(student.model, student.dtype, student.device))
            else:  # sharded full fine-tuning in bf16 keeps float32 weights, computes in bf16 (choice 6): load float32
                dtype = "float32" if student.finetune == "full" else student.dtype
                local, whole = distributed.build_local(student.model, dtype, group, prepare)
        if group is not None:
            self.model = distributed.shard_from_rank0(local, whole, group, student.dtype)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._threads_before: int | None = None
        if student.torch_threads:  # process-wide: close() gives the service its own count back
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(student.torch_threads)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: lr_factor(n, opt.warmup_steps, config.steps * config.substeps, opt.decay))

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        lora = self.config.student.lora
        peft_config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_config)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def logprobs(
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int], temperature: float = 1.0, top_p: float = 1.0
    ) -> list[torch.Tensor]:
        """log p_theta of each token from its start on, differentiable."""
        from opd.common.hf import token_logprobs

        out = token_logprobs(self.model, seqs, starts, temperature=temperature, top_p=top_p, pad_id=self.pad_id)
        return [scores.logprobs for scores in out]

    def optimizer_step(self, finite_loss: bool = True) -> float:
        """Clips, steps, schedules, zeroes; returns the gradient norm before clipping. With a non-finite
        loss or gradient norm it only zeroes: weights, optimizer state and schedule stay as they were."""
        clip = self.config.optimizer.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: a DTensor
        if finite_loss and math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_base(self, folder: Path) -> None:
        """The untrained base model as a full version: its config and safetensors files, linked or copied."""
        import os
        import shutil

        source = model_folder(self.config.student.model)
        for file in [source / "config.json", *sorted(source.glob("*.safetensors")), *sorted(source.glob("*.safetensors.index.json"))]:
            try:
                os.link(file, folder / file.name)  # the files never change: a hard link costs nothing
            except OSError:
                shutil.copyfile(file, folder / file.name)

    def save_version(self, folder: Path) -> None:
        """What the student service loads: an adapter folder, or a whole model with its tokenizer."""
        if self.group is None:
            self.model.save_pretrained(folder, safe_serialization=True)
        else:  # every rank gives its shards; rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.finetune == "lora")
            whole = get_model_state_dict(self.model, options=options)
            if not self.group.leader:
                return
            if self.finetune == "full" and self.config.student.dtype == "bfloat16":  # float32 while it trains
                whole = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in whole.items()}
            if self.finetune == "full" and getattr(self.model.config, "tie_word_embeddings", False):
                # gathered, a tied output layer is a copy of the embedding: written once, as on one process
                tied = getattr(self.model, "_tied_weights_keys", None) or {}
                whole = {k: v for k, v in whole.items() if k not in tied}
            self.model.save_pretrained(folder, state_dict=whole, safe_serialization=True)
        if self.finetune == "full":
            self.tokenizer.save_pretrained(folder)

    def train(self, samples: list[Sample], rewards: list[float] | None = None) -> dict[str, Any]:
        """One step's update (update.py); under torchrun every rank calls it with the whole step's samples."""
        from opd.trainer.update import train_on

        return train_on(self, samples, self.config, rewards)

    def save_state(self, folder: Path) -> None:
        """The trainer state of the weights into a checkpoint folder: trainable weights, optimizer, schedule, RNG."""
        from opd.trainer.checkpoint import save_training_state

        save_training_state(Path(folder), self.model, self.optimizer, self.scheduler, self.group.rank if self.group else 0)
        if self.group is not None:
            self.group.gather(None)  # every rank's files are written before rank 0 moves the folder into place

    def load_state(self, folder: Path) -> None:
        from opd.trainer.checkpoint import load_training_state

        load_training_state(Path(folder), self.model, self.optimizer, self.scheduler, self.group.rank if self.group else 0)

    def close(self) -> None:
        """The run is over (under torchrun the workers drop their shards); torch's thread count is what it was
        before the run set `student.torch_threads` (a later run without the setting gets the service's own)."""
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def model_folder(model: str) -> Path:
    """The local folder of a model given as a path or as a hub id already in the local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
