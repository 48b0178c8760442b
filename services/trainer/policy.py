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
6) Where the model lives and how the work is split is a `Parallel`
   (parallel.py): one process, or FSDP2 under torchrun with the weights read
   once by rank 0; also the precision (bf16 is mixed: float32 weights that
   train, bf16 compute). `save_version` writes what rank 0 gathers; `save_state`
   and `load_state` go through torch.distributed.checkpoint on one process as
   on N, so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opd.trainer import failpoints
from opd.trainer.config import RunConfig
from opd.trainer.parallel import OneProcess, Parallel

if TYPE_CHECKING:
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
    def __init__(self, config: RunConfig, parallel: Parallel | None = None) -> None:
        from opd.common.tokenizer import load_tokenizer

        student = config.student
        self.config = config
        self.parallel = parallel = parallel if parallel is not None else OneProcess()
        self.finetune = student.finetune

        def prepare(model: torch.nn.Module) -> torch.nn.Module:
            model = self._wrap(model) if student.finetune == "lora" else model
            failpoints.arm_forward(model, parallel.rank)
            return model

        with parallel.opening():  # no collective inside: files read, the model built (parallel.py)
            self.tokenizer = load_tokenizer(student.model)
            failpoints.on_open(parallel.rank)
            torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
            model = parallel.load(student, prepare)
        self.model = parallel.place(model)
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
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
        bucket_ids: Sequence[Any] | None = None,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """log p_theta of each token from its start on, differentiable. With `bucket_ids` (per sequence, T x K
        ids: the teacher's top-k), a pair: those logprobs and, per sequence, the K + 1 bucket logprobs of the
        full distribution at `temperature`, without the top-p mask (hf.token_logprobs)."""
        from opd.common.hf import token_logprobs

        with self.parallel.compute():
            out = token_logprobs(self.model, seqs, starts, temperature=temperature, top_p=top_p, pad_id=self.pad_id,
                                 **({"bucket_ids": bucket_ids} if bucket_ids is not None else {}))
        if bucket_ids is not None:
            return [scores.logprobs for scores in out], [scores.buckets for scores in out]
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
        """What the student service loads: an adapter folder, or a whole model with its tokenizer, in the run's dtype;
        under torchrun every rank gives its shards and rank 0 alone writes."""
        whole = self.parallel.whole_state(self.model, trainable_only=self.finetune == "lora")
        if whole is None:
            return
        if self.finetune == "full":
            if self.config.student.dtype == "bfloat16":  # mixed precision trains float32 weights
                whole = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in whole.items()}
            if getattr(self.model.config, "tie_word_embeddings", False):
                # a tied output layer is the embedding: written once (gathered or cast, it is a separate copy)
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

        save_training_state(Path(folder), self.model, self.optimizer, self.scheduler, self.parallel.rank,
                            self.parallel.checkpoint_group)
        self.parallel.saved()

    def load_state(self, folder: Path) -> None:
        from opd.trainer.checkpoint import load_training_state

        load_training_state(Path(folder), self.model, self.optimizer, self.scheduler, self.parallel.rank,
                            self.parallel.checkpoint_group)

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
